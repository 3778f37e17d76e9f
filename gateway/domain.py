"""Domain types the gateway passes around.

Protobuf never leaves `stage_proto.py` / `replica.py`; everything past them speaks these
frozen dataclasses (and stagekit's `SamplingParams`, the one type stages speak too).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stagekit.types.expert_load import ExpertLoad


class FinishReason(str, Enum):
    """Why a choice ended, in OpenAI's vocabulary (plus vLLM's ``abort``)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """Tokens one Generate response adds; the last one of a request has ``finish_reason``."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class StageInfo:
    """What a stage reports about itself (GetInfo / Wire)."""

    model_name: str
    architecture: str = ""
    start_layer: int = 0
    end_layer: int = 0
    num_layers: int = 0
    tp_size: int = 1
    dtype: str = ""
    kv_capacity_tokens: int = 0
    vocab_size: int = 0
    max_model_len: int = 0
    is_first: bool = False
    is_last: bool = False
    eos_token_ids: tuple[int, ...] = ()
    transport: str = ""
    wired: bool = False
    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    prefix_cache_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    moe_parallel: str = ""  # "tp" or "ep" for MoE models
    expert_load: tuple[ExpertLoad, ...] = ()  # tokens per expert of the stage's MoE layers
    # data-parallel attention: the group (its rendezvous address; the head's names the replica's
    # group), this replica's rank in it, its size, "ready" | "forming" ("" outside a group), and why
    # it is not ready
    dp_group: str = ""
    dp_rank: int = 0
    dp_size: int = 0
    dp_state: str = ""
    dp_detail: str = ""
    steps_completed: int = 0  # head only: steps whose results came back, since start
    kv_block_size: int = 0
    kv_blocks_referenced: int = 0  # head: blocks held by sequences, exports, hand-off holds, import reservations
    kv_holds: int = 0  # head: prefill/decode hand-offs whose prompt blocks it holds
