"""KV heads per TP rank and the re-split of transferred KV between TP sizes."""

from __future__ import annotations

import pytest
import torch

from stagekit.parallel.kv_heads import kv_heads_of, resplit_kv, transfer_shape


def _as_tp(full: torch.Tensor, tp: int) -> torch.Tensor:
    """What a stage of ``tp`` ranks transfers, built head by head: ``full`` is
    [layers, 2, blocks, H, block_size, head_dim]."""
    h = full.shape[3]
    if tp == 1:
        return full.clone()
    per_rank = []
    for r in range(tp):
        if h >= tp:
            heads = list(range(r * h // tp, (r + 1) * h // tp))
        else:
            heads = [r * h // tp]   # replicated: tp // h ranks per head
        per_rank.append(torch.stack([full[:, :, :, g] for g in heads], dim=3))
    return torch.stack(per_rank)


@pytest.mark.parametrize("heads,tp,expected", [
    (4, 1, [range(0, 4)]),
    (4, 2, [range(0, 2), range(2, 4)]),
    (4, 4, [range(i, i + 1) for i in range(4)]),
    (2, 4, [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]),
    (1, 2, [range(0, 1), range(0, 1)]),
])
def test_heads_of_each_rank(heads: int, tp: int, expected: list[range]) -> None:
    assert [kv_heads_of(r, tp, heads) for r in range(tp)] == expected


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_resplit_between_every_pair_of_tp_sizes(heads: int) -> None:
    full = torch.randn(3, 2, 5, heads, 4, 8)   # [layers, 2, blocks, H, block_size, head_dim]
    sizes = [1, 2, 4]
    for src in sizes:
        data = _as_tp(full, src)
        assert tuple(data.shape) == transfer_shape(src, heads, 3, 5, 4, 8)
        for dst in sizes:
            out = resplit_kv(data, src, dst, heads)
            assert torch.equal(out, _as_tp(full, dst)), (src, dst)
            assert out.is_contiguous()


def test_resplit_keeps_dtype_and_takes_each_head_from_a_holder() -> None:
    full = torch.arange(2 * 2 * 1 * 2 * 2 * 2, dtype=torch.float16).view(2, 2, 1, 2, 2, 2)
    tp4 = _as_tp(full, 4)   # heads replicated twice
    tp4[1] = -1             # a second copy of head 0 that disagrees: the first holder wins
    out = resplit_kv(tp4, 4, 1, 2)
    assert out.dtype == torch.float16 and torch.equal(out, full)


def test_a_shape_that_is_not_the_senders_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="not what a stage of TP=2"):
        resplit_kv(torch.zeros(3, 2, 2, 5, 4, 4, 8), 2, 1, 4)   # heads per rank should be 2
    with pytest.raises(ValueError, match="cannot hold 4 KV heads"):
        resplit_kv(torch.zeros(2, 2, 5, 4, 4, 8), 1, 3, 4)
