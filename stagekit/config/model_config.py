"""The decoder model's hyper-parameters, read from an HF ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagekit.config.architectures import ARCHITECTURES, MoeFields
from stagekit.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything a stage needs to build its layers (architecture-independent names)."""

    path: str
    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    checkpoint_dtype: str
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    sliding_window: int | None = None
    o_bias: bool = False
    qk_norm: bool = False
    # MoE (num_experts == 0: a dense model); the family's rules come from its MoeFields
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    routing_weights_fp32: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # the whole config.json as read, for family-specific fields the typed ones do not cover
    hf_config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_model_len(self) -> int:
        """Longest sequence served exactly: full attention is only equal to sliding-window
        attention while the sequence fits in the window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, int(self.sliding_window))
        return self.max_position_embeddings

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether global layer ``layer_idx`` is a MoE block (transformers' rule)."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def torch_dtype(self, requested: str = "auto") -> torch.dtype:
        """``auto`` takes the checkpoint's dtype (fp32 when it names none)."""
        name = self.checkpoint_dtype if requested == "auto" else requested
        if name not in DTYPES:
            raise ConfigError(f"unsupported dtype {name!r} (use auto, float32, bfloat16 or float16)")
        return DTYPES[name]


def _as_list(x: object) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, list) else [int(x)]


def load_model_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` for EOS ids) from an HF model
    directory; ConfigError names what is missing or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model directory {str(root)!r} does not exist")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model directory {str(root)!r} has no config.json")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    num_heads = int(cfg["num_attention_heads"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    eos = _as_list(cfg.get("eos_token_id"))
    gen_file = root / "generation_config.json"
    if gen_file.is_file():
        eos += [i for i in _as_list(json.loads(gen_file.read_text()).get("eos_token_id")) if i not in eos]
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    family = ARCHITECTURES[arch]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", family.sliding_window_default) else None
    return ModelConfig(
        path=str(root.resolve()),
        name=name or root.resolve().name,
        architecture=arch,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.has_qkv_bias(cfg),
        checkpoint_dtype=dtype if dtype in DTYPES else "float32",
        eos_token_ids=eos,
        bos_token_id=cfg.get("bos_token_id"),
        sliding_window=window,
        o_bias=family.o_bias and family.has_qkv_bias(cfg),
        qk_norm=family.qk_norm,
        **_moe_fields(family.moe, cfg),
        hf_config=cfg,
    )


def _moe_fields(moe: MoeFields | None, cfg: dict) -> dict:
    if moe is None:
        return {}
    num_experts = int(next((cfg[k] for k in moe.num_experts_keys if cfg.get(k) is not None), 0))
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if num_experts and not 0 < top_k <= num_experts:
        raise ConfigError(f"num_experts_per_tok {top_k} must be in 1..{num_experts} (the number of experts)")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(cfg[moe.intermediate_key]),
        shared_expert_intermediate_size=int(cfg.get(moe.shared_expert_key) or 0) if moe.shared_expert_key else 0,
        norm_topk_prob=True if moe.norm_topk_prob_key is None else bool(cfg.get(moe.norm_topk_prob_key, False)),
        routing_weights_fp32=moe.weights_fp32,
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1) if moe.sparse_step else 1,
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()) if moe.sparse_step else (),
    )
