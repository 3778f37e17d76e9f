"""The lean decode step: a dense Llama-family decoder layer in one native call per decode step
(stagekit/kernels/fused_layer.c) instead of dozens of small torch ops and one packed-linear
call per projection.

``run`` is the layer-level switch. It takes a step only when every sequence adds one token,
on the CPU, with the layer's four projections panel-packed (``--linear-kernel panel``, or
``auto`` up to its panel crossover), fp32 activations and KV cache, no per-head q/k norm and
a gated-SiLU MLP; it returns None otherwise and the layer runs its usual modules. With TP > 1
the layer is two native calls, the attention half and the MLP half, with the group's
all-reduces between them. ``STAGEMESH_FUSED_LAYER=0`` turns it off (and the MoE layers'
native experts call with it, kernels/moe_experts.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from stagekit.kernels import fused_layer as fl
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.layers.activation import SiluAndMul
from stagekit.layers.mlp import GatedMLP

log = logging.getLogger(__name__)

ENV = fl.ENV

_announced: list[bool] = []
_scratch: dict[tuple[int, ...], fl.Scratch] = {}  # reused by every step's layers of that shape


def enabled() -> bool:
    return fl.enabled()


class _Plan:
    """A layer's fused form, for the packed weights it was built from (``key``, the QKV
    projection's CpuLinearWeight); ``weights`` is None where the layer does not fit the kernel.
    ``max_rows``: the most tokens per step for which its projections use panels at all (beyond,
    the usual path keeps oneDNN)."""

    def __init__(self, layer: nn.Module, weights: fl.FusedLayerWeights | None = None, max_rows: int = 0) -> None:
        attn = layer.self_attn
        self.qkv = attn.qkv_proj
        self.key = self.qkv.cpu_weight
        self.weights, self.max_rows = weights, max_rows
        self.group, self.kv_layer, self.o_bias = self.qkv.group, attn.attn.layer_idx, attn.o_proj.bias


def _build(layer: nn.Module) -> _Plan:
    attn = layer.self_attn
    mlp = getattr(layer, layer.mlp_name)
    if (not isinstance(mlp, GatedMLP) or not isinstance(mlp.act_fn, SiluAndMul) or not mlp.down_proj.reduce_results
            or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None or attn.q_norm is not None
            or layer.input_layernorm.eps != layer.post_attention_layernorm.eps or not fl.native_available()):
        return _Plan(layer)
    projs = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    packed = [p.cpu_weight for p in projs]
    if any(c is None or c.panels is None for c in packed):
        return _Plan(layer)
    tp = attn.qkv_proj.group.world_size
    rot = attn.rotary_emb
    try:
        weights = fl.FusedLayerWeights(
            hidden=layer.input_layernorm.weight.numel(), num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, intermediate=mlp.down_proj.input_size_per_partition,
            eps=layer.input_layernorm.eps, scale=attn.attn.scale, norm1=layer.input_layernorm.weight.data,
            norm2=layer.post_attention_layernorm.weight.data, qkv=packed[0].panels,
            qkv_bias=None if attn.qkv_proj.bias is None else attn.qkv_proj.bias.data, o=packed[1].panels,
            o_bias=None if attn.o_proj.bias is None or tp > 1 else attn.o_proj.bias.data, gate_up=packed[2].panels,
            down=packed[3].panels, cos=rot.cos, sin=rot.sin)
    except ValueError as e:
        log.info("decoder layer keeps the unfused decode path: %s", e)
        return _Plan(layer)
    if not _announced:
        _announced.append(True)
        log.info("decode steps run the fused decoder layer (one native call per layer; %s=0 turns it off)", ENV)
    return _Plan(layer, weights, min(c.panel_max_m if c.onednn is not None else 1 << 30 for c in packed))


class _StepState:
    """What the layers of one step share: whether the fused path is on for it (read once per
    step) and its DecodeStep per layer shape."""

    def __init__(self, batch: ForwardBatch) -> None:
        kv = batch.kv_cache
        self.batch = batch
        self.on = (enabled() and batch.decode_rows is None and not batch.prefills and batch.num_decodes > 0
                   and kv.dtype == torch.float32 and kv.device.type == "cpu" and fl.native_available())
        self.steps: dict[tuple[int, ...], fl.DecodeStep] = {}

    def step(self, weights: fl.FusedLayerWeights) -> fl.DecodeStep:
        step = self.steps.get(weights.dims)
        if step is None:
            b = self.batch
            scratch = _scratch.setdefault(weights.dims, fl.Scratch(weights.dims))
            step = fl.DecodeStep(b.positions, b.write_blocks, b.write_rows, b.decode_tables, b.decode_lens,
                                 b.kv_cache.kv, scratch)
            self.steps[weights.dims] = step
        return step


_last: _StepState | None = None  # the step the last call prepared: every layer of a step shares it


def run(layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
        batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's (hidden, residual) outputs for a decode step through the native kernel, or
    None where it does not apply (the caller runs the layer's modules)."""
    global _last
    state = _last
    if state is None or state.batch is not batch:
        state = _last = _StepState(batch)
    if not state.on or hidden.dtype != torch.float32 or hidden.shape[0] != batch.num_decodes:
        return None
    plan = layer.__dict__.get("_fused_plan")
    if plan is None or plan.key is not plan.qkv.cpu_weight:
        plan = _build(layer)
        layer.__dict__["_fused_plan"] = plan
    weights = plan.weights
    if weights is None or hidden.shape[0] > plan.max_rows:
        return None
    step = state.step(weights)
    if not step.fits(weights):
        return None
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    if plan.group.world_size == 1:
        return step.run(weights, plan.kv_layer, hidden, residual)
    o, residual = step.run(weights, plan.kv_layer, hidden, residual, fl.ATTENTION)
    o = plan.group.all_reduce(o)
    if plan.o_bias is not None:
        o = o + plan.o_bias
    out, residual = step.run(weights, plan.kv_layer, o, residual, fl.MLP)
    return plan.group.all_reduce(out), residual
