from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# subprocesses (stages, gateway) import the project from the checkout too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.helpers.checkpoints import build_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {arch: build_checkpoint(arch, root) for arch in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Mixtral, Qwen2-MoE, Qwen3-MoE and dense Qwen3 (tests/helpers/checkpoints.py MOE_ARCHS)."""
    from tests.helpers.checkpoints import MOE_ARCHS, build_checkpoint

    root = tmp_path_factory.mktemp("hf-moe")
    return {arch: build_checkpoint(arch, root) for arch in MOE_ARCHS}
