"""The demo checkpoint loads in transformers, is reproducible byte for byte, and is written atomically."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stagekit.config.model_config import load_model_config
from stagekit.demo import ARCHS, count_params, demo_config, param_shapes, write_demo_model
from stagekit.loader.safetensors_loader import load_weights
from stagekit.models.stage_model import StageModel
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups
from stagemesh.cli.demo_cmd import ARCH_CHOICES

SOLO = ParallelGroups(tp=GroupCoordinator([0], 0))

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
_EXPERT = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


def _in_memory(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """transformers 5 fuses experts in memory: expert N's gate and up are the two halves of
    ``mlp.experts.gate_up_proj[N]``, its down ``mlp.experts.down_proj[N]``; Mixtral's
    ``block_sparse_moe`` is ``mlp``."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = _EXPERT.match(name)
    if not m:
        return state[name]
    prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj in ("w2", "down_proj"):
        return state[f"{prefix}.mlp.experts.down_proj"][expert]
    gate, up = state[f"{prefix}.mlp.experts.gate_up_proj"][expert].chunk(2, dim=0)
    return gate if proj in ("w1", "gate_proj") else up


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("demo")
    return {arch: write_demo_model(base / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_transformers_and_runs(demo_dirs: dict[str, Path], arch: str) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(demo_dirs[arch], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == demo_config(arch)["architectures"][0]
    state = model.state_dict()
    for name, tensor in load_file(demo_dirs[arch] / "model.safetensors").items():
        assert torch.equal(_in_memory(state, name), tensor), name
    tok = transformers.AutoTokenizer.from_pretrained(demo_dirs[arch])
    ids = tok("The keeper made tea. 你好 🙂", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_files_and_config(demo_dirs: dict[str, Path], arch: str) -> None:
    names = {p.name for p in demo_dirs[arch].iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((demo_dirs[arch] / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["tie_word_embeddings"] is (arch in ("qwen2", "qwen3"))
    assert config["torch_dtype"] == "float32"
    tensors = load_file(demo_dirs[arch] / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == param_shapes(config)
    assert ("lm_head.weight" in tensors) is (not config["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) is (arch in ("qwen2", "qwen2_moe"))
    assert ("model.layers.0.self_attn.q_norm.weight" in tensors) is (arch in ("qwen3", "qwen3_moe"))
    experts = {n for n in tensors if ".experts." in n}
    assert len(experts) == (3 * 8 * config["num_hidden_layers"] if arch in MOE else 0)
    assert ("model.layers.0.mlp.shared_expert_gate.weight" in tensors) is (arch == "qwen2_moe")
    tok_config = json.loads((demo_dirs[arch] / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config
    vocab = json.loads((demo_dirs[arch] / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["vocab_size"] == len(vocab) == 1024


def test_same_seed_is_byte_identical_and_seed_changes_weights(tmp_path: Path) -> None:
    a = _hashes(write_demo_model(tmp_path / "a", seed=7))
    b = _hashes(write_demo_model(tmp_path / "b", seed=7))
    c = _hashes(write_demo_model(tmp_path / "c", seed=8))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert {k: v for k, v in a.items() if k != "model.safetensors"} == {
        k: v for k, v in c.items() if k != "model.safetensors"
    }


def test_byte_identical_across_processes(tmp_path: Path, demo_dirs: dict[str, Path]) -> None:
    """Rust hash seeds differ per process; tokenizer training must not depend on them."""
    code = "import sys; from stagekit.demo import write_demo_model; write_demo_model(sys.argv[1], 'qwen2', 0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], check=True, cwd=ROOT, timeout=120)
    assert _hashes(tmp_path / "m") == _hashes(demo_dirs["qwen2"])


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    target = tmp_path / "model"
    write_demo_model(target, seed=1)
    (target / "stale.txt").write_text("old")
    write_demo_model(target, seed=2)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_rejects_unknown_arch_and_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama, qwen2"):
        write_demo_model(tmp_path / "x", arch="mistral")
    with pytest.raises(ValueError, match="tiny, small"):
        demo_config("llama", "huge")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_stagekit_loads_the_demo(demo_dirs: dict[str, Path], arch: str) -> None:
    cfg = load_model_config(demo_dirs[arch])
    assert (cfg.num_experts, cfg.num_experts_per_tok) == ((8, 2) if arch in MOE else (0, 0))
    model = StageModel(cfg, StageLayout(0, cfg.num_layers, cfg.num_layers), SOLO, torch.float32)
    load_weights(model, show_progress=False)


def test_cli_offers_every_arch() -> None:
    assert tuple(ARCH_CHOICES) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_small_size_shape_without_writing(arch: str) -> None:
    config = demo_config(arch, "small")
    assert config["hidden_size"] == 768 and config["num_hidden_layers"] == 12
    assert config["vocab_size"] == 32000
    n = count_params(config)
    # MoE: 8 experts of 1024 hidden units per layer, ~100M of them active per token
    assert (250e6 < n < 400e6) if arch in MOE else (90e6 < n < 130e6)
    # Cross-check the shape-based count against transformers' own model skeleton (no weights allocated).
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == n
