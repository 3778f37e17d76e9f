"""Collectives on one host: the shared-memory communicator against gloo and a memcpy floor.

For each group size (2 and 4 processes, one torch thread each) and each operation
(all_reduce, all_gather, all_to_all) at sizes from one token's hidden state ([1, 4096]
fp32) to a 32-token batch's ([32, 4096]): the latency of back-to-back calls timed at
rank 0 (p50 and p99 over ``--iters`` calls after a warm-up), with shared memory and with
gloo over the same processes in the same run, alternating in blocks of 20 calls (the
first call of each block, which waits for the peers to leave the other communicator, is
not counted), so drift on the machine hits both alike; and a
floor, one in-process copy of the message's bytes. all_to_all sends each rank an equal
share of the rows; gloo's all_to_all first exchanges the counts (as expert dispatch must),
then the rows.

    stagemesh bench collectives [--ranks 2,4] [--rows 1,8,32] [--iters 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagekit.parallel.shm_communicator import ShmCommunicator
from stagekit.ports import free_port

OPS = ("all_reduce", "all_gather", "all_to_all")
BLOCK = 20  # calls in a row of one communicator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", default="2,4", help="comma-separated group sizes (default 2,4)")
    p.add_argument("--rows", default="1,8,32", help="comma-separated token counts (default 1,8,32)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096)")
    p.add_argument("--iters", type=int, default=300, help="timed calls per case and communicator (default 300)")
    p.add_argument("--fallback", action="store_true", help="the torch fallback instead of the native kernel")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _quantiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1e6, xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e6


def _gloo(op: str, x: torch.Tensor, counts: list[int], world: int) -> None:
    if op == "all_reduce":
        dist.all_reduce(x)
    elif op == "all_gather":
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        torch.cat(parts, -1)
    else:
        recv = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(recv, torch.tensor(counts))
        out = torch.empty(int(recv.sum()), x.shape[1], dtype=x.dtype)
        dist.all_to_all_single(out, x, recv.tolist(), counts)


def _shm(comm: ShmCommunicator, op: str, x: torch.Tensor, counts: list[int]) -> None:
    if op == "all_reduce":
        comm.all_reduce(x)
    elif op == "all_gather":
        comm.all_gather(x, -1)
    else:
        comm.all_to_all(x, counts)


def _worker(rank: int, world: int, port: int, cfg: dict, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def exchange(obj: object) -> list:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    comm = ShmCommunicator.create(exchange, rank, world, use_native=not cfg["fallback"])
    rows_out = []
    for op in OPS:
        for rows in cfg["rows"]:
            x = torch.randn(rows, cfg["hidden"]) / world  # all_reduce in place: keep the sums bounded
            counts = [rows // world + (r < rows % world) for r in range(world)]
            times: dict[str, list[float]] = {"shm": [], "gloo": []}
            for block in range(cfg["warmup"] // BLOCK + cfg["iters"] // BLOCK):
                for name in ("shm", "gloo"):
                    for i in range(BLOCK + 1):  # the first call of a block absorbs the other's skew
                        t = time.perf_counter()
                        if name == "shm":
                            _shm(comm, op, x, counts)
                        else:
                            _gloo(op, x, counts, world)
                        if i and block >= cfg["warmup"] // BLOCK:
                            times[name].append(time.perf_counter() - t)
            dst = torch.empty_like(x)
            floor = []
            for _ in range(cfg["iters"]):
                t = time.perf_counter()
                dst.copy_(x)
                floor.append(time.perf_counter() - t)
            (sp50, sp99), (gp50, gp99) = _quantiles(times["shm"]), _quantiles(times["gloo"])
            rows_out.append({"ranks": world, "op": op, "shape": [rows, cfg["hidden"]], "dtype": "float32",
                             "bytes": x.numel() * 4, "shm_p50_us": sp50, "shm_p99_us": sp99, "gloo_p50_us": gp50,
                             "gloo_p99_us": gp99, "memcpy_p50_us": _quantiles(floor)[0],
                             "gloo_over_shm_p50": gp50 / sp50})
    if rank == 0:
        results.put({"native": comm.native, "rows": rows_out})
    comm.close()
    dist.barrier()
    dist.destroy_process_group()


def measure(ranks: list[int], rows: list[int], hidden: int, iters: int, fallback: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    cfg = {"rows": rows, "hidden": hidden, "iters": max(BLOCK, iters), "warmup": max(BLOCK, iters // 10),
           "fallback": fallback}
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__, "results": []}
    for world in ranks:
        ctx_procs = mp.start_processes(_worker, args=(world, free_port(), cfg, results), nprocs=world, join=False,
                                       start_method="spawn")
        got = results.get(timeout=1800)
        while not ctx_procs.join():
            pass
        out["native"] = got["native"]
        out["results"].extend(got["rows"])
    return out


def format_table(result: dict) -> str:
    kind = "native kernel" if result.get("native") else "torch fallback"
    lines = [f"collectives ({result['machine']}, torch {result['torch']}, shared memory via the {kind}); "
             "latency in us, back-to-back calls timed at rank 0",
             f"{'ranks':>5} {'op':<10} {'shape':<11} {'shm p50':>8} {'shm p99':>8} {'gloo p50':>9} "
             f"{'gloo p99':>9} {'memcpy':>7} {'gloo/shm':>8}"]
    for r in result["results"]:
        shape = "[" + ", ".join(map(str, r["shape"])) + "]"
        lines.append(f"{r['ranks']:>5} {r['op']:<10} {shape:<11} {r['shm_p50_us']:>8.1f} {r['shm_p99_us']:>8.1f} "
                     f"{r['gloo_p50_us']:>9.1f} {r['gloo_p99_us']:>9.1f} {r['memcpy_p50_us']:>7.1f} "
                     f"{r['gloo_over_shm_p50']:>7.1f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = measure([int(r) for r in args.ranks.split(",") if r], [int(r) for r in args.rows.split(",") if r],
                     args.hidden, args.iters, args.fallback)
    print(json.dumps(result) if args.json else format_table(result), flush=True)
    return 0
