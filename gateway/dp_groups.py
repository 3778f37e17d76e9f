"""Data-parallel attention groups as the gateway sees them: each group serves as one unit.

A DP-attention group is ``dp_size`` replicas whose MoE layers form one expert-parallel group:
every member enters every collective of every step, so while one member (any stage of it) is
down, or its group is re-forming, none of them can serve. The gateway learns membership from
the heads' `StageInfo` (``dp_group`` names the group, ``dp_rank`` the member) and holds every
member out of routing while its group is not whole and healthy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.domain import StageInfo
from gateway.metrics import GatewayMetrics

logger = logging.getLogger("stagemesh.gateway")


class Member(Protocol):
    """What a group needs of a replica (`ReplicaClient` is one)."""

    index: int
    healthy: bool
    last_error: str | None
    head_info: StageInfo | None

    def hold(self, reason: str | None) -> None: ...


def forming_reason(infos: Sequence[StageInfo]) -> str | None:
    """Why a replica cannot serve while a stage's DP group forms; None when no stage says so.
    The group is named by the head's ``dp_group`` (the replica's group key)."""
    head_group = infos[0].dp_group if infos else ""
    for k, info in enumerate(infos):
        if info.dp_state == "forming":
            where = f" (stage {k})" if k else ""
            detail = info.dp_detail or "waiting for its members"
            return f"DP group {head_group or info.dp_group} is forming{where}: {detail}"
    return None


@dataclass(slots=True)
class DpGroup:
    """One group: its members (replica index -> dp rank), its size and whether it serves."""

    name: str
    size: int = 0
    members: dict[int, int] = field(default_factory=dict)
    up: bool = False
    reason: str = ""

    def snapshot(self) -> dict[str, object]:
        order = sorted(self.members, key=lambda i: (self.members[i], i))
        return {"group": self.name, "size": self.size, "members": order, "up": self.up, "reason": self.reason}


class DpGroups:
    """The DP groups behind one gateway.

    Invariant: after `update`, every member of a group that is not up is held out of routing
    with the group's reason, and no other replica is held. A group is up only when the gateway
    knows ``size`` members and all of them are healthy. Membership, once seen, is kept: a member
    that stops answering is still a member (its last head info names its group) until its head
    answers with another group or none.
    """

    def __init__(self, metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics
        self.groups: dict[str, DpGroup] = {}

    def group_of(self, index: int) -> DpGroup | None:
        return next((g for g in self.groups.values() if index in g.members), None)

    def update(self, replicas: Sequence[Member]) -> None:
        """Learn membership from the replicas' head infos, then hold or release every replica."""
        self._learn(replicas)
        by_index = {r.index: r for r in replicas}
        unknown = [r.index for r in replicas if r.head_info is None]
        for group in self.groups.values():
            infos = [by_index[i].head_info for i in group.members]
            group.size = max((info.dp_size for info in infos if info is not None), default=0)
            self._set(group, self._down_reason(group, by_index, unknown))
            for i in group.members:
                by_index[i].hold(None if group.up else group.reason)
        grouped = {i for g in self.groups.values() for i in g.members}
        for r in replicas:
            if r.index not in grouped:
                r.hold(None)

    def snapshot(self) -> list[dict[str, object]]:
        return [self.groups[name].snapshot() for name in sorted(self.groups)]

    def _learn(self, replicas: Sequence[Member]) -> None:
        for r in replicas:
            info = r.head_info
            if info is None:  # never answered: nothing known of it yet
                continue
            current = self.group_of(r.index)
            if current is not None and current.name != info.dp_group:
                del current.members[r.index]  # restarted in another group, or outside any
            if info.dp_group:
                self.groups.setdefault(info.dp_group, DpGroup(info.dp_group)).members[r.index] = info.dp_rank
        for name in [n for n, g in self.groups.items() if not g.members]:
            del self.groups[name]
            if self.metrics is not None:
                with contextlib.suppress(KeyError):
                    self.metrics.dp_group_up.remove(name)

    @staticmethod
    def _down_reason(group: DpGroup, by_index: dict[int, Member], unknown: list[int]) -> str:
        problems = []
        for i in sorted(group.members, key=lambda i: (group.members[i], i)):
            member = by_index[i]
            if not member.healthy:
                problems.append(f"replica {i} (dp rank {group.members[i]}) is down: {member.last_error or 'not ready'}")
        if len(group.members) < group.size:
            known = sorted(group.members)
            missing = f"; replica(s) {unknown} never answered" if unknown else ""
            problems.append(
                f"the gateway knows {len(known)} of its {group.size} replicas ({known}){missing}: "
                "every replica of the group must be given to the gateway (--replica)"
            )
        return f"DP group {group.name} is down: " + "; ".join(problems) if problems else ""

    def _set(self, group: DpGroup, reason: str) -> None:
        up = not reason
        if group.up and not up:
            logger.warning("%s (its replicas %s are out of routing)", reason, sorted(group.members))
            if self.metrics is not None:
                self.metrics.dp_group_down.labels(group=group.name).inc()
        elif not up and reason != group.reason:
            logger.warning("%s", reason)
        elif up and not group.up:
            logger.info("DP group %s serves: replicas %s", group.name, sorted(group.members))
        group.up, group.reason = up, reason
        if self.metrics is not None:
            self.metrics.observe_dp_group(group.name, up=up)
