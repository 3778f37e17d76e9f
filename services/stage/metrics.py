"""A stage's own Prometheus metrics (``--metrics-port``): batch size, KV usage, step time,
data-plane bytes, tokens per expert of MoE layers, and on the replica head the requests
running and waiting.

Everything is read from the stage's plain counters (`stagekit.engine.stats.StageStats`, the
KV cache, the head's `HeadStats`) at scrape time by a custom collector, so the step loop pays
nothing for metrics. Scrapes run on prometheus-client's HTTP thread while the stage's loop
and compute thread mutate those numbers: single reads are atomic in CPython, and a read that
iterates a container retries if the container changed under it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from services.stage.node import StageNode
from stagekit.engine.stats import STEP_TIME_BUCKETS, HeadStats
from stagekit.types.expert_load import ExpertLoad

log = logging.getLogger("stagemesh.stage")
T = TypeVar("T")


def _read(fn: Callable[[], T], default: T) -> T:
    for _ in range(5):
        try:
            return fn()
        except RuntimeError:  # "dictionary changed size during iteration": read again
            continue
    return default


class StageCollector:
    """Collects one stage's metrics, labelled with its model and layer range."""

    def __init__(self, node: StageNode) -> None:
        self.node = node
        layout = node.layout
        self.label_names = ["model", "layers"]
        self.labels = [node.cfg.name, f"{layout.start_layer}:{layout.end_layer}"]

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        metric = CounterMetricFamily(name, doc, labels=self.label_names)
        metric.add_metric(self.labels, value)
        return metric

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        metric = GaugeMetricFamily(name, doc, labels=self.label_names)
        metric.add_metric(self.labels, value)
        return metric

    def collect(self) -> Iterator[Metric]:
        stats = self.node.runtime.stats
        kv = self.node.runtime.kv_cache
        yield self._counter("stagemesh_stage_steps", "Steps this stage ran its layers for.", stats.steps_total)
        yield self._counter(
            "stagemesh_stage_step_failures", "Steps that failed on this stage.", stats.step_failures_total
        )
        yield self._counter("stagemesh_stage_tokens", "Tokens run through this stage's layers.", stats.tokens_total)
        yield self._counter(
            "stagemesh_stage_batched_sequences", "Sum over steps of the sequences in the step.",
            stats.sequences_in_steps_total,
        )
        yield self._gauge("stagemesh_stage_batch_size", "Sequences in the last step.", stats.last_batch_size)
        buckets = list(stats.step_seconds_buckets)
        step_time = HistogramMetricFamily(
            "stagemesh_stage_step_seconds", "Time to run this stage's layers for one step.", labels=self.label_names
        )
        step_time.add_metric(
            self.labels,
            [(repr(b), float(n)) for b, n in zip(STEP_TIME_BUCKETS, buckets, strict=True)]
            + [("+Inf", float(stats.steps_total))],
            sum_value=stats.step_seconds_sum,
        )
        yield step_time
        transfer = CounterMetricFamily(
            "stagemesh_stage_transfer_bytes", "Data-plane payload bytes, by direction.",
            labels=[*self.label_names, "direction"],
        )
        transfer.add_metric([*self.labels, "sent"], stats.bytes_sent_total)
        transfer.add_metric([*self.labels, "received"], stats.bytes_received_total)
        yield transfer
        used = _read(lambda: kv.used_tokens, 0)
        capacity = kv.capacity_tokens
        yield self._gauge("stagemesh_stage_kv_used_tokens", "Tokens held in this stage's KV cache.", used)
        yield self._gauge("stagemesh_stage_kv_capacity_tokens", "Tokens this stage's KV cache can hold.", capacity)
        yield self._gauge(
            "stagemesh_stage_kv_usage_ratio", "KV cache usage (0..1).", used / capacity if capacity else 0.0
        )
        loads = self.node.runtime.expert_load()
        if loads:
            yield from self._moe_metrics(loads)
        dp = self.node.runtime.dp
        if dp is not None:
            yield self._gauge("stagemesh_dp_group_ready", "1 while this stage's data-parallel-attention group is "
                              "formed and its world current, 0 while it forms.", 1.0 if dp.ready else 0.0)
            yield self._counter("stagemesh_dp_group_failures", "Times this stage saw its data-parallel-attention "
                                "group fail (and left its world to re-form it).", dp.failures_total)
            yield self._gauge("stagemesh_dp_group_epoch", "Formations of the group since its rendezvous host "
                              "started (the epoch of this stage's world).", dp.epoch)
        if self.node.engine is not None:
            yield from self._head_metrics(self.node.engine.head_stats())

    def _moe_metrics(self, loads: list[ExpertLoad]) -> Iterator[Metric]:
        """Tokens per expert per MoE layer since start, and each layer's imbalance (max/mean
        over its experts, since start; ``rate()`` of the counter gives a recent window)."""
        tokens = CounterMetricFamily("stagemesh_moe_expert_tokens", "Tokens routed to each expert of a MoE layer "
                                     "(a top-k token counts at each of its k experts).",
                                     labels=[*self.label_names, "layer", "expert"])
        imbalance = GaugeMetricFamily("stagemesh_moe_expert_imbalance", "Max over mean of a MoE layer's tokens "
                                      "per expert since start (1 = even; 0 before any token).",
                                      labels=[*self.label_names, "layer"])
        for load in loads:
            for expert, n in enumerate(load.tokens):
                tokens.add_metric([*self.labels, str(load.layer), str(expert)], n)
            imbalance.add_metric([*self.labels, str(load.layer)], load.imbalance)
        yield tokens
        yield imbalance

    def _head_metrics(self, head: HeadStats) -> Iterator[Metric]:
        """What only the replica head knows: its requests and its prefix cache."""
        yield self._gauge("stagemesh_stage_requests_running", "Requests the head is running.", head.num_running)
        yield self._gauge("stagemesh_stage_requests_waiting", "Requests waiting for KV at the head.", head.num_waiting)
        yield self._gauge("stagemesh_stage_kv_blocks_total", "KV blocks the head schedules into (the "
                          "pipeline's smallest pool).", head.kv_blocks_total)
        yield self._gauge("stagemesh_stage_kv_blocks_used", "KV blocks referenced by running requests.",
                          head.kv_blocks_used)
        yield self._gauge("stagemesh_stage_kv_blocks_cached", "KV blocks named by a cached prompt prefix.",
                          head.kv_blocks_cached)
        yield self._counter("stagemesh_stage_preemptions", "Requests preempted for KV blocks (recomputed later).",
                            head.num_preemptions)
        yield self._gauge(
            "stagemesh_stage_prefix_cache_capacity_blocks", "Blocks the prefix cache may use (0: off).",
            head.kv_blocks_total if head.prefix_caching else 0,
        )
        yield self._counter(
            "stagemesh_stage_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            head.prefix_query_tokens,
        )
        yield self._counter(
            "stagemesh_stage_prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed).",
            head.prefix_hit_tokens,
        )


def start_metrics_server(node: StageNode, host: str, port: int) -> tuple[int, Callable[[], None]]:
    """Serve the stage's metrics at ``http://host:port/metrics`` on a background thread;
    returns the bound port (``port`` 0 picks one) and a function that stops the server."""
    registry = CollectorRegistry()
    registry.register(StageCollector(node))  # type: ignore[arg-type]
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    log.info("stage metrics on http://%s:%d/metrics", host, bound)
    return bound, stop
