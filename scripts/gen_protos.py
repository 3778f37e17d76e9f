"""Generate the Python gRPC modules from protos/ (the only way they are made).

The proto files live under protos/ at the path of their generated modules
(protos/stagekit/rpc/pb/x.proto -> stagekit/rpc/pb/x_pb2.py), so protoc's imports
resolve as package imports with no patching.
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency

    proto_root = root / "protos"
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(proto_root.rglob("*.proto"))
    for src in sources:
        rel = src.relative_to(proto_root)
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
    return sources


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    for s in generate(root):
        print(f"generated {s.relative_to(root / 'protos')}")
