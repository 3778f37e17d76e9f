"""Load a StageModel's shard from an HF directory of ``*.safetensors`` files.

Each rank opens only the files that hold tensors of its layer range (through
``model.safetensors.index.json`` when present) and reads only its slice of each tensor
(``get_slice``), so a TP×PP layout never materialises the whole model in one process.
MoE experts are read per expert (``...experts.N.gate_proj.weight``, the names on the Hub
and those ``save_pretrained`` writes): a rank reads only the experts it holds.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from stagekit.errors import ConfigError
from stagekit.layers.weight_source import SafetensorsSource, default_weight_loader
from stagekit.models.stage_model import StageModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")
# transformers' in-memory layout, written only with save_pretrained(save_original_format=False)
_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)(\.weight)?$")


def checkpoint_files(root: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or by listing every safetensors file."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model directory {str(root)!r} has no *.safetensors files")
    names: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            names.update({k: f.name for k in st.keys()})
    return names


def expert_tensors(model: StageModel) -> dict[str, tuple[str, object]]:
    """Checkpoint name -> (parameter, shard id) of every expert tensor this rank holds: the
    modules that hold experts list them (only their local experts)."""
    out: dict[str, tuple[str, object]] = {}
    for prefix, module in model.named_modules():
        listing = getattr(module, "checkpoint_tensors", None)
        if callable(listing):
            out.update(listing(prefix))
    return out


def _check_expert_names(model: StageModel, names: dict[str, str], experts: dict[str, tuple[str, object]]) -> None:
    fused = sorted(n for n in names if _FUSED_EXPERTS.search(n))
    if fused:
        raise ConfigError(
            f"checkpoint {model.cfg.path!r} stores MoE experts fused ({', '.join(fused[:3])}"
            + (" ..." if len(fused) > 3 else "") + "); stagemesh reads per-expert tensors "
            "(experts.N.gate_proj.weight ...): save the model with save_pretrained's default "
            "save_original_format=True"
        )
    missing = sorted(n for n in experts if n not in names)
    if missing:
        raise ConfigError(
            f"checkpoint {model.cfg.path!r} is missing expert tensors: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )


def _targets(model: StageModel, name: str, experts: dict[str, tuple[str, object]]) -> list[tuple[str, object]]:
    """Our parameter name(s) (and shard id) that checkpoint tensor ``name`` feeds."""
    layout, cfg = model.layout, model.cfg
    m = _LAYER.match(name)
    if m:
        if not layout.start_layer <= int(m.group(1)) < layout.end_layer:
            return []
        if _EXPERT.search(name):  # an expert held elsewhere is not read at all
            return [experts[name]] if name in experts else []
        for frag, (fused, shard_id) in model.packed_modules_mapping.items():
            if f".{frag}." in name:
                return [(name.replace(f".{frag}.", f".{fused}."), shard_id)]
        return [(name, None)]
    out: list[tuple[str, object]] = []
    if name == "model.embed_tokens.weight":
        if layout.is_first:
            out.append((name, None))
        if layout.is_last and cfg.tie_word_embeddings:
            out.append(("lm_head.weight", None))
    elif name in ("model.norm.weight", "lm_head.weight") and layout.is_last:
        out.append((name, None))
    return out


def load_weights(model: StageModel, show_progress: bool = True) -> None:
    """Fill every parameter of ``model`` from its checkpoint; ConfigError names any
    tensor the checkpoint lacks."""
    root = Path(model.cfg.path)
    params = dict(model.named_parameters())
    plan: dict[str, list[tuple[str, str, object]]] = defaultdict(list)  # file -> (ckpt, param, shard)
    names = checkpoint_files(root)
    experts = expert_tensors(model)
    _check_expert_names(model, names, experts)
    for ckpt_name, file in names.items():
        for param_name, shard_id in _targets(model, ckpt_name, experts):
            if param_name in params:
                plan[file].append((ckpt_name, param_name, shard_id))
    loaded: set[tuple[str, object]] = set()
    total = sum(len(v) for v in plan.values())
    with tqdm(total=total, desc=f"loading layers {model.layout.start_layer}:{model.layout.end_layer}",
              unit="tensor", file=sys.stderr, disable=not show_progress) as bar:
        for file, items in sorted(plan.items()):
            with safe_open(root / file, framework="pt", device="cpu") as st:
                for ckpt_name, param_name, shard_id in items:
                    param = params[param_name]
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    loader(param, SafetensorsSource(st.get_slice(ckpt_name)), shard_id)
                    loaded.add((param_name, shard_id))
                    bar.update(1)
    _check_complete(model, params, loaded)


def _required_shards(name: str, param: object) -> set:
    """The shard ids that must all be loaded before ``param`` is complete."""
    declared = getattr(param, "required_shards", None)
    if declared is not None:
        return set(declared)
    if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
        return {"q", "k", "v"}
    if "gate_up_proj" in name:
        return {0, 1}
    return {None}


def _check_complete(model: StageModel, params: dict, loaded: set[tuple[str, object]]) -> None:
    missing = [name for name, param in params.items()
               if not all((name, shard) in loaded for shard in _required_shards(name, param))]
    if missing:
        raise ConfigError(
            f"checkpoint {model.cfg.path!r} is missing tensors for: {', '.join(sorted(missing)[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
