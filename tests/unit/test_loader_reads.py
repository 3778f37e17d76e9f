"""Each rank reads only the tensors of its layer range, and only its slice of them: the
files a stage shard opens are those holding its tensors, and the elements it reads equal
the elements it holds (nothing read and thrown away)."""

from __future__ import annotations

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


def _check_reads(path: Path, start: int, end: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_model_config(path)
    tp = 2
    # a rank of a TP2 stage; loading needs no collectives, so no world is joined
    groups = ParallelGroups(tp=GroupCoordinator(ranks=list(range(tp)), rank_in_group=rank))
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
