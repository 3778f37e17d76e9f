"""scripts/demo_gguf.py: checkpoint names map to llama.cpp's, q/k rows move from HF's rotary
layout (first half, second half of each head) to GGML's (interleaved pairs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("demo_gguf", Path(__file__).parents[2] / "scripts" / "demo_gguf.py")
demo_gguf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_gguf)


def test_permute_interleaves_the_halves_of_each_head() -> None:
    w = np.arange(16, dtype=np.float32).reshape(8, 2)   # 2 heads of head_dim 4, 2 input columns
    rows = demo_gguf.permute(w, 2)[:, 0] // 2
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_names() -> None:
    assert demo_gguf.gguf_name("model.layers.11.self_attn.k_proj.weight") == "blk.11.attn_k.weight"
    assert demo_gguf.gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert demo_gguf.gguf_name("lm_head.weight") == "output.weight"
    with pytest.raises(SystemExit, match="not a Llama tensor"):
        demo_gguf.gguf_name("model.layers.0.mlp.experts.0.w1.weight")
