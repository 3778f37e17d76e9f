"""Counters a stage keeps about its own work, read by the metrics exporter at scrape time.
Plain numbers, no Prometheus types: the core stays free of exporter concerns."""

from __future__ import annotations

from dataclasses import dataclass, field

# upper bounds (seconds) of the step-time histogram buckets
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StageStats:
    """Monotonic counters plus a cumulative step-time histogram (Prometheus semantics)."""

    steps_total: int = 0
    step_failures_total: int = 0
    tokens_total: int = 0           # tokens run through this stage's layers
    sequences_in_steps_total: int = 0
    last_batch_size: int = 0
    bytes_sent_total: int = 0       # data-plane payload bytes sent downstream
    bytes_received_total: int = 0
    step_seconds_sum: float = 0.0
    step_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_TIME_BUCKETS))

    def observe_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        self.steps_total += 1
        self.tokens_total += num_tokens
        self.sequences_in_steps_total += num_seqs
        self.last_batch_size = num_seqs
        self.step_seconds_sum += seconds
        for i, bound in enumerate(STEP_TIME_BUCKETS):
            if seconds <= bound:
                self.step_seconds_buckets[i] += 1


@dataclass(frozen=True, slots=True)
class HeadStats:
    """What only a replica head knows, read at one moment: its requests, its KV blocks
    (the pipeline's smallest pool, which it schedules into) and its prefix cache."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_caching: bool
    prefix_query_tokens: int
    prefix_hit_tokens: int
    steps_completed: int = 0
