"""The serving engine: sequences, scheduling, KV cache, sampling and the step loop."""
