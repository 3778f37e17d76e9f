"""Write a small random-weight checkpoint in HF layout (config.json, model.safetensors, tokenizer files).

Why: every service in the mesh loads real HF-format checkpoints, and tests and demos need one that exists
offline, is tiny enough for CI, and is bit-for-bit reproducible so that parity tests between layouts can
compare numbers across processes. The weights are written with torch + safetensors only (no transformers
at runtime) and the directory appears atomically, so a reader never sees a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stagekit.demo.bpe import token_settings, trained_vocab_size, write_tokenizer_files
from stagekit.demo.families import ARCH_CLASS, TOKENIZER, family_config, ffn_shapes, has_qk_norm, has_qkv_bias

ARCHS: tuple[str, ...] = tuple(ARCH_CLASS)
SIZES: tuple[str, ...] = ("tiny", "small")
_SHAPES: dict[str, dict[str, int | None]] = {
    # vocab None means "the trained tokenizer's vocab size".
    "tiny": {"hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 176, "vocab": None},
    "small": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 32000},
}
_INIT_STD = 0.02
_NORM_JITTER = 0.05  # norms are 1 + small noise so that a loader ignoring them is caught by parity tests


def _check(arch: str, size: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown demo arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; allowed: {', '.join(SIZES)}")


def demo_config(arch: str = "llama", size: str = "tiny") -> dict[str, Any]:
    """The config.json content for a demo model, in the HF format of the named architecture."""
    _check(arch, size)
    shape = _SHAPES[size]
    hidden, heads = int(shape["hidden"] or 0), int(shape["heads"] or 0)
    tokens = token_settings(TOKENIZER[arch])
    config: dict[str, Any] = {
        "architectures": [ARCH_CLASS[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "vocab_size": shape["vocab"] or trained_vocab_size(TOKENIZER[arch]),
        "bos_token_id": tokens["config_bos_token_id"],
        "eos_token_id": tokens["eos_token_id"],
        "initializer_range": _INIT_STD,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    config.update(family_config(arch, size, int(shape["layers"] or 0)))
    return config


def param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes for a config from :func:`demo_config`, in a fixed (generation) order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    with_bias, qk_norm = has_qkv_bias(config), has_qk_norm(config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[f"{p}.self_attn.{name}_proj.weight"] = (out, hidden)
            if with_bias:
                shapes[f"{p}.self_attn.{name}_proj.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, q_out)
        if qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes.update(ffn_shapes(config, p))
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def count_params(config: dict[str, Any]) -> int:
    """Parameter count from shapes alone, so the large size can be checked without materialising it."""
    total = 0
    for shape in param_shapes(config).values():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """normal(0, 0.02) matrices and biases, 1 + jitter norms, drawn in a fixed order from one generator."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        t = torch.empty(shape, dtype=torch.float32)
        if "norm" in name:
            t.normal_(1.0, _NORM_JITTER, generator=gen)
        else:
            t.normal_(0.0, _INIT_STD, generator=gen)
        tensors[name] = t
    return tensors


def generation_config(tokenizer: str) -> dict[str, Any]:
    """generation_config.json content: the eos list stops generation at both end-of-text and end-of-turn."""
    tokens = token_settings(tokenizer)
    out: dict[str, Any] = {"bos_token_id": tokens["config_bos_token_id"]}
    out["eos_token_id"] = tokens["generation_eos_token_ids"]
    if tokens["pad_token_id"] is not None:
        out["pad_token_id"] = tokens["pad_token_id"]
    return out


def write_demo_model(path: str | Path, arch: str = "llama", seed: int = 0, size: str = "tiny") -> Path:
    """Write the demo checkpoint to ``path`` (replacing what is there) and return the path.

    Files are written into a temporary sibling directory that is renamed into place at the end.
    """
    _check(arch, size)
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        config = demo_config(arch, size)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(TOKENIZER[arch]))
        write_tokenizer_files(tmp, TOKENIZER[arch], config["vocab_size"])
        save_file(random_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _make_readable(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 and safetensors writes 0600; give the usual umask-based modes so other users
    (e.g. services in other containers sharing a volume) can read the checkpoint."""
    umask = _current_umask()
    os.chmod(directory, 0o777 & ~umask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _current_umask() -> int:
    """Read the umask without os.umask(), which would briefly change it for every thread in the process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is renamed aside first and removed afterwards."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
