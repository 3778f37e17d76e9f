"""Generate the Python gRPC modules from protos/ (the only way they are made).

The proto files live under protos/ at the path of their generated modules
(protos/stagekit/rpc/pb/x.proto -> stagekit/rpc/pb/x_pb2.py), so protoc's imports
resolve as package imports with no patching.

Run by hand (`make protos`, into the source tree) and by the build hook in setup.py
(`pip install .`, `pip install -e .`, `python -m build`), which imports this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

# what protoc writes for x.proto: messages, their type stubs, the gRPC stubs
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources(root: Path) -> list[Path]:
    """The .proto files under root/protos, relative to root/protos (= the path of their modules)."""
    proto_root = root / "protos"
    return [src.relative_to(proto_root) for src in sorted(proto_root.rglob("*.proto"))]


def generated_files(root: Path) -> list[Path]:
    """The files generate() writes, relative to its output directory."""
    return [rel.with_name(rel.stem + suffix) for rel in proto_sources(root) for suffix in SUFFIXES]


def generate(root: Path, out: Path | None = None) -> list[Path]:
    """Compile root/protos/**/*.proto into out (default: root, the source tree); returns the sources."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency

    proto_root = root / "protos"
    out = root if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = proto_sources(root)
    for rel in sources:
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
    return [proto_root / rel for rel in sources]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    for s in generate(root):
        print(f"generated {s.relative_to(root / 'protos')}")
