"""Tensor-parallel building blocks. Each layer owns its shard, its weight loader and its
one collective; models are written in terms of these and contain no collectives."""
