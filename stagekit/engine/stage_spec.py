"""What one stage process serves: picklable, so TP worker processes get the same spec."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageSpec:
    """Model directory, layer range ``[start_layer, end_layer)`` and TP size of a stage."""

    model_path: str
    start_layer: int
    end_layer: int
    tp_size: int = 1
    dtype: str = "auto"
    model_name: str | None = None
    kv_cache_memory_bytes: int = 1 << 30
    kv_cache_memory_fraction: float = 0.0  # > 0: this share of the memory free at start-up instead
    num_threads: int = 0  # torch intra-op threads per rank; 0 = torch's default
    show_progress: bool = True
    # CPU fp32 linear weights (stagekit/layers/cpu_packed.py): "auto" (the panel GEMM, or oneDNN without a
    # C compiler), "panel", "onednn" (packed once after loading) or "dense" (F.linear)
    linear_kernel: str = "auto"
    # "float16"/"bfloat16": CPU linear weights stored in that dtype in the panels, fp32 activations; "" = as loaded
    weight_dtype: str = ""
    # collectives of the TP group: "auto" (shared memory on the CPU, torch.distributed on GPUs), "shm", "gloo"
    collectives: str = "auto"
    # how a MoE stage parallelises its experts over the TP ranks: "tp" (each expert split) or "ep" (placed whole)
    moe_parallel: str = "tp"
    # with "ep": "local" (every rank holds the stage's tokens: select locally, one all-reduce) or
    # "all_to_all" (tokens travel to their experts' ranks and back; the path data-parallel attention needs)
    moe_dispatch: str = "local"
    max_num_seqs: int = 64  # sequences running at once on the replica (head only)
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks
    block_size: int = 16  # tokens per KV block; the same on every stage of a pipeline
    prefix_caching: bool = True  # automatic prefix caching (the head decides; any stage can veto)
    # touch every page of a host KV pool at start-up: the memory is committed (an overcommitted host
    # fails now, not mid-serving) and first writes into fresh blocks (prefill, KV imports) pay no page faults
    kv_prefault: bool = False
    step_timeout_s: float = 120.0  # the head fails a step whose result is not back by then (stalled stage)
    # data-parallel attention: this stage is member ``dp_rank`` of ``dp_size`` same-position stages of
    # different replicas meeting at ``dp_group`` (HOST:PORT); their MoE layers form one EP group over all
    # dp_size x tp_size ranks (parallel/dp_world.py). dp_size 1: no group.
    dp_group: str = ""
    dp_rank: int = 0
    dp_size: int = 1
    # a collective of the DP group not finished by then fails the group (a member died or stalled)
    collective_timeout_s: float = 30.0
