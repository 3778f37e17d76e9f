"""``stagemesh up``: the whole mesh on this machine, its stages restarted when they exit
(`stagemesh.supervisor`); Ctrl-C stops everything it started."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path


def default_demo_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stagemesh" / "demo-llama"
    return cache


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start gateway + replicas x stages on this machine (stages that exit are restarted)")
    p.add_argument("--model", default=None, help="HF model directory (default: the built-in demo model)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="prefill/decode disaggregation: N prefill replicas (with --decode M; instead of --dp)")
    p.add_argument("--decode", type=int, default=0, metavar="M",
                   help="M decode replicas, continuing the requests the prefill replicas computed the prompts of")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = torch's default)")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--linear-kernel", default="auto", choices=["auto", "panel", "onednn", "dense"],
                   help="CPU linear layers of every stage (see stagemesh stage --help; default: auto)")
    p.add_argument("--weight-dtype", default=None, choices=["float16", "bfloat16"],
                   help="CPU: linear weights stored in this dtype, fp32 activations (see stagemesh stage --help)")
    p.add_argument("--kv-prefault", action="store_true",
                   help="stages touch their whole KV pool at start-up (see stagemesh stage --help)")
    p.add_argument("--log-dir", default=None, help="where process logs go (default: a temp dir)")
    p.add_argument("--collectives", default="auto", choices=["auto", "shm", "gloo"],
                   help="TP collectives inside each stage (see stagemesh stage --help)")
    p.add_argument("--dp-attention", action="store_true",
                   help="MoE models: the --dp replicas form one data-parallel-attention group: each attends over its "
                        "own requests, the experts are placed over all replicas' ranks and tokens travel to them "
                        "(all-to-all); the replicas step in lockstep and fail and recover as one")
    p.add_argument("--collective-timeout", type=float, default=30.0,
                   help="with --dp-attention: seconds a group collective may take before the group counts as failed")
    p.add_argument("--moe-parallel", default="tp", choices=["tp", "ep"],
                   help="MoE models: experts split over each stage's TP ranks (tp) or placed whole (ep); "
                        "see stagemesh stage --help")
    p.add_argument("--transport", default=None,
                   help="data plane between stages: ucx or grpc (default: ucx where ucxx imports, else grpc)")
    p.add_argument("--step-timeout", type=float, default=None,
                   help="seconds a head waits for a step's result before failing its requests (default: the "
                        "stage's, 120); see stagemesh stage --help")
    gw = p.add_argument_group("gateway")
    gw.add_argument("--grpc-port", type=int, default=None,
                    help="gRPC Generation API port (default: --port + 1; 0 = a free port)")
    gw.add_argument("--no-grpc", action="store_true", help="serve the REST API only")
    gw.add_argument("--routing", default=None, choices=["round_robin", "least_loaded", "prefix"],
                    help="how the gateway spreads requests over the --dp replicas (default: the gateway's: "
                         "round_robin, least_loaded for a --dp-attention group)")
    gw.add_argument("--pd-min-prefill-tokens", type=int, default=16,
                    help="with --prefill/--decode: see stagemesh gateway --help (default: %(default)s)")
    gw.add_argument("--pd-lease", type=float, default=30.0,
                    help="with --prefill/--decode: see stagemesh gateway --help (default: %(default)s)")
    gw.add_argument("--api-key", action="append", default=[],
                    help="require 'Authorization: Bearer KEY' on /v1 and gRPC (repeatable)")
    gw.add_argument("--api-key-file", action="append", default=[], help="file with one API key per line")
    gw.add_argument("--admin-api-key", action="append", default=[],
                    help="turn the gateway's admin API (/admin) on with this key (repeatable; see README)")
    gw.add_argument("--admin-api-key-file", action="append", default=[], help="file with one admin key per line")
    sec = p.add_argument_group("TLS and mesh token", "see README, 'TLS and mesh token'")
    sec.add_argument("--tls-cert", default=None, metavar="PEM", help="the gateway serves REST and gRPC over TLS")
    sec.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    sec.add_argument("--stage-tls-cert", default=None, metavar="PEM",
                     help="stages serve and dial over TLS with this certificate; the gateway shows it to them")
    sec.add_argument("--stage-tls-key", default=None, metavar="PEM", help="the private key of --stage-tls-cert")
    sec.add_argument("--stage-tls-ca", default=None, metavar="PEM",
                     help="mutual TLS between gateway and stages: certificates must be signed by this CA")
    sec.add_argument("--mesh-token-file", default=None, metavar="FILE",
                     help="stages refuse Stage API calls without the token in this file")
    p.add_argument("--stage-metrics", action="store_true",
                   help="every stage serves Prometheus metrics on a free port (printed when up)")
    p.set_defaults(func=run)


def _gateway_options(args: argparse.Namespace) -> tuple[list[str], dict[str, str], int | None]:
    """Gateway arguments, its environment (keys travel there, never on a command line) and the gRPC port."""
    grpc_port = None if args.no_grpc else (args.port + 1 if args.grpc_port is None else args.grpc_port)
    gw_args = ["--routing", args.routing] if args.routing else []
    if args.prefill:
        gw_args += ["--pd-min-prefill-tokens", str(args.pd_min_prefill_tokens), "--pd-lease", str(args.pd_lease)]
    if grpc_port is not None:
        gw_args += ["--grpc-port", str(grpc_port)]
    for name in args.api_key_file:
        gw_args += ["--api-key-file", name]
    for name in args.admin_api_key_file:
        gw_args += ["--admin-api-key-file", name]
    env = {"STAGEMESH_API_KEYS": ",".join(args.api_key)} if args.api_key else {}
    if args.admin_api_key:
        env["STAGEMESH_ADMIN_API_KEYS"] = ",".join(args.admin_api_key)
    return gw_args, env, grpc_port


def run(args: argparse.Namespace) -> int:
    from stagekit.config.model_config import load_model_config
    from stagekit.errors import ConfigError
    from stagekit.parallel.expert_placement import check_moe_parallel
    from stagemesh.launcher import Mesh, MeshSpec, split_layers
    from stagemesh.supervisor import Supervisor

    model = args.model
    if model is None:
        model = str(default_demo_dir())
        if not (Path(model) / "config.json").is_file():
            from stagekit.demo import write_demo_model

            print(f"creating the demo model in {model}", file=sys.stderr)
            write_demo_model(model)
    try:
        cfg = load_model_config(model)
        splits = split_layers(cfg.num_layers, args.pp)
        if (args.tls_cert is None) != (args.tls_key is None) or (args.stage_tls_cert is None) != (
                args.stage_tls_key is None):
            raise ConfigError("TLS needs both a certificate and its key")
        if args.stage_tls_ca and not args.stage_tls_cert:
            raise ConfigError("--stage-tls-ca needs --stage-tls-cert/--stage-tls-key (the stages serve with them)")
        if args.dp_attention:
            if args.dp < 2:
                raise ConfigError("--dp-attention needs --dp 2 or more replicas to group")
            if not cfg.num_experts:
                raise ConfigError(f"--dp-attention: {cfg.name!r} has no experts (a dense model): run --dp replicas "
                                  "without it")
            check_moe_parallel("ep", cfg.num_experts, args.tp * args.dp, repr(cfg.name),
                               f"--dp {args.dp} x --tp {args.tp}")
        else:
            check_moe_parallel(args.moe_parallel, cfg.num_experts, args.tp, repr(cfg.name))
        roles = pd_roles(args)
    except ConfigError as e:
        print(f"stagemesh up: error: {e}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="stagemesh-up-")
    gateway_args, gateway_env, grpc_port = _gateway_options(args)
    dp = len(roles) or args.dp
    mesh = Mesh(MeshSpec(model=model, layer_splits=splits, tp=args.tp, dp=dp, host=args.host, roles=roles,
                         port=args.port, dtype=args.dtype, threads=args.threads,
                         kv_cache_memory=args.kv_cache_memory, extra_gateway_args=gateway_args,
                         gateway_env=gateway_env, stage_metrics=args.stage_metrics,
                         transport=args.transport,
                         extra_stage_args=(["--kv-prefault"] if args.kv_prefault else [])
                         + ["--collectives", args.collectives, "--linear-kernel", args.linear_kernel]
                         + (["--weight-dtype", args.weight_dtype] if args.weight_dtype else [])
                         + ([] if args.step_timeout is None else ["--step-timeout", str(args.step_timeout)])
                         + ([] if args.dp_attention else ["--moe-parallel", args.moe_parallel]),
                         dp_attention=args.dp_attention, collective_timeout=args.collective_timeout,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, stage_tls_ca=args.stage_tls_ca,
                         stage_tls_cert=args.stage_tls_cert, stage_tls_key=args.stage_tls_key,
                         mesh_token_file=args.mesh_token_file), log_dir)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        kinds = f" ({args.prefill} prefill, {args.decode} decode)" if roles else ""
        print(f"starting {dp} replica(s){kinds} x {args.pp} stage(s) x tp {args.tp} of {cfg.name}; logs in {log_dir}",
              file=sys.stderr, flush=True)
        mesh.start()
        grpc_note = f", gRPC{'+TLS' if args.tls_cert else ''} {args.host}:{grpc_port}" if grpc_port else ""
        print(f"stagemesh is up: {mesh.url}  (model {cfg.name!r}{grpc_note}; Ctrl-C stops it)", flush=True)
        for (r, i), url in sorted(mesh.stage_metrics_urls.items()):
            print(f"  stage metrics replica {r} stage {i}: {url}", flush=True)
        supervisor = Supervisor(mesh, lambda line: print(f"stagemesh up: {line}", file=sys.stderr, flush=True))
        while not stopping:
            supervisor.step()
            time.sleep(0.25)
    except (RuntimeError, TimeoutError) as e:
        print(f"stagemesh up: {e}", file=sys.stderr)
        return 1
    finally:
        mesh.stop()
        print("stagemesh stopped", file=sys.stderr, flush=True)
    return 0


def pd_roles(args: argparse.Namespace) -> list[str]:
    """The replicas' roles for ``--prefill N --decode M`` (prefill ones first); [] without them.
    ConfigError when they cannot serve: one without the other, negative, or beside --dp."""
    from stagekit.errors import ConfigError

    if not args.prefill and not args.decode:
        return []
    if args.prefill < 1 or args.decode < 1:
        raise ConfigError(f"--prefill {args.prefill} --decode {args.decode}: prefill/decode disaggregation needs at "
                          "least one of each (a prefill replica hands each request to a decode replica)")
    if args.dp != 1 or args.dp_attention:
        raise ConfigError("--prefill/--decode choose the replicas themselves: leave out --dp and --dp-attention")
    return ["prefill"] * args.prefill + ["decode"] * args.decode
