"""``stagemesh demo-model``: write a small random-weight HF checkpoint with a real tokenizer."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-model", help="write a small random-weight model in HF format")
    p.add_argument("dir", help="output directory (replaced if it exists)")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=["tiny", "small"],
                   help="tiny: a few hundred thousand parameters; small: ~125M (benchmarks)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagekit.demo import write_demo_model

    path = write_demo_model(args.dir, arch=args.arch, seed=args.seed, size=args.size)
    print(path)
    return 0
