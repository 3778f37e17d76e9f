"""A data-parallel group: its members, a formation of them, and how the host assembles one from the members'
knocks (the protocol: dp_rendezvous).

The host reads knocks in knock-number order and keeps, per identity (dp_rank, start_layer, tp_rank), the newest;
``take_group`` hands out the kept knocks once they make a complete, consistent group and forgets them, so no
knock joins two formations. While they do not, ``status`` names who is missing or what disagrees.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Member:
    """TP rank ``tp_rank`` (of ``tp_size``) of the stage holding layers [start_layer, end_layer) of
    ``num_layers`` in replica ``dp_rank``: process ``pid`` on machine ``host`` (dp_rendezvous.machine_id).
    Its identity in the group is (dp_rank, start_layer, tp_rank); the group's host is (0, 0, 0)."""

    dp_rank: int
    start_layer: int
    end_layer: int
    num_layers: int
    tp_rank: int
    tp_size: int
    host: str
    pid: int

    @property
    def is_host(self) -> bool:
        return self.dp_rank == 0 and self.start_layer == 0 and self.tp_rank == 0

    @property
    def identity(self) -> tuple[int, int, int]:
        return self.dp_rank, self.start_layer, self.tp_rank

    def describe(self) -> str:
        return f"replica {self.dp_rank} stage {self.start_layer}:{self.end_layer} tp {self.tp_rank}"


@dataclass(frozen=True, slots=True)
class Formation:
    """Epoch ``epoch`` of a group: ``members`` by global rank, sorted by (start_layer, dp_rank, tp_rank) so
    each stage position's ranks are contiguous; this process is ``rank``. ``store`` is the world's own
    (PrefixStore ``epoch/<epoch>``): pass it to ``dist.init_process_group``."""

    epoch: int
    rank: int
    members: tuple[Member, ...]
    store: dist.Store

    @property
    def world_size(self) -> int:
        return len(self.members)

    def stages(self) -> tuple[tuple[int, int], ...]:
        """The distinct (start_layer, end_layer) of the stages, in layer order."""
        return tuple(sorted({(m.start_layer, m.end_layer) for m in self.members}))

    def ranks_of(self, start_layer: int) -> tuple[int, ...]:
        """The global ranks of the stage at ``start_layer`` of every replica (its EP group)."""
        return tuple(r for r, m in enumerate(self.members) if m.start_layer == start_layer)

    def tp_ranks(self, dp_rank: int, start_layer: int) -> tuple[int, ...]:
        """The global ranks of replica ``dp_rank``'s stage at ``start_layer``, by tp_rank."""
        return tuple(r for r, m in enumerate(self.members) if (m.dp_rank, m.start_layer) == (dp_rank, start_layer))

    def head_ranks(self) -> tuple[int, ...]:
        """The global rank of each replica's head (layer 0, tp 0), by dp_rank."""
        return tuple(r for r, m in enumerate(self.members) if m.start_layer == 0 and m.tp_rank == 0)


@dataclass(frozen=True, slots=True)
class Knock:
    """A member's request to join the next formation: ``nonce`` is new per knock, ``instance`` is the host
    instance id the member saw, ``index`` the knock number (a larger one is newer; 0 until the host read it)."""

    member: Member
    nonce: str
    instance: str
    dp_size: int
    index: int = 0

    def encode(self) -> str:
        return json.dumps({"member": asdict(self.member), "nonce": self.nonce, "instance": self.instance,
                           "dp_size": self.dp_size})

    @staticmethod
    def decode(text: str, index: int) -> Knock:
        d = json.loads(text)
        return Knock(Member(**d["member"]), d["nonce"], d["instance"], d["dp_size"], index)


def _shape(m: Member) -> tuple[int, int, int]:
    return m.start_layer, m.end_layer, m.tp_size


def _split(stages: dict[tuple[int, int], int]) -> str:
    return "|".join(f"{s}:{e}" for s, e in sorted(stages))


