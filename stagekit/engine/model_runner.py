"""One TP rank's share of a stage: the sharded model and its KV cache. Every rank of the
stage calls ``run`` with the same arguments each step; collectives inside the layers keep
them in lockstep."""

from __future__ import annotations

import torch

from stagekit.config.model_config import load_model_config
from stagekit.engine.forward_batch import ForwardBatch, SeqSlice
from stagekit.engine.kv_cache import KVCache
from stagekit.engine.prefix_cache import PrefixOps
from stagekit.engine.prefix_store import PrefixStore
from stagekit.engine.stage_spec import StageSpec
from stagekit.layers.cpu_packed import pack_model_weights
from stagekit.loader.safetensors_loader import load_weights
from stagekit.models.stage_model import IntermediateTensors, StageModel
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout


class ModelRunner:
    """Builds the shard from a StageSpec and runs forward passes over it."""

    def __init__(self, spec: StageSpec, group: GroupCoordinator) -> None:
        if spec.num_threads > 0:
            torch.set_num_threads(spec.num_threads)
        self.cfg = load_model_config(spec.model_path, spec.model_name)
        self.layout = StageLayout(spec.start_layer, spec.end_layer, self.cfg.num_layers, spec.tp_size)
        self.layout.validate(self.cfg.num_heads, self.cfg.num_kv_heads)
        self.dtype = self.cfg.torch_dtype(spec.dtype)
        self.group = group
        self.model = StageModel(self.cfg, self.layout, group, self.dtype)
        load_weights(self.model, show_progress=spec.show_progress and group.is_first_rank)
        if spec.linear_kernel == "auto":
            pack_model_weights(self.model)
        num_kv_heads = max(1, self.cfg.num_kv_heads // spec.tp_size)
        self.kv_cache = KVCache(
            self.layout.num_local_layers, num_kv_heads, self.cfg.head_dim, self.dtype, group.device, 0
        )
        self.kv_cache.capacity_tokens = spec.kv_cache_memory_bytes // self.kv_cache.bytes_per_token()
        self.prefix_store = PrefixStore(self.kv_cache, spec.prefix_cache_memory_bytes)

    @torch.inference_mode()
    def run(
        self, seqs: list[SeqSlice], freed: list[int], input_ids: list[int] | None,
        intermediate: IntermediateTensors | None, prefix: PrefixOps | None = None,
    ) -> IntermediateTensors | torch.Tensor | None:
        """Apply the prefix-cache commands around freeing ``freed``, then run the step.
        Returns IntermediateTensors, or on the last stage the fp32 logits of the sampled
        sequences ([num_sampled, vocab]); None for an empty step."""
        if prefix:
            self.prefix_store.apply_before_free(prefix)
        self.kv_cache.free(freed)
        if prefix:
            self.prefix_store.apply_after_free(prefix)
        if not seqs:
            return None
        batch = ForwardBatch.build(seqs, self.kv_cache, self.group.device)
        ids = None
        if input_ids is not None:
            ids = torch.tensor(input_ids, dtype=torch.int64, device=self.group.device)
        if intermediate is not None and intermediate.hidden_states.device != self.group.device:
            intermediate = IntermediateTensors(
                intermediate.hidden_states.to(self.group.device),
                None if intermediate.residual is None else intermediate.residual.to(self.group.device),
            )
        states = self.model(batch, input_ids=ids, intermediate=intermediate)
        if self.layout.is_last:
            # sampling runs on the host with per-request generators
            return self.model.compute_logits(states, batch.sample_indices()).cpu()
        return states
