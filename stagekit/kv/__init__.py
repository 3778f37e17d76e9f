"""The paged KV cache of a stage's rank, and the per-step index of the batch's tokens into it
(``ForwardBatch``) that the attention layers read."""
