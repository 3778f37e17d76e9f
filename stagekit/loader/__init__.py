"""Reading HF checkpoint directories into a stage's shard."""
