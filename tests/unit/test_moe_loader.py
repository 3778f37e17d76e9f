"""MoE checkpoints: transformers' fused in-memory expert names are refused by name, and a
missing per-expert tensor is an error naming it, before any tensor is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stagekit.config.model_config import load_model_config
from stagekit.errors import ConfigError
from stagekit.loader.safetensors_loader import load_weights
from stagekit.models.stage_model import StageModel
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups

SOLO = ParallelGroups(tp=GroupCoordinator([0], 0))


def _rewrite(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    (f,) = dst.glob("*.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def _load(path: Path, start: int = 0, end: int = 5) -> None:
    cfg = load_model_config(path)
    model = StageModel(cfg, StageLayout(start, end, cfg.num_layers), SOLO, torch.float32)
    load_weights(model, show_progress=False)


def test_missing_expert_tensor_is_named(moe_checkpoints: dict, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    path = _rewrite(moe_checkpoints["qwen3_moe"].path, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ConfigError, match=f"missing expert tensors: {name}"):
        _load(path)
    _load(path, 2, 5)  # a stage without layer 1 does not need it


def test_fused_expert_names_are_refused(moe_checkpoints: dict, tmp_path: Path) -> None:
    def fuse(t: dict) -> None:
        for layer in range(5):
            p = f"model.layers.{layer}.block_sparse_moe.experts"
            t[f"{p}.gate_up_proj"] = torch.stack([torch.cat([t.pop(f"{p}.{e}.w1.weight"), t.pop(f"{p}.{e}.w3.weight")])
                                                  for e in range(8)])
            t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.w2.weight") for e in range(8)])

    path = _rewrite(moe_checkpoints["mixtral"].path, tmp_path / "m", fuse)
    with pytest.raises(ConfigError, match=r"fused \(model\.layers\.0\.block_sparse_moe\.experts\.down_proj.*"
                                             r"save_original_format=True"):
        _load(path)
