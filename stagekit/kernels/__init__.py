"""Small native kernels for the CPU, compiled on first use (see cpu_build)."""
