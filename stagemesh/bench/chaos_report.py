"""What a chaos run found: requests sent / succeeded / failed / wrong, latency, the gateway's memory
and descriptors before and after, the disturbances done, and every reason the goal was missed."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from stagemesh.bench.chaos_load import Kind, Outcome


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (NaN for no values)."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def difference(got: str, expected: str) -> str:
    """Where two answers part, with a little context either side."""
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    lo = max(0, at - 20)
    return (f"from character {at} of {len(expected)}: got {got[lo:at + 40]!r}, expected {expected[lo:at + 40]!r} "
            f"(lengths {len(got)}, {len(expected)})")


@dataclass
class ChaosReport:
    """Invariant: ``problems`` lists every reason the goal was missed; the goal is met exactly when
    it is empty (`finish` returns 0 then, else 1)."""

    config: dict[str, Any]
    log_dir: str
    wall_s: float = 0.0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    wrong: int = 0
    latency_p50_s: float = float("nan")
    latency_p99_s: float = float("nan")
    by_api: dict[str, int] = field(default_factory=dict)
    gateway_before: dict[str, float] = field(default_factory=dict)
    gateway_after: dict[str, float] = field(default_factory=dict)
    moves: dict[str, float] = field(default_factory=dict)
    disturbances: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add_outcomes(self, outcomes: list[Outcome], references: dict[Kind, str]) -> None:
        self.sent = len(outcomes)
        self.by_api = dict(Counter(o.kind.api for o in outcomes))
        errors: Counter[str] = Counter()
        for o in outcomes:
            if o.answer is None:
                self.failed += 1
                errors[f"{o.kind.api}: {o.error}"] += 1
            elif o.answer != references[o.kind]:
                self.wrong += 1
                if self.wrong <= 5:
                    where = difference(o.answer, references[o.kind])
                    named = f" ({o.request_id})" if o.request_id else ""
                    self.problems.append(f"wrong answer to {o.kind.label()}{named}: {where}")
            else:
                self.succeeded += 1
        self.problems += [f"{n} request(s) failed with {why}" for why, n in errors.most_common(10)]
        latencies = [o.latency_s for o in outcomes if o.answer is not None]
        self.latency_p50_s, self.latency_p99_s = quantile(latencies, 0.5), quantile(latencies, 0.99)

    def check(self, max_rss_growth_mib: float, max_fd_growth: int, *, gateway_alive: bool, up_alive: bool) -> None:
        """Add the goal's other conditions to ``problems``."""
        if self.wrong > 5:
            self.problems.append(f"... {self.wrong - 5} more wrong answers")
        if not self.disturbances:
            self.problems.append("no stage was disturbed: the run was too short for a chaos run (see --gap)")
        if not gateway_alive or not up_alive:
            self.problems.append(f"at the end: gateway {'alive' if gateway_alive else 'gone'}, "
                                 f"stagemesh up {'running' if up_alive else 'exited'}")
        fds = self.gateway_after.get("open_fds", -1) - self.gateway_before.get("open_fds", -1)
        if fds > max_fd_growth:
            self.problems.append(f"the gateway holds {fds:g} more open descriptors than before (max {max_fd_growth})")
        rss = self.gateway_after.get("rss_mib", 0.0) - self.gateway_before.get("rss_mib", 0.0)
        if rss > max_rss_growth_mib:
            self.problems.append(f"the gateway's resident memory grew by {rss:.0f} MiB (max {max_rss_growth_mib:g})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "goal_met": not self.problems}

    def finish(self, as_json: bool) -> int:
        """Print the report (text or one JSON object); the exit code."""
        print(json.dumps(self.as_dict()) if as_json else self.text(), flush=True)
        return 0 if not self.problems else 1

    def text(self) -> str:
        kills = sum(d["action"] == "kill" for d in self.disturbances)
        stops = sum(d["action"] == "stop" for d in self.disturbances)
        recovered = [d["recovered_s"] for d in self.disturbances if d["recovered_s"] is not None]
        b, a = self.gateway_before, self.gateway_after
        lines = [
            f"chaos run: {self.wall_s:.0f}s, {self.config.get('dp')} replicas x {self.config.get('pp')} stages, "
            f"{self.config.get('concurrency')} in flight, {self.config.get('max_tokens')} tokens per request",
            f"requests: {self.sent} sent ({', '.join(f'{n} {api}' for api, n in sorted(self.by_api.items()))}), "
            f"{self.succeeded} succeeded, {self.failed} failed, {self.wrong} wrong",
            f"latency: p50 {self.latency_p50_s:.2f}s, p99 {self.latency_p99_s:.2f}s",
            f"moved by the gateway: {self.moves.get('retry', 0):g} retried before a token, "
            f"{self.moves.get('migration', 0):g} migrated mid-stream",
            f"disturbances: {kills} SIGKILL, {stops} SIGSTOP; every replica serving again after "
            + (f"{min(recovered):.1f}-{max(recovered):.1f}s" if recovered else "-"),
            f"gateway: RSS {b.get('rss_mib', 0):.0f} -> {a.get('rss_mib', 0):.0f} MiB, open fds "
            f"{b.get('open_fds', -1):g} -> {a.get('open_fds', -1):g}",
            f"logs: {self.log_dir}",
        ]
        if self.problems:
            lines += ["GOAL MISSED:", *(f"  - {p}" for p in self.problems)]
        else:
            lines.append("goal met: 0 failed, 0 wrong, nothing leaked")
        return "\n".join(lines)
