"""Replica roles for prefill/decode disaggregation, and the checks that refuse a mesh whose
roles cannot work.

A replica is ``prefill`` (computes prompts and their first token, then hands the KV over),
``decode`` (continues requests whose prompt KV a prefill replica computed) or ``both`` (the
default: serves whole requests, and also takes hand-offs when prefill replicas exist).
Refused, with a message saying what is expected: decode replicas without a prefill replica
(they would silently serve colocated), prefill replicas without one that decodes, and, once
the stages answer, a prefill and a decode-capable replica whose stages at the same position
hold different layer ranges (KV moves position by position; TP sizes may differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.domain import StageInfo

PREFILL, DECODE, BOTH = "prefill", "decode", "both"
ROLES = (PREFILL, DECODE, BOTH)
PREFILLS = frozenset({PREFILL})
DECODES = frozenset({DECODE, BOTH})  # replicas that may run a request past its first token


@dataclass(frozen=True, slots=True)
class PdSettings:
    """``min_prefill_tokens``: a prompt the decode replica caches but for at most this many
    tokens goes straight to it. ``lease_s``: how long a hand-off may hold blocks on either side
    (the prefill replica's hold, the decode replica's reservation, the export's deadline)."""

    min_prefill_tokens: int = 16
    lease_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_prefill_tokens < 0:
            raise ValueError("--pd-min-prefill-tokens must be >= 0")
        if not 0 < self.lease_s <= 3600:
            raise ValueError("--pd-lease must be within (0, 3600] seconds")


def role_label(roles: frozenset[str]) -> str:
    """How an error names the replicas of ``roles`` ("" for the ordinary decoding ones)."""
    return "" if roles == DECODES else f"{'/'.join(sorted(roles))} "


def check_roles(roles: Sequence[str]) -> None:
    """Refuse role sets that cannot serve (ValueError with what is expected)."""
    bad = sorted({r for r in roles if r not in ROLES})
    if bad:
        raise ValueError(f"unknown replica role(s) {bad} (choose from {', '.join(ROLES)})")
    if DECODE in roles and PREFILL not in roles:
        raise ValueError(
            "decode replicas (--decode-replica) need at least one prefill replica (--prefill-replica): a decode "
            "replica continues requests whose prompt a prefill replica computed; use --replica for replicas that "
            "serve whole requests"
        )
    if PREFILL in roles and not any(r in DECODES for r in roles):
        raise ValueError(
            "prefill replicas (--prefill-replica) need a replica that decodes: add --decode-replica (or --replica, "
            "a replica that does both)"
        )


def layout(infos: Sequence[StageInfo]) -> tuple[tuple[int, int], ...]:
    """A replica's layer ranges, stage by stage."""
    return tuple((i.start_layer, i.end_layer) for i in infos)


def layout_mismatch(prefill: Sequence[StageInfo], decode: Sequence[StageInfo]) -> str | None:
    """Why KV cannot move from a replica with stages ``prefill`` to one with ``decode``, or None."""
    a, b = layout(prefill), layout(decode)
    if a == b:
        return None
    if len(a) != len(b):
        return (f"the prefill replica has {len(a)} stage(s) {_fmt(a)}, the decode replica {len(b)} {_fmt(b)}: "
                "prefill and decode replicas need stages holding the same layer ranges (TP sizes may differ)")
    pos = next(i for i in range(len(a)) if a[i] != b[i])
    return (f"stage {pos} holds layers {a[pos][0]}:{a[pos][1]} on the prefill replica and {b[pos][0]}:{b[pos][1]} "
            "on the decode replica: KV moves between stages holding the same layers (TP sizes may differ)")


def _fmt(ranges: tuple[tuple[int, int], ...]) -> str:
    return "[" + ", ".join(f"{s}:{e}" for s, e in ranges) + "]"
