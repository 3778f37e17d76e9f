"""One TP rank's share of a stage: the sharded model and its KV cache. Every rank of the
stage calls ``run`` with the same step each step; collectives inside the layers keep
them in lockstep."""

from __future__ import annotations

import torch

from stagekit.config.model_config import load_model_config
from stagekit.engine.stage_spec import StageSpec
from stagekit.errors import ConfigError
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.kv.kv_cache import PagedKVCache, available_memory
from stagekit.layers.cpu_packed import WEIGHT_DTYPES, CpuWeightPlan, pack_model_weights
from stagekit.layers.moe import FusedMoE
from stagekit.loader.safetensors_loader import load_weights
from stagekit.models.stage_model import StageModel
from stagekit.parallel.expert_placement import check_moe_parallel
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.types.expert_load import ExpertLoad
from stagekit.types.step import IntermediateTensors, StepInputs


class ModelRunner:
    """Builds the shard from a StageSpec and runs forward passes over it."""

    def __init__(self, spec: StageSpec, groups: ParallelGroups) -> None:
        if spec.num_threads > 0:
            torch.set_num_threads(spec.num_threads)
        self.cfg = load_model_config(spec.model_path, spec.model_name)
        self.layout = StageLayout(spec.start_layer, spec.end_layer, self.cfg.num_layers, spec.tp_size)
        self.layout.validate(self.cfg.num_heads, self.cfg.num_kv_heads)
        # a DP group's experts are placed over the same-position stages of all its replicas
        check_moe_parallel(spec.moe_parallel, self.cfg.num_experts, spec.tp_size * spec.dp_size, repr(self.cfg.name),
                           f"--dp-size {spec.dp_size} x --tp {spec.tp_size}" if spec.dp_size > 1 else "")
        self.in_dp_group = spec.dp_size > 1
        # half-precision weight storage computes in fp32 whatever the checkpoint holds
        self.dtype = self.cfg.torch_dtype("float32" if spec.weight_dtype and spec.dtype == "auto" else spec.dtype)
        self.groups, self.device = groups, groups.device
        if spec.weight_dtype and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ConfigError(f"--weight-dtype {spec.weight_dtype} is for the CPU with float32 activations "
                              f"(here {self.device.type}, {str(self.dtype).removeprefix('torch.')})")
        tp = groups.tp
        self.model = StageModel(self.cfg, self.layout, groups, self.dtype)
        load_weights(self.model, show_progress=spec.show_progress and tp.is_first_rank)
        if spec.linear_kernel != "dense":
            pack_model_weights(self.model, CpuWeightPlan(spec.linear_kernel, WEIGHT_DTYPES.get(spec.weight_dtype)))
        num_kv_heads = max(1, self.cfg.num_kv_heads // spec.tp_size)
        shape = (self.layout.num_local_layers, num_kv_heads, self.cfg.head_dim, self.dtype, spec.block_size)
        budget = spec.kv_cache_memory_bytes
        if spec.kv_cache_memory_fraction > 0:
            budget = int(available_memory(self.device, spec.tp_size) * spec.kv_cache_memory_fraction)
        # every rank must hold the same block ids: the smallest pool of the stage's ranks
        num_blocks = tp.min_int(budget // PagedKVCache.bytes_per_block(*shape))
        self.kv_cache = PagedKVCache(self.layout.num_local_layers, num_kv_heads, self.cfg.head_dim, self.dtype,
                                     self.device, num_blocks, spec.block_size, prefault=spec.kv_prefault)

    @torch.inference_mode()
    def run(self, step: StepInputs) -> IntermediateTensors | torch.Tensor | None:
        """Drop the tables of the step's freed and preempted sequences, extend the tables of
        its sequences, then run it. Returns IntermediateTensors, or on the last stage the fp32
        logits of the sampled sequences ([num_sampled, vocab]); None for an empty step."""
        header, device = step.header, self.device
        self.kv_cache.apply(header.seqs, header.freed_seq_ids, header.preempted_seq_ids)
        if not header.seqs:
            if self.in_dp_group:
                self._dummy_moe_pass()
            return None
        batch = ForwardBatch.build(header.seqs, self.kv_cache, device)
        ids = None
        if step.input_ids is not None:
            ids = torch.tensor(step.input_ids, dtype=torch.int64, device=device)
        intermediate = step.intermediate
        if intermediate is not None and intermediate.hidden_states.device != device:
            intermediate = IntermediateTensors(
                intermediate.hidden_states.to(device),
                None if intermediate.residual is None else intermediate.residual.to(device),
            )
        states = self.model(batch, input_ids=ids, intermediate=intermediate)
        if self.layout.is_last:
            # sampling runs on the host with per-request generators
            return self.model.compute_logits(states, batch.sample_indices()).cpu()
        return states

    def _dummy_moe_pass(self) -> None:
        """A DP group's padded step: this replica has no tokens, but its peers' tokens may
        need its experts, and every rank must enter every MoE collective of every step. Each
        MoE layer runs on zero tokens, in layer order (it receives, computes and returns the
        peers' rows); no embedding, attention, KV write or sampling."""
        empty = torch.empty(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        for _, block in self._moe_blocks():
            block(empty)

    def _moe_blocks(self) -> list[tuple[int, FusedMoE]]:
        out = []
        for idx, layer in self.model.model.layers.items():
            block = getattr(layer, layer.mlp_name)
            if isinstance(block, FusedMoE):
                out.append((int(idx), block))
        return out

    def expert_load(self) -> list[ExpertLoad]:
        """Tokens routed to each expert of each MoE layer of this stage since start, by
        layer (empty for dense layers and models). Safe to call from another thread: it
        copies the counters, which only grow."""
        return [ExpertLoad(idx, tuple(block.expert_tokens.tolist())) for idx, block in self._moe_blocks()]
