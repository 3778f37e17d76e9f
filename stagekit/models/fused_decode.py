"""The lean decode step: a dense Llama-family decoder layer in one native call per decode step
(stagekit/kernels/fused_layer.c) instead of dozens of small torch ops and one packed-linear
call per projection.

``run`` is the layer-level switch. It takes a step only when every sequence adds one token,
on the CPU, with the layer's attention projections panel-packed (``--linear-kernel panel`` or
``auto``), fp32 activations and KV cache and no per-head q/k norm;
it returns None otherwise and the layer runs its usual modules. ``_build`` decides once per
layer how much of it the kernel runs: the whole layer where the MLP is a gated-SiLU GatedMLP
with panel-packed weights too, else (a MoE block, or an MLP that fails those checks) the
attention half only, after which the layer's own post-attention norm and MLP module run here.
With TP > 1 the attention half and the MLP half are separate native calls with the group's
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

_announced: set[str] = set()
_scratch: dict[tuple[int, ...], fl.Scratch] = {}  # reused by every step's layers of that shape


class _Plan:
    """A layer's fused form, for the packed weights it was built from (``key``, the QKV
    projection's CpuLinearWeight); ``weights`` is None where the layer does not fit the kernel.
    ``mlp`` is None where the kernel runs the whole layer, else the module that runs after the
    kernel's attention half (``weights.has_mlp`` is False then)."""

    def __init__(self, layer: nn.Module, weights: fl.FusedLayerWeights | None = None,
                 mlp: nn.Module | None = None) -> None:
        attn = layer.self_attn
        self.qkv = attn.qkv_proj
        self.key = self.qkv.cpu_weight
        self.weights, self.mlp = weights, mlp
        self.post_norm = layer.post_attention_layernorm
        self.group, self.kv_layer, self.o_bias = self.qkv.group, attn.attn.layer_idx, attn.o_proj.bias


def _packed(*projs: nn.Module) -> bool:
    return all(p.cpu_weight is not None and p.cpu_weight.panels is not None for p in projs)


def _mlp_fuses(layer: nn.Module, mlp: nn.Module) -> bool:
    """Whether the kernel's MLP half computes this MLP: gated SiLU, no biases, its own
    all-reduce, the same eps in both norms, panel-packed weights."""
    return (isinstance(mlp, GatedMLP) and isinstance(mlp.act_fn, SiluAndMul) and mlp.down_proj.reduce_results
            and mlp.gate_up_proj.bias is None and mlp.down_proj.bias is None
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps
            and _packed(mlp.gate_up_proj, mlp.down_proj))


def _build(layer: nn.Module) -> _Plan:
    """The one place that decides: the whole layer fused, its attention half fused, or neither."""
    attn = layer.self_attn
    if attn.q_norm is not None or not fl.native_available() or not _packed(attn.qkv_proj, attn.o_proj):
        return _Plan(layer)
    mlp = getattr(layer, layer.mlp_name)
    whole = _mlp_fuses(layer, mlp)
    projs = (attn.qkv_proj, attn.o_proj) + ((mlp.gate_up_proj, mlp.down_proj) if whole else ())
    packed = [p.cpu_weight for p in projs]
    tp = attn.qkv_proj.group.world_size
    rot = attn.rotary_emb
    try:
        weights = fl.FusedLayerWeights(
            hidden=layer.input_layernorm.weight.numel(), num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, intermediate=mlp.down_proj.input_size_per_partition if whole else 0,
            eps=layer.input_layernorm.eps, scale=attn.attn.scale, norm1=layer.input_layernorm.weight.data,
            norm2=layer.post_attention_layernorm.weight.data if whole else None, qkv=packed[0].panels,
            qkv_bias=None if attn.qkv_proj.bias is None else attn.qkv_proj.bias.data, o=packed[1].panels,
            o_bias=None if attn.o_proj.bias is None or tp > 1 else attn.o_proj.bias.data,
            gate_up=packed[2].panels if whole else None, down=packed[3].panels if whole else None,
            cos=rot.cos, sin=rot.sin)
    except ValueError as e:
        log.info("decoder layer keeps the unfused decode path: %s", e)
        return _Plan(layer)
    what = "decoder layer (one native call per layer)" if whole else "attention half of layers whose MLP it cannot run"
    if what not in _announced:
        _announced.add(what)
        log.info("decode steps run the fused %s; %s=0 turns it off", what, ENV)
    return _Plan(layer, weights, None if whole else mlp)


class _StepState:
    """What the layers of one step share: whether the fused path is on for it (read once per
    step) and its DecodeStep per layer shape."""

    def __init__(self, batch: ForwardBatch) -> None:
        kv = batch.kv_cache
        self.batch = batch
        self.on = (fl.enabled() and batch.decode_rows is None and not batch.prefills and batch.num_decodes > 0
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
    if weights is None:
        return None
    step = state.step(weights)
    if not step.fits(weights):
        return None
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    if plan.mlp is None and plan.group.world_size == 1:
        return step.run(weights, plan.kv_layer, hidden, residual)
    o, residual = step.run(weights, plan.kv_layer, hidden, residual, fl.ATTENTION)
    if plan.group.world_size > 1:  # the kernel left out the o bias: it is added once, after the sum
        o = plan.group.all_reduce(o)
        if plan.o_bias is not None:
            o = o + plan.o_bias
    if plan.mlp is not None:  # e.g. a MoE block: the layer's own modules, as LlamaDecoderLayer.forward runs them
        hidden, residual = plan.post_norm(o, residual)
        return plan.mlp(hidden), residual
    out, residual = step.run(weights, plan.kv_layer, o, residual, fl.MLP)
    return plan.group.all_reduce(out), residual
