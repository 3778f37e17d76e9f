"""The stage service: one TP group holding a contiguous layer range, served over gRPC."""
