"""``stagemesh stage``: one stage service (a layer range over TP ranks)."""

from __future__ import annotations

import argparse
import sys

from stagemesh.cli.sizes import parse_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stage", help="serve a layer range of a model as one stage (gRPC)")
    p.add_argument("--model", required=True, help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--layers", default=":", help="half-open layer range A:B (default: all layers)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks inside this stage")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = pick a free one and print it)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--model-name", default=None, help="name served to clients (default: the directory's name)")
    p.add_argument("--kv-cache-memory", default="1GiB",
                   help="KV block pool per rank, e.g. 512MiB, 4GiB, or a share of the memory free at start-up, "
                   "e.g. 40%% (CUDA: free device memory; CPU: available host memory split over the TP ranks)")
    p.add_argument("--kv-prefault", action="store_true",
                   help="touch the whole KV pool at start-up (CPU): memory committed at once and no page faults "
                        "when fresh blocks are first written (prefill, KV imports); default: pages on first use")
    p.add_argument("--threads", type=int, default=0, help="torch threads per TP rank (0 = torch's default)")
    p.add_argument("--transport", default=None,
                   help="data plane between stages: ucx or grpc (default: ucx where ucxx imports, else grpc)")
    p.add_argument("--linear-kernel", default="auto", choices=["auto", "panel", "onednn", "dense"],
                   help="CPU fp32 linear layers, weights packed once after loading: panel = the native panel "
                        "GEMM (fastest at decode sizes); onednn = oneDNN's packed matmul; auto = panel, or onednn "
                        "where no C compiler is found; dense = plain F.linear (default: auto)")
    p.add_argument("--weight-dtype", default=None, choices=["float16", "bfloat16"],
                   help="CPU: store the linear weights in this dtype (half the bytes a decode step reads), "
                        "activations and accumulation in fp32; a bfloat16 checkpoint stays exact as bfloat16, "
                        "float32 -> float16 rounds to nearest (values beyond its range are saturated and counted "
                        "in the log); embeddings and norms are kept as loaded (default: weights as loaded)")
    p.add_argument("--collectives", default="auto", choices=["auto", "shm", "gloo"],
                   help="how the TP ranks exchange tensors: auto = shared memory on the CPU, NCCL/gloo on GPUs; "
                        "shm = shared memory; gloo = torch.distributed gloo (default: auto)")
    p.add_argument("--moe-parallel", default=None, choices=["tp", "ep"],
                   help="MoE models: how the --tp ranks share the experts: tp = every expert's hidden units split "
                        "over them (like a dense MLP); ep = experts placed whole, each rank holding and loading "
                        "only num_experts/tp of them (they must divide), shared experts on every rank "
                        "(default: tp; ep in a DP group)")
    p.add_argument("--moe-dispatch", default=None, choices=["local", "all_to_all"],
                   help="with --moe-parallel ep: local = each rank computes its experts' share of the stage's "
                        "tokens and one all-reduce sums them (the fast path: a stage's ranks hold the same "
                        "tokens); all_to_all = tokens travel to their experts' ranks and back, the path for "
                        "ranks holding different tokens, for testing and debugging here (default: local; "
                        "all_to_all in a DP group)")
    dp = p.add_argument_group("data-parallel attention (MoE models)")
    dp.add_argument("--dp-size", type=int, default=1,
                    help="replicas in this stage's DP-attention group: each attends over its own requests with "
                         "its own KV cache, and the MoE layers of the same-position stages of all of them form one "
                         "expert-parallel group of dp-size x tp ranks (default: 1, no group)")
    dp.add_argument("--dp-rank", type=int, default=0, help="this stage's replica in the group, 0..dp-size-1")
    dp.add_argument("--dp-group", default="",
                    help="HOST:PORT where the group meets: every stage of every replica of the group gives the same "
                         "one; the stage at layer 0 of replica 0 listens there (TCP, so members may be in other "
                         "containers or hosts)")
    dp.add_argument("--collective-timeout", type=float, default=30.0,
                    help="seconds a collective of the DP group may take before the group counts as failed (a member "
                         "died or stalled): its replicas fail their requests and wait for the group to re-form "
                         "(default: 30)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once (replica head)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step (replica head); longer prompts are prefilled in chunks")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve this stage's Prometheus metrics on http://HOST:PORT/metrics (0 = pick a free port)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV block (the same on every stage of a pipeline)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn automatic prefix caching off (cached prompt blocks share the KV pool)")
    p.add_argument("--step-timeout", type=float, default=120.0,
                   help="seconds the replica head waits for a step's result before it fails the step's requests "
                        "(a stalled downstream stage; a dead one is noticed at once)")
    p.add_argument("--ready-file", default=None, help="write host:port here once serving")
    p.add_argument("--no-progress", action="store_true", help="no loading progress bar")
    sec = p.add_argument_group("security", "TLS between the mesh's processes and a shared token (README)")
    sec.add_argument("--tls-cert", default=None, metavar="PEM",
                     help="serve over TLS with this certificate; also shown to the stages this one dials")
    sec.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    sec.add_argument("--tls-ca", default=None, metavar="PEM",
                     help="require client certificates signed by this CA (mutual TLS); stages dialed are "
                     "checked against it too")
    sec.add_argument("--mesh-token-file", default=None, metavar="FILE",
                     help="refuse Stage API calls that do not carry the token in this file; send it to other stages")
    p.set_defaults(func=run)


