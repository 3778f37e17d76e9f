"""``stagemesh bench``: benchmarks of stagemesh's parts; ``--json`` prints one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from stagemesh.cli.sizes import parse_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (stagemesh bench transport|serve|prefix|kv|gateway|soak|collectives"
                                     "|handoff|gemm|decode|layer --help)")
    which = p.add_subparsers(dest="bench", required=True)
    t = which.add_parser("transport", help="data plane: UCX profiles vs gRPC vs ucx_perftest and memcpy",
                         description="Bandwidth and round trip of the data-plane transports between two "
                                     "processes, for each message size, with ratios to ucx_perftest (same UCX "
                                     "transports) and to gRPC; plus a decode-sized step round trip.")
    t.add_argument("--sizes", default=None,
                   help="comma-separated message sizes, e.g. 4KiB,1MiB,64MiB (default: 4KiB,64KiB,1MiB,16MiB,64MiB; "
                        "quick: 4KiB,1MiB,16MiB)")
    t.add_argument("--transports", default=None,
                   help="comma-separated: ucx (auto), ucx:shm, ucx:cma, ucx:tcp, grpc (default: all that work here)")
    t.add_argument("--quick", action="store_true", help="fewer sizes and iterations (a minute or two)")
    t.add_argument("--repeat", type=int, default=1,
                   help="rounds over all transports; figures are medians over rounds (default 1)")
    t.add_argument("--window", type=int, default=1,
                   help="frames in flight in the bandwidth runs, as a head with that pipeline depth keeps them "
                        "(ucx_perftest's tag_bw keeps many sends outstanding; default 1)")
    t.add_argument("--no-perftest", action="store_true", help="skip the ucx_perftest ceilings")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    t.set_defaults(func=run_transport)
    s = which.add_parser("serve", help="serving: a mesh through the gateway vs transformers generate",
                         description="Starts a mesh on this machine, drives it through the gateway with N "
                                     "concurrent greedy requests, and (--baseline hf) runs transformers "
                                     "generate on the same checkpoint in the same invocation.")
    from stagemesh.bench import serving

    serving.add_arguments(s)
    s.set_defaults(func=serving.run)
    x = which.add_parser("prefix", help="shared-prefix workload: prefix caching on/off, DP prefix vs round-robin "
                                        "routing",
                         description="Groups of requests sharing a long prefix through the gateway: one replica "
                                     "with prefix caching on vs off, then two replicas with prefix-aware vs "
                                     "round-robin routing, in the same invocation.")
    from stagemesh.bench import prefix_workload

    prefix_workload.add_arguments(x)
    x.set_defaults(func=prefix_workload.run)
    k = which.add_parser("kv", help="KV transfer between two replicas (ExportKv): UCX vs gRPC vs memcpy",
                         description="Two one-stage replicas per data plane; a fresh prompt computed on A, "
                                     "then ExportKv A->B timed: GB/s per prompt length, UCX/gRPC ratio and a "
                                     "same-process memcpy ceiling of the same bytes, medians over rounds.")
    from stagemesh.bench import kv_transfer

    kv_transfer.add_arguments(k)
    k.set_defaults(func=kv_transfer.run)
    from stagemesh.bench import collectives, decode_step, gateway, gemm, layer, memory_soak, step_handoff

    # benchmarks whose module holds its own arguments, run and description (its docstring's first paragraph)
    for name, module, help_text in (
        ("gateway", gateway, "what the gateway adds: latency and request rate vs the stages direct"),
        ("soak", memory_soak, "resident memory of the stage processes over many requests"),
        ("collectives", collectives, "all-reduce/all-gather/all-to-all on one host: shared memory vs gloo"),
        ("handoff", step_handoff, "a decode step's metadata from TP rank 0 to a worker: pipe vs shared memory"),
        ("decode", decode_step, "decode steps of a model per linear kernel: oneDNN vs panel fp32/fp16/bf16"),
        ("gemm", gemm, "a decode step's linear kernels: oneDNN vs the panel GEMM (fp32, fp16, bf16) per token count"),
        ("layer", layer, "a CPU decode step: the fused decoder layer (one native call per layer) vs the unfused"),
    ):
        sp = which.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)

def run_transport(args: argparse.Namespace) -> int:
    from stagekit.transport.ucx.runtime import ucx_importable
    from stagemesh.bench import transport as bench

    cfg = bench.BenchConfig(quick=args.quick, perftest=not args.no_perftest, repeat=max(1, args.repeat),
                            window=max(1, args.window))
    if args.sizes:
        cfg.sizes = [parse_bytes(s) for s in args.sizes.split(",") if s]
    elif args.quick:
        cfg.sizes = list(bench.QUICK_SIZES)
    if args.transports:
        cfg.transports = [s for s in args.transports.split(",") if s]
    elif not ucx_importable():
        cfg.transports = ["grpc"]
    print(f"measuring {', '.join(cfg.transports)} at {len(cfg.sizes)} sizes...", file=sys.stderr, flush=True)
    result = bench.run(cfg)
    print(json.dumps(result) if args.json else bench.format_table(result), flush=True)
    return 0
