"""House rules for the gateway package: it reaches stages only over gRPC, protobuf stays at the edge."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

GATEWAY_DIR = Path(gateway.__file__).parent
PB_ALLOWED = {"stage_proto.py", "replica.py", "rpc/generation_proto.py", "rpc/servicer.py", "rpc/server.py"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_gateway_imports() -> None:
    for path in sorted(GATEWAY_DIR.rglob("*.py")):
        name = path.relative_to(GATEWAY_DIR).as_posix()
        modules = imported_modules(path)
        assert not any(m == "services" or m.startswith("services.") for m in modules), name
        assert not any(m.startswith("tests") for m in modules), name
        if name not in PB_ALLOWED:
            assert not any("_pb2" in m for m in modules), f"{name} touches protobuf"


def test_file_sizes() -> None:
    for path in GATEWAY_DIR.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
