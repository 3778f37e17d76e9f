"""``stagemesh demo-model``: write a small random-weight HF checkpoint with a real tokenizer."""

from __future__ import annotations

import argparse

# stagekit.demo.ARCHS (not imported here: it pulls in torch, and the CLI starts without it)
ARCH_CHOICES = ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write a small random-weight model in HF format")
    p.add_argument("dir", help="output directory (replaced if it exists)")
    p.add_argument("--arch", default="llama", choices=ARCH_CHOICES,
                   help="mixtral, qwen2_moe and qwen3_moe are mixture-of-experts models (8 experts, top-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"],
                   help="tiny: a few hundred thousand parameters; small: ~100M dense, ~300-350M MoE "
                        "(~100M active per token; benchmarks)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagekit.demo import write_demo_model

    path = write_demo_model(args.dir, arch=args.arch, seed=args.seed, size=args.size)
    print(path)
    return 0
