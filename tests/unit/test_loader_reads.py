"""Each rank reads only the tensors of its layer range, and only its slice of them: the
files a stage shard opens are those holding its tensors, and the elements it reads equal
the elements it holds (nothing read and thrown away)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import stagekit.loader.safetensors_loader as loader
from stagekit.config.model_config import load_model_config
from stagekit.models.stage_model import StageModel
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups


class _Recorder:
    """Wraps safe_open: which files are opened, how many elements are read from them."""

    def __init__(self, real) -> None:
        self.real = real
        self.files: set[str] = set()
        self.names: set[str] = set()
        self.elements = 0

    def __call__(self, path, *args, **kwargs):
        self.files.add(Path(path).name)
        return _File(self.real(path, *args, **kwargs), self)


class _File:
    def __init__(self, f, rec: _Recorder) -> None:
        self._f, self._rec = f, rec

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._f.keys()

    def get_slice(self, name: str):
        self._rec.names.add(name)
        return _Slice(self._f.get_slice(name), self._rec)


class _Slice:
    def __init__(self, sl, rec: _Recorder) -> None:
        self._sl, self._rec = sl, rec

    def get_shape(self):
        return self._sl.get_shape()

    def __getitem__(self, index):
        t = self._sl[index]
        self._rec.elements += t.numel()
        return t


@pytest.mark.parametrize(("arch", "start", "end", "rank"), [
    ("llama", 2, 3, 1),   # a middle stage: no embedding, no head
    ("llama", 4, 5, 0),   # the last stage: final norm and an untied head
    ("qwen2", 3, 5, 1),   # the last stage of a tied model: the head is read from the embedding
    ("qwen2", 0, 1, 0),   # the first stage: the embedding
])
def test_rank_reads_only_its_layers_and_slices(hf_checkpoints: dict, monkeypatch: pytest.MonkeyPatch,
                                               arch: str, start: int, end: int, rank: int) -> None:
    _check_reads(Path(hf_checkpoints[arch].path), start, end, rank, monkeypatch)


@pytest.mark.parametrize(("arch", "start", "end", "rank"), [
    ("mixtral", 0, 2, 1),     # every expert's half of the hidden units, per expert tensor
    ("qwen2_moe", 2, 5, 0),   # the dense layer 2, sparse 3-4 with the shared expert
])
def test_moe_rank_reads_only_its_expert_slices(moe_checkpoints: dict, monkeypatch: pytest.MonkeyPatch,
                                               arch: str, start: int, end: int, rank: int) -> None:
    _check_reads(Path(moe_checkpoints[arch].path), start, end, rank, monkeypatch)


@pytest.mark.parametrize(("arch", "start", "end", "rank"), [
    ("mixtral", 0, 5, 1),     # experts 4-7 of every layer, whole
    ("qwen2_moe", 2, 5, 0),   # experts 0-2 of layers 3-4, the whole shared expert; the dense layer 2 split
])
def test_ep_rank_reads_only_its_experts(moe_checkpoints: dict, monkeypatch: pytest.MonkeyPatch,
                                        arch: str, start: int, end: int, rank: int) -> None:
    """``--moe-parallel ep`` at TP2: a rank reads whole experts, only its half of them."""
    rec, model = _check_reads(Path(moe_checkpoints[arch].path), start, end, rank, monkeypatch, ep=True)
    cfg, half = model.cfg, model.cfg.num_experts // 2
    mine = set(range(rank * half, (rank + 1) * half))
    read = {int(m.group(1)) for n in rec.names if (m := re.search(r"\.experts\.(\d+)\.", n))}
    assert read == mine
    sparse = [i for i in range(start, end) if cfg.is_sparse_layer(i)]
    assert sparse and len(rec.names & {f"model.layers.{i}.mlp.shared_expert.up_proj.weight" for i in sparse}) == (
        len(sparse) if arch == "qwen2_moe" else 0)
    for i in sparse:
        experts = getattr(model.model.layers[str(i)], model.model.layers[str(i)].mlp_name).experts
        assert experts.local_experts == sorted(mine)
        inter = cfg.moe_intermediate_size
        assert experts.w13_weight.shape == (half, 2 * inter, cfg.hidden_size)  # whole experts, not split


def _check_reads(path: Path, start: int, end: int, rank: int, monkeypatch: pytest.MonkeyPatch,
                 ep: bool = False) -> tuple[_Recorder, StageModel]:
    cfg = load_model_config(path)
    tp = 2
    # a rank of a TP2 stage; loading needs no collectives, so no world is joined
    tp_group = GroupCoordinator(ranks=list(range(tp)), rank_in_group=rank)
    ep_group = GroupCoordinator(ranks=list(range(tp)), rank_in_group=rank) if ep else None
    groups = ParallelGroups(tp=tp_group, ep=ep_group)
    model = StageModel(cfg, StageLayout(start, end, cfg.num_layers, tp), groups, torch.float32)
    weight_map = loader.checkpoint_files(path)  # tensor name -> file
    rec = _Recorder(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", rec)
    loader.load_weights(model, show_progress=False)

    needed = {f"model.layers.{i}." for i in range(start, end)}
    if start == 0:
        needed.add("model.embed_tokens.")
    if end == cfg.num_layers:
        needed |= {"model.norm.", "lm_head.", *(["model.embed_tokens."] if cfg.tie_word_embeddings else [])}
    expected_files = {f for name, f in weight_map.items() if any(name.startswith(p) for p in needed)}
    assert rec.files == expected_files
    if len(set(weight_map.values())) > 1:  # the sharded checkpoint: some files are never opened
        assert rec.files < set(weight_map.values())
    held = sum(p.numel() for p in model.parameters())
    assert rec.elements == held, f"read {rec.elements} elements, hold {held}"
    return rec, model
