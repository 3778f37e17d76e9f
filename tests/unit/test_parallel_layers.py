"""Sharded layers equal their dense counterparts: 2 gloo processes, each holding its
shard loaded through the layer's own weight loader, against the unsharded math."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from stagekit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from stagekit.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from stagekit.layers.weight_source import TensorSource
from stagekit.parallel.parallel_world import ParallelWorld
from tests.helpers.rendezvous import rendezvous_url

TP = 2


def _checks(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    world = ParallelWorld(rank, TP, init_method)
    group = world.new_group(range(TP))
    g = torch.Generator().manual_seed(0)  # same tensors on every rank

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(group.device)

    x = rand(5, 16)

    w = rand(12, 16)
    b = rand(12)
    col = ColumnParallelLinear(16, 12, group, bias=True)
    col.weight_loader(col.weight, TensorSource(w))
    col.weight_loader(col.bias, TensorSource(b))
    torch.testing.assert_close(group.all_gather(col(x)), F.linear(x, w, b))

    w2 = rand(7, 12)
    b2 = rand(7)
    row = RowParallelLinear(12, 7, group, bias=True)
    row.weight_loader(row.weight, TensorSource(w2))
    row.bias_loader(row.bias, TensorSource(b2))
    x12 = rand(5, 12)
    torch.testing.assert_close(row(x12.chunk(TP, -1)[rank]), F.linear(x12, w2, b2))

    wg, wu = rand(8, 16), rand(8, 16)
    merged = MergedColumnParallelLinear(16, [8, 8], group)
    merged.weight_loader(merged.weight, TensorSource(wg), 0)
    merged.weight_loader(merged.weight, TensorSource(wu), 1)
    gate, up = merged(x).chunk(2, -1)
    torch.testing.assert_close(gate, F.linear(x, wg).chunk(TP, -1)[rank])
    torch.testing.assert_close(up, F.linear(x, wu).chunk(TP, -1)[rank])

    for num_kv in (2, 1):  # KV heads split over ranks; a single KV head replicated on both
        d = 4
        wq, wk, wv = (rand(n * d, 16) for n in (4, num_kv, num_kv))
        qkv = QKVParallelLinear(16, d, 4, num_kv, group)
        for sid, t in zip("qkv", (wq, wk, wv), strict=True):
            qkv.weight_loader(qkv.weight, TensorSource(t), sid)
        q, k, v = qkv(x).split([qkv.num_heads * d, qkv.num_kv_heads * d, qkv.num_kv_heads * d], -1)
        torch.testing.assert_close(q, F.linear(x, wq).chunk(TP, -1)[rank])
        kv_head = rank * num_kv // TP
        torch.testing.assert_close(k, F.linear(x, wk)[:, kv_head * d:(kv_head + 1) * d])
        torch.testing.assert_close(v, F.linear(x, wv)[:, kv_head * d:(kv_head + 1) * d])

    vocab = 11  # not divisible by TP: the last shard is padded
    emb_w = rand(vocab, 16)
    ids = torch.tensor([0, 5, 6, 10, 3], device=group.device)
    emb = VocabParallelEmbedding(vocab, 16, group)
    emb.weight_loader(emb.weight, TensorSource(emb_w))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb_w))
    head = ParallelLMHead(vocab, 16, group)
    head.weight_loader(head.weight, TensorSource(emb_w))
    torch.testing.assert_close(head.compute_logits(x), F.linear(x, emb_w))

    # oneDNN-prepacked weights (CPU fp32) give the same results as the dense ones
    x_row = x12.chunk(TP, -1)[rank]
    dense = [col(x), row(x_row), head.compute_logits(x)]
    if col.pack_weights() and row.pack_weights() and head.pack_weights():
        torch.testing.assert_close(col(x), dense[0])
        torch.testing.assert_close(row(x_row), dense[1])
        torch.testing.assert_close(head.compute_logits(x), dense[2])
    else:
        assert group.device.type != "cpu", "prepacking is expected to work for fp32 on the CPU"
    group.barrier()
    world.close()


def test_sharded_layers_equal_dense(tmp_path: Path) -> None:
    mp.spawn(_checks, args=(rendezvous_url(tmp_path),), nprocs=TP, join=True)
