"""The shared-memory communicator against gloo, across 2, 3 and 4 gloo processes.

Each worker builds two communicators over the same ranks (which must not clash): one on
the native kernel, one on the torch fallback, both with small slots so that the larger
tensors go in many steps. Inputs are seeded per (case, rank), so every rank can compute
every reference itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagekit.errors import StageUnavailable
from stagekit.kernels import shm_collectives
from stagekit.parallel import shm_segment
from stagekit.parallel.shm_communicator import ShmCommunicator
from tests.helpers.rendezvous import rendezvous_url

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1,), (7,), (4097,), (1, 4096), (32, 4096))


def _exchange(obj: object) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _join(rank: int, world: int, url: str, **kw: object) -> tuple[ShmCommunicator, ShmCommunicator]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    native = ShmCommunicator.create(_exchange, rank, world, slot_bytes=64 << 10, **kw)
    fallback = ShmCommunicator.create(_exchange, rank, world, slot_bytes=16 << 10, use_native=False, **kw)
    assert native.native == shm_collectives.native_available() and not fallback.native
    assert native.name != fallback.name  # two groups over the same ranks: two segments
    assert not any(p.name in (native.name, fallback.name) for p in shm_segment.SHM_DIR.iterdir())
    return native, fallback


def _input(case: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * case + rank)).to(dtype)


def _fixed_order_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    return acc.to(xs[0].dtype)


def _same_on_every_rank(t: torch.Tensor) -> None:
    everyone = _exchange(hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    assert all(h == everyone[0] for h in everyone)


def _parity(rank: int, world: int, url: str) -> None:
    comms = _join(rank, world, url, timeout_s=60.0)
    for case, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in SHAPES):
        xs = [_input(case, r, shape, dtype) for r in range(world)]
        gloo = xs[rank].clone()
        dist.all_reduce(gloo)
        ref = _fixed_order_sum(xs)
        for comm in comms:
            got = comm.all_reduce(xs[rank].clone())
            assert torch.equal(got, ref), (comm.native, dtype, shape)
            _same_on_every_rank(got)
        if world == 2:  # one addition commutes: gloo's bytes exactly
            assert torch.equal(ref, gloo), (dtype, shape)
        else:  # gloo's ring adds in another order (bf16/fp16 in their own precision)
            bound = world * torch.finfo(dtype).eps * sum(x.float().abs() for x in xs) + 1e-30
            assert ((ref.float() - gloo.float()).abs() <= bound).all(), (dtype, shape)

    x = _input(99, rank, (3, 4097), torch.float32)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    for comm in comms:
        for dim in (0, 1, -1):
            assert torch.equal(comm.all_gather(x, dim), torch.cat(parts, dim))
        b = torch.full((5, 3001), float(rank), dtype=torch.bfloat16)
        assert torch.equal(comm.broadcast(b, src=world - 1), torch.full_like(b, world - 1))

    for pattern in ([(rank + 2 * r) % 3 for r in range(world)], [0] * world if rank == 1 else [5] * world):
        x = _input(7, rank, (sum(pattern), 4096), torch.bfloat16)
        counts = torch.tensor(pattern)
        recv_t = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(recv_t, counts)  # gloo's reference: counts first, then the rows
        recv = recv_t.tolist()
        ref = torch.empty(sum(recv), 4096, dtype=torch.bfloat16)
        dist.all_to_all_single(ref, x, recv, pattern)
        for comm in comms:
            got, got_counts = comm.all_to_all(x, pattern)
            assert got_counts == recv and torch.equal(got, ref), (comm.native, pattern)
    for comm in comms:
        comm.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_results_equal_gloo_and_fixed_order(world: int, tmp_path) -> None:
    mp.spawn(_parity, args=(world, rendezvous_url(tmp_path)), nprocs=world, join=True)


def _stress(rank: int, world: int, url: str) -> None:
    comms = _join(rank, world, url, timeout_s=60.0)
    rng = random.Random(5)  # the same sequence of operations on every rank
    deadline = time.monotonic() + 3.0
    for it in range(400):
        comm = comms[it % 2]
        op, n = rng.choice("rga"), rng.choice([1, 3, 100, 4096, 5000, 20000])
        if op == "r":
            xs = [_input(it, r, (n,), torch.float32) for r in range(world)]
            assert torch.equal(comm.all_reduce(xs[rank].clone()), _fixed_order_sum(xs))
        elif op == "g":
            xs = [_input(it, r, (2, n), torch.float16) for r in range(world)]
            assert torch.equal(comm.all_gather(xs[rank], -1), torch.cat(xs, -1))
        else:
            counts = [[rng.randint(0, 3) for _ in range(world)] for _ in range(world)]  # [source][dest]
            xs = [_input(it, r, (sum(counts[r]), n), torch.float32) for r in range(world)]
            got, recv = comm.all_to_all(xs[rank], counts[rank])
            mine = [x.split(c)[rank] for x, c in zip(xs, counts, strict=True)]
            assert recv == [c[rank] for c in counts] and torch.equal(got, torch.cat(mine))
        # every rank decides to stop at the same iteration, or the one that stops early hangs the others
        if it % 20 == 19 and any(_exchange(time.monotonic() > deadline)):
            break
    for comm in comms:
        comm.close()
    dist.destroy_process_group()


def test_stress_interleaved_random_sizes(tmp_path) -> None:
    mp.spawn(_stress, args=(3, rendezvous_url(tmp_path)), nprocs=3, join=True)


def _victim_or_survivor(rank: int, url: str, report: str) -> None:
    native, fallback = _join(rank, 2, url, timeout_s=20.0)
    lone = ShmCommunicator.create(_exchange, rank, 2, timeout_s=0.5)
    if rank == 1:  # killed while it waits inside a many-step all-reduce for rank 0
        time.sleep(1.2)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
        native.all_reduce(torch.ones(32, 4096))
        os._exit(3)  # unreachable: rank 0 does not enter before rank 1 is dead
    lines = [{"names": [native.name, fallback.name, lone.name]}]
    t = time.monotonic()
    with pytest.raises(StageUnavailable, match="collective timed out after 0.5 s: rank 1"):
        lone.all_reduce(torch.ones(4))  # rank 1 (alive, asleep) never enters: the deadline fires
    assert 0.5 <= time.monotonic() - t < 5.0
    time.sleep(2.0)  # rank 1 is dead by now, having posted the first step of its all-reduce
    for comm in (native, fallback):
        t = time.monotonic()
        with pytest.raises(StageUnavailable, match=r"rank 1 \(pid \d+\) of the shared-memory group died"):
            comm.all_reduce(torch.ones(32, 4096))
        lines.append({"native": comm.native, "detected_s": time.monotonic() - t})
        with pytest.raises(StageUnavailable, match="unusable"):
            comm.all_gather(torch.ones(2))
    with open(report, "w") as f:
        json.dump(lines, f)
    os._exit(0)  # gloo's destructors would wait on the dead peer


def test_killed_rank_is_an_error_and_leaves_no_segment(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    report = tmp_path / "report.json"
    url = rendezvous_url(tmp_path)
    procs = [ctx.Process(target=_victim_or_survivor, args=(r, url, str(report))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, -signal.SIGKILL]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    names, *detected = json.loads(report.read_text())
    assert [d["native"] for d in detected] == [shm_collectives.native_available(), False]
    assert all(d["detected_s"] < 2.0 for d in detected), detected  # liveness, not the 20 s deadline
    assert not [p.name for p in shm_segment.SHM_DIR.iterdir() if p.name in names["names"]]

    stale = shm_segment.SHM_DIR / shm_segment.segment_name(procs[1].pid, "deadbeef", [0, 1])
    stale.write_bytes(b"")  # what a rank 0 SIGKILLed during bootstrap would leave
    assert stale.name in shm_segment.sweep_stale() and not stale.exists()
