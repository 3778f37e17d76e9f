"""Random-weight demo checkpoints in Hugging Face layout, with a real trained BPE tokenizer.

Why: tests, benchmarks and the quick-start need a model that exists offline, is reproducible byte for byte,
and uses the same file formats as production checkpoints.
"""

from __future__ import annotations

from stagekit.demo.checkpoint import (
    ARCHS,
    SIZES,
    count_params,
    demo_config,
    param_shapes,
    random_weights,
    write_demo_model,
)

__all__ = [
    "ARCHS",
    "SIZES",
    "count_params",
    "demo_config",
    "param_shapes",
    "random_weights",
    "write_demo_model",
]
