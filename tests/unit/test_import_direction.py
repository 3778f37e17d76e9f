"""The layering holds: stagekit (core) <- services <- gateway; stagemesh (CLI) on top.
The gateway reaches stages only over gRPC, so it never imports services. Inside stagekit
the packages form one order, bottom first (STAGEKIT_ORDER): a module imports only from
its own package and from those below it, so no two packages import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "stagekit": {"services", "gateway", "stagemesh"},
    "services": {"gateway", "stagemesh"},
    "gateway": {"services", "stagemesh"},
}

# bottom first; docs/ARCHITECTURE.md's package map draws the same order
STAGEKIT_ORDER = [
    "errors", "ports", "processes", "types", "config", "kernels", "parallel", "kv", "layers", "models", "loader",
    "rpc", "transport", "engine", "tokenizer", "client", "demo", "testing",
]


def _stagekit_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for m in mods:
            parts = m.split(".")
            if parts[0] == "stagekit" and len(parts) > 1:
                names.add(parts[1])
    return names


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        hit = _imports(path) & FORBIDDEN[package]
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_stagekit_packages_import_only_downwards() -> None:
    root = ROOT / "stagekit"
    found = {p.stem if p.is_file() else p.name for p in root.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert found <= set(STAGEKIT_ORDER), f"place {sorted(found - set(STAGEKIT_ORDER))} in STAGEKIT_ORDER"
    rank = {name: i for i, name in enumerate(STAGEKIT_ORDER)}
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for dep in sorted(_stagekit_imports(path)):
            if dep != own and dep in rank and rank[dep] > rank[own]:
                bad.append(f"stagekit/{rel} ({own}) imports stagekit.{dep}, which sits above it")
    assert not bad, "\n".join(bad)
