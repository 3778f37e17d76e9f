"""The part of a decoder LLM one stage holds, for every model family.

The first/last-stage logic lives here once: the first stage embeds token ids, the last
applies the final norm and the LM head; stages in between take and return
IntermediateTensors. Parameter names match the HF checkpoint (``model.layers.<global
index>...``) so the loader maps names without knowing the layout.
"""

from __future__ import annotations

import torch
from torch import nn

from stagekit.config.model_config import ModelConfig
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from stagekit.layers.norm import RMSNorm
from stagekit.models.registry import decoder_layer_class
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.types.step import IntermediateTensors


class StageModel(nn.Module):
    """Layers ``[layout.start_layer, layout.end_layer)`` of ``cfg``'s model on one TP rank.
    Every layer is built with the rank's ``groups``: decoder layers take them all (a family
    with experts needs ``groups.ep``), the embedding and head take ``groups.tp``."""

    def __init__(self, cfg: ModelConfig, layout: StageLayout, groups: ParallelGroups, dtype: torch.dtype) -> None:
        super().__init__()
        layout.validate(cfg.num_heads, cfg.num_kv_heads)
        self.cfg, self.layout, self.dtype = cfg, layout, dtype
        layer_cls = decoder_layer_class(cfg.architecture)
        self.packed_modules_mapping: dict = layer_cls.packed_modules_mapping
        self.model = nn.Module()
        if layout.is_first:
            self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, groups.tp, dtype)
        self.model.layers = nn.ModuleDict({
            str(i): layer_cls(cfg, groups, i, i - layout.start_layer, dtype)
            for i in range(layout.start_layer, layout.end_layer)
        })
        if layout.is_last:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, groups.device)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, groups.tp, dtype)

    def forward(
        self, batch: ForwardBatch, input_ids: torch.Tensor | None = None,
        intermediate: IntermediateTensors | None = None,
    ) -> IntermediateTensors:
        if self.layout.is_first:
            assert input_ids is not None
            hidden, residual = self.model.embed_tokens(input_ids), None  # [T, hidden]
        else:
            assert intermediate is not None
            hidden, residual = intermediate.hidden_states, intermediate.residual
        for layer in self.model.layers.values():
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        return IntermediateTensors(hidden, residual)

    def compute_logits(self, states: IntermediateTensors, indices: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head for the tokens at ``indices``: [len(indices), vocab] in fp32."""
        hidden = states.hidden_states[indices]
        residual = None if states.residual is None else states.residual[indices]
        normed = self.model.norm(hidden) if residual is None else self.model.norm(hidden, residual)[0]
        return self.lm_head.compute_logits(normed).float()