class KnockBook:
    """The group host's newest unused knock per member identity. Invariant: a knock leaves the book when a
    formation takes it (never reused) or when a newer knock of the same replica with another layer range or
    tp size overlaps its layers (its process was restarted with other arguments); knocks meant for another
    host instance, or from a member whose dp_size differs, never enter (``status`` mentions the latter)."""

    def __init__(self, host: Member, dp_size: int, instance: str) -> None:
        self.host, self.dp_size, self.instance = host, dp_size, instance
        self.status = "waiting for the first knock"
        self._latest: dict[tuple[int, int, int], Knock] = {}
        self._refused: dict[tuple[int, int, int], str] = {}
        self._read = 0  # knock numbers up to this one are known
        self._unwritten: list[int] = []  # numbers taken whose knock was not written yet (or never will be)

    def read(self, store: dist.Store) -> None:
        """Adds the knocks written to ``store`` since the last read."""
        count = store.add("rdzv/knocks", 0)
        self._unwritten += range(self._read + 1, count + 1)
        self._read = count
        for n in list(self._unwritten):
            if store.check([f"rdzv/knock/{n}"]):
                self._unwritten.remove(n)
                self.add(Knock.decode(store.get(f"rdzv/knock/{n}").decode(), n))

    def add(self, knock: Knock) -> None:
        m = knock.member
        if knock.instance != self.instance:
            return
        if knock.dp_size != self.dp_size or m.dp_rank >= self.dp_size:
            self._refused[m.identity] = (f"{m.describe()} was started with dp_size {knock.dp_size} "
                                         f"but the group has dp_size {self.dp_size}")
            return
        old = self._latest.get(m.identity)
        if old is not None and old.index > knock.index:
            return
        self._latest[m.identity] = knock
        self._refused.pop(m.identity, None)
        kept: list[Member] = []
        for k in sorted(self._latest.values(), key=lambda k: -k.index):
            o = k.member
            newer = [p for p in kept if p.dp_rank == o.dp_rank and p.start_layer < o.end_layer
                     and o.start_layer < p.end_layer and _shape(p) != _shape(o)]
            if newer:
                del self._latest[o.identity]
                self._refused[o.identity] = (f"ignoring {o.describe()} of tp_size {o.tp_size}: the newer "
                                             f"{newer[0].describe()} of tp_size {newer[0].tp_size} overlaps it")
            else:
                kept.append(o)

    def take_group(self) -> list[Knock] | None:
        """The knocks of a complete, consistent group in global rank order (start_layer, dp_rank, tp_rank),
        removed from the book; None while there is none (``status`` says why)."""
        problems, missing, expected = self._check()
        if problems or missing or expected is None:
            self.status = "; ".join(problems + missing + list(self._refused.values()))
            return None
        group = sorted(self._latest.values(), key=lambda k: (k.member.start_layer, k.member.dp_rank,
                                                               k.member.tp_rank))
        assert len(group) == expected, (len(group), expected)
        self._latest.clear()
        self._refused.clear()
        self.status = f"formed a group of {expected} members"
        return group

    def _check(self) -> tuple[list[str], list[str], int | None]:
        """(what disagrees, who is missing, the group's size once replica 0's stages cover every layer)."""
        num_layers = self.host.num_layers
        problems = [f"{k.member.describe()} has num_layers {k.member.num_layers} but the host {num_layers}"
                    for k in self._latest.values() if k.member.num_layers != num_layers]
        replicas: dict[int, dict[tuple[int, int], int]] = {}  # replica -> (start, end) -> tp_size
        for k in self._latest.values():
            replicas.setdefault(k.member.dp_rank, {})[(k.member.start_layer, k.member.end_layer)] = k.member.tp_size
        template = replicas.get(0, {})
        for r, stages in sorted(replicas.items()):
            clashes = [(s, e) for s, e in stages for a, b in template if a < e and s < b and (a, b) != (s, e)]
            if r > 0 and clashes:
                problems.append(f"replica {r}'s stages hold {_split(stages)} but replica 0's {_split(template)}: "
                                "stages at the same position must hold the same layer range")
            for (s, e), tp in sorted(stages.items()):
                if r > 0 and template.get((s, e), tp) != tp:
                    problems.append(f"replica {r}'s stage {s}:{e} has tp_size {tp} but replica 0's "
                                    f"{template[(s, e)]}: stages at the same position must have the same tp_size")
        gaps, at = [], 0
        for s, e in sorted(template) + [(num_layers, num_layers)]:
            if s > at:
                gaps.append(f"{at}:{s}")
            at = max(at, e)
        want = [f"replica {r} stage {s}:{e} tp {t}" for r in range(self.dp_size)
                for (s, e), tp in sorted(template.items()) for t in range(tp) if (r, s, t) not in self._latest]
        expected = None if gaps else self.dp_size * sum(template.values())
        count = f"{len(want)} of {expected} members: " if expected else ""
        missing = [f"waiting for {count}{', '.join(want)}"] if want else []
        if gaps:
            missing.append(f"no replica 0 stage holds layers {', '.join(gaps)} yet")
        return problems, missing, expected