def _kv_memory(text: str) -> dict:
    """``--kv-cache-memory``: a size, or a percentage of the memory free at start-up."""
    from stagekit.errors import ConfigError

    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 0.95:
            raise ConfigError(f"--kv-cache-memory {text}: a share must be between 0% and 95%")
        return {"kv_cache_memory_fraction": share}
    return {"kv_cache_memory_bytes": parse_bytes(text)}


def _moe_modes(args: argparse.Namespace, num_experts: int, model: str) -> tuple[str, str]:
    """``--moe-parallel`` / ``--moe-dispatch`` with their defaults; a DP group needs ep + all_to_all."""
    from stagekit.errors import ConfigError
    from stagekit.parallel.dp_rendezvous import parse_address

    if args.dp_size == 1:
        return args.moe_parallel or "tp", args.moe_dispatch or "local"
    if args.dp_size < 1:
        raise ConfigError(f"--dp-size {args.dp_size} must be at least 1")
    if not 0 <= args.dp_rank < args.dp_size:
        raise ConfigError(f"--dp-rank {args.dp_rank} must be in 0..{args.dp_size - 1} (--dp-size {args.dp_size})")
    if not args.dp_group:
        raise ConfigError("--dp-size > 1 needs --dp-group HOST:PORT, where the group's members meet")
    parse_address(args.dp_group)
    if not args.collective_timeout > 0:
        raise ConfigError(f"--collective-timeout {args.collective_timeout} must be a positive number of seconds")
    if num_experts == 0:
        raise ConfigError(f"--dp-size {args.dp_size}: {model} has no experts (a dense model): its replicas would "
                          "share nothing; run them as independent replicas (--dp-size 1)")
    if args.moe_parallel == "tp" or args.moe_dispatch == "local":
        raise ConfigError("a DP group places its experts over all its replicas' ranks and moves tokens to them: "
                          "--moe-parallel ep and --moe-dispatch all_to_all (the defaults with --dp-size > 1)")
    return "ep", "all_to_all"


def run(args: argparse.Namespace) -> int:
    from services.stage.server import run as serve
    from stagekit.config.model_config import load_model_config
    from stagekit.engine.stage_spec import StageSpec
    from stagekit.errors import ConfigError
    from stagekit.parallel.expert_placement import check_moe_parallel
    from stagekit.parallel.layout import StageLayout, parse_layers
    from stagekit.rpc.mesh_credentials import MeshCredentials

    try:
        cfg = load_model_config(args.model, args.model_name)
        start, end = parse_layers(args.layers, cfg.num_layers)
        StageLayout(start, end, cfg.num_layers, args.tp).validate(cfg.num_heads, cfg.num_kv_heads)
        moe_parallel, moe_dispatch = _moe_modes(args, cfg.num_experts, repr(cfg.name))
        check_moe_parallel(moe_parallel, cfg.num_experts, args.tp * args.dp_size, repr(cfg.name),
                           f"--dp-size {args.dp_size} x --tp {args.tp}" if args.dp_size > 1 else "")
        if not 1 <= args.block_size <= 256:
            raise ConfigError(f"--block-size {args.block_size} must be between 1 and 256 tokens")
        if not args.step_timeout > 0:
            raise ConfigError(f"--step-timeout {args.step_timeout} must be a positive number of seconds")
        cfg.torch_dtype(args.dtype)
        if args.weight_dtype and (args.dtype != "auto" and args.dtype != "float32"):
            raise ConfigError(f"--weight-dtype {args.weight_dtype} computes in float32: it does not go with "
                              f"--dtype {args.dtype}")
        if args.weight_dtype and args.linear_kernel in ("onednn", "dense"):
            raise ConfigError(f"--weight-dtype {args.weight_dtype} needs the panel kernel (--linear-kernel auto or "
                              f"panel), not --linear-kernel {args.linear_kernel}")
        if args.collectives == "shm" and args.tp > 1:
            from stagekit.parallel.communicator_choice import shm_usable

            if not shm_usable():
                raise ConfigError("--collectives shm: no shared-memory collectives on this machine (no C compiler "
                                  "and not x86); use --collectives gloo")
        if args.tls_ca is not None and args.tls_cert is None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: a stage asking for client certificates "
                              "serves over TLS and shows its own to the stages it dials")
        creds = MeshCredentials.from_files(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                                           token_file=args.mesh_token_file)
        spec = StageSpec(
            model_path=args.model, start_layer=start, end_layer=end, tp_size=args.tp, dtype=args.dtype,
            model_name=args.model_name, **_kv_memory(args.kv_cache_memory),
            num_threads=args.threads, show_progress=not args.no_progress, linear_kernel=args.linear_kernel,
            weight_dtype=args.weight_dtype or "",
            collectives=args.collectives, moe_parallel=moe_parallel, moe_dispatch=moe_dispatch,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size, prefix_caching=not args.no_prefix_caching,
            step_timeout_s=args.step_timeout, kv_prefault=args.kv_prefault, dp_group=args.dp_group,
            dp_rank=args.dp_rank, dp_size=args.dp_size, collective_timeout_s=args.collective_timeout,
        )
    except ConfigError as e:
        print(f"stagemesh stage: error: {e}", file=sys.stderr)
        return 2
    try:
        serve(spec, args.host, args.port, args.ready_file, args.transport, metrics_port=args.metrics_port,
              creds=creds)
    except ConfigError as e:
        print(f"stagemesh stage: error: {e}", file=sys.stderr)
        return 2
    return 0
