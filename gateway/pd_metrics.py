"""Gateway metrics of prefill/decode disaggregation (on the gateway's registry, `stagemesh_pd_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Outcomes of a choice under disaggregation (every choice counts once):
#   transferred   the prefill replica computed the prompt, its KV moved, the decode replica continued
#   direct        the decode replica cached the prompt but for a short tail: sent straight there
#   fallback      something failed (see stagemesh_pd_fallbacks_total): the decode side prefilled itself
#   prefill_only  the request ended with its first token (max_tokens 1, a stop): nothing to hand over
#   short_prompt  no full KV block to move: the decode replica recomputes the few prompt tokens
OUTCOMES = ("transferred", "direct", "fallback", "prefill_only", "short_prompt")


class PdMetrics:
    """Hand-offs by outcome, transfer latency and bytes, fallbacks by reason, and TTFT / ITL by
    the role of the replica that produced the token (``handoff`` for the gap between the first
    token, from the prefill replica, and the second, from the decode replica)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.handoffs = Counter("stagemesh_pd_handoffs", "Choices under prefill/decode disaggregation, by outcome.",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.handoffs.labels(outcome=outcome)
        self.fallbacks = Counter(
            "stagemesh_pd_fallbacks",
            "Hand-offs that did not move the KV as planned, by reason; the decode side prefilled instead.",
            ["reason"], registry=r)
        self.transfer_seconds = Histogram("stagemesh_pd_transfer_seconds",
                                          "Time of a hand-off's KV export (prefill replica to decode replica).",
                                          buckets=_TRANSFER_BUCKETS, registry=r)
        self.transfer_bytes = Counter("stagemesh_pd_transfer_bytes", "KV bytes moved by hand-offs.", registry=r)
        self.time_to_first_token = Histogram(
            "stagemesh_pd_time_to_first_token_seconds",
            "Time from a choice's start to its first token, by the role of the replica that produced it.",
            ["role"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "stagemesh_pd_inter_token_latency_seconds",
            "Time between successive outputs of a choice, per token, by the role of the replica that produced it.",
            ["role"], buckets=_ITL_BUCKETS, registry=r)


class TokenClock:
    """Times one choice's outputs into the per-role TTFT / ITL histograms."""

    def __init__(self, metrics: PdMetrics | None, started: float) -> None:
        self.metrics, self._last = metrics, started
        self._role: str | None = None   # who produced the previous output (None: nothing yet)

    def tick(self, role: str, num_tokens: int, now: float) -> None:
        if self.metrics is None or num_tokens <= 0:
            return
        gap = now - self._last
        if self._role is None:
            self.metrics.time_to_first_token.labels(role=role).observe(gap)
        else:
            # the first gap after the prefill replica's token holds the KV transfer: its own label
            label = role if role == self._role else "handoff"
            per_token = gap / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.labels(role=label).observe(per_token)
        self._role, self._last = role, now
