"""`ReplicaAdmin`: replicas and stages changed while the gateway serves (admin API, replica file).

Every operation keeps the promise that no request is lost: a replica leaves routing before
anything about it changes (`ReplicaClient.drain`), the requests on it get a bounded time to
finish, and the rest move to another replica token-exactly (`ReplicaClient.evict_all`, then the
gateway's migration, generation.py). A stage is replaced by re-wiring the pipeline
(`Stage.Wire` on every stage with the new address list) once nothing runs on it: the other
stages keep their weights and caches and are not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import Conflict
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient, stage_info_at
from stagekit.errors import InvalidRequest, NotFound, StagemeshError

logger = logging.getLogger("stagemesh.gateway")

MAX_TIMEOUT_S = 3600.0
_HEAD_IDLE_S = 10.0  # how long a re-wire waits for the head to let go of the requests it was asked to abort


def parse_address(value: object) -> str:
    """A stage address ``host:port`` (IPv6 as ``[::1]:port``); `InvalidRequest` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"a stage address is a 'host:port' string, not {value!r}")
    address = value.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise InvalidRequest(f"{address!r} is not a stage address (host:port, port 1-65535)")
    return address


def parse_replica_id(value: str) -> int:
    """``r3`` (or ``3``) -> 3; `NotFound` for anything else."""
    digits = value[1:] if value.startswith("r") else value
    if not digits.isdigit() or len(digits) > 9:
        raise NotFound(f"no replica {value!r} (replicas are named r0, r1, ...)")
    return int(digits)


def check_timeout(value: float | None, default: float) -> float:
    if value is None:
        return default
    if not 0 <= value <= MAX_TIMEOUT_S:  # also refuses NaN
        raise InvalidRequest(f"timeout must be between 0 and {MAX_TIMEOUT_S:g} seconds, not {value}")
    return value


class ReplicaAdmin:
    """Adds, drains, removes replicas of ``pool`` and replaces their stages.

    Invariant: at most one operation runs on a replica at a time (its ``busy`` names it, and the
    health loop leaves it alone meanwhile); a replica leaves the pool only drained and with no
    request of ours left on it; a member of a DP-attention group is never removed or re-wired
    alone (its group serves as one unit). Errors are `InvalidRequest` (400), `NotFound` (404) or
    `Conflict` (409), each saying why.
    """

    def __init__(self, pool: ReplicaPool, config: GatewayConfig, model_name: str) -> None:
        self.pool = pool
        self.config = config
        self.model_name = model_name  # the model the gateway serves: an added replica must serve it too

    def replica(self, replica_id: str) -> ReplicaClient:
        found = self.pool.get(parse_replica_id(replica_id))
        if found is None:
            raise NotFound(f"no replica {replica_id!r} (GET /admin/replicas lists them)")
        return found

    def describe(self, replica: ReplicaClient) -> dict[str, Any]:
        return next(s for s in self.pool.snapshot() if s["index"] == replica.index)

    def _check_addresses(self, addresses: Sequence[str], *, ignore: ReplicaClient | None = None) -> None:
        twice = sorted({a for a in addresses if list(addresses).count(a) > 1})
        if twice:
            raise InvalidRequest(f"the pipeline names {', '.join(twice)} more than once")
        for r in self.pool.replicas:
            used = set(r.addresses) & set(addresses)
            if used and r is not ignore:
                raise Conflict(f"{', '.join(sorted(used))} is a stage of replica {r.id} already: a stage belongs "
                               "to one pipeline")

    def _check_alone(self, replica: ReplicaClient, what: str) -> None:
        group = self.pool.dp_groups.group_of(replica.index)
        if group is not None:
            others = ", ".join(f"r{i}" for i in sorted(group.members) if i != replica.index)
            raise Conflict(f"replica {replica.id} is dp rank {group.members[replica.index]} of the DP-attention group "
                           f"{group.name} (with {others or 'members not known yet'}): the group steps as one unit, "
                           f"so one member cannot be {what} alone")

    @contextlib.contextmanager
    def _busy(self, replica: ReplicaClient, what: str) -> Iterator[None]:
        if replica.busy is not None:
            raise Conflict(f"replica {replica.id} is {replica.busy}; try again when that is done")
        replica.busy = what
        try:
            yield
        finally:
            replica.busy = None

    async def add(self, stages: Sequence[object], origin: str = "admin") -> ReplicaClient:
        """A new replica of these stages; it serves as soon as it is wired (now, or by the health
        loop once its stages answer). A pipeline the stages refuse, or of another model, is a 400."""
        if not isinstance(stages, (list, tuple)) or not stages:
            raise InvalidRequest("'stages' must be a non-empty list of stage addresses (host:port), head first")
        addresses = [parse_address(a) for a in stages]
        self._check_addresses(addresses)
        c = self.config
        replica = ReplicaClient(self.pool.next_index(), addresses, transport=c.transport, rpc_timeout_s=c.rpc_timeout_s,
                                creds=c.stage_credentials)
        replica.origin = origin
        with self._busy(replica, "being added"):
            self.pool.add(replica)
            try:
                await replica.refresh()
            except InvalidRequest as err:  # the stages refuse this pipeline: it will not get better
                await self.pool.remove(replica)
                raise InvalidRequest(f"the stages refuse the pipeline {addresses}: {err}") from None
            except StagemeshError as err:
                replica.mark_unhealthy(str(err))
                logger.info("replica %s added (%s); it joins once its stages answer: %s", replica.id, addresses, err)
                return replica
            info = replica.head_info
            if info is not None and info.model_name != self.model_name:
                await self.pool.remove(replica)
                raise InvalidRequest(f"the pipeline {addresses} serves {info.model_name!r}; this gateway serves "
                                     f"{self.model_name!r}")
            replica.mark_healthy()
        logger.info("replica %s added and serving: %s", replica.id, addresses)
        return replica

    def drain(self, replica: ReplicaClient, on: bool = True) -> None:
        if replica.busy is not None:
            raise Conflict(f"replica {replica.id} is {replica.busy}")
        replica.drain(on)
        logger.info("replica %s %s", replica.id, "draining: no new requests" if on else "serves new requests again")

    async def remove(self, replica: ReplicaClient, timeout_s: float) -> int:
        """Drain ``replica``, give its requests ``timeout_s`` to finish, move the rest to other
        replicas, close it. Returns how many requests moved."""
        self._check_alone(replica, "removed")
        with self._busy(replica, "being removed"):
            replica.drain()
            moved = await self._empty(replica, timeout_s, f"replica {replica.id} was removed")
            await self.pool.remove(replica)
        logger.info("replica %s removed (%d request(s) moved to other replicas)", replica.id, moved)
        return moved

    async def replace_stage(self, replica: ReplicaClient, index: int, address: object, timeout_s: float) -> int:
        """Re-wire ``replica`` with the stage at ``address`` in position ``index``: the new stage must
        answer and hold the same layers; the replica's requests finish or move first (they
        could not go on: the new stage has none of their KV). Returns how many moved."""
        if not 0 <= index < len(replica.addresses):
            raise NotFound(f"replica {replica.id} has stages 0..{len(replica.addresses) - 1}, no stage {index}")
        new = parse_address(address)
        pipeline = [*replica.addresses[:index], new, *replica.addresses[index + 1:]]
        self._check_addresses(pipeline, ignore=replica)
        self._check_alone(replica, "re-wired")
        with self._busy(replica, f"having stage {index} replaced"):
            await self._check_fits(replica, index, new)
            was_draining = replica.draining
            replica.drain()
            try:
                moved = await self._empty(replica, timeout_s, f"stage {index} of replica {replica.id} is replaced")
                if index > 0:
                    await self._wait_head_idle(replica)
                await self._rewire(replica, pipeline)
            finally:
                replica.drain(was_draining)
        logger.info("replica %s: stage %d is now %s (%d request(s) moved meanwhile)", replica.id, index, new, moved)
        return moved

    async def _check_fits(self, replica: ReplicaClient, index: int, address: str) -> None:
        try:
            info = await stage_info_at(address, self.config.stage_credentials, self.config.rpc_timeout_s)
        except StagemeshError as err:
            raise Conflict(f"the new stage did not answer: {err}") from None
        old = replica.stage_infos[index] if len(replica.stage_infos) == len(replica.addresses) else None
        if old is None:
            return  # never wired: Wire checks the pipeline
        if (info.model_name, info.num_layers, info.start_layer, info.end_layer) != (
            old.model_name, old.num_layers, old.start_layer, old.end_layer
        ):
            raise Conflict(
                f"stage {address} holds layers {info.start_layer}:{info.end_layer} of {info.model_name!r} "
                f"({info.num_layers} layers); stage {index} of replica {replica.id} holds layers "
                f"{old.start_layer}:{old.end_layer} of {old.model_name!r} ({old.num_layers} layers)"
            )

    async def _empty(self, replica: ReplicaClient, timeout_s: float, reason: str) -> int:
        """Wait up to ``timeout_s`` for the requests on ``replica`` to finish, then move the rest."""
        await _wait(lambda: replica.gate.running == 0 and replica.active_requests == 0, timeout_s)
        moved = replica.evict_all(reason)
        if moved:
            logger.info("%s: moving %d request(s) to other replicas", reason, moved)
        await _wait(lambda: replica.gate.running == 0 and replica.active_requests == 0, 10.0)
        return moved

    async def _wait_head_idle(self, replica: ReplicaClient) -> None:
        """The head dropped the aborted requests (their KV on the stage being replaced is gone)."""
        deadline = time.monotonic() + _HEAD_IDLE_S
        while True:
            try:
                info = await replica.stage_info(0)
            except StagemeshError:
                return  # a head that does not answer runs nothing the re-wire could break (Wire will say)
            if info.num_running + info.num_waiting == 0:
                return
            if time.monotonic() > deadline:
                raise Conflict(f"the head of replica {replica.id} still runs {info.num_running + info.num_waiting} "
                               "request(s) (not the gateway's?): the stage cannot be replaced under them")
            await asyncio.sleep(0.05)

    async def _rewire(self, replica: ReplicaClient, pipeline: list[str]) -> None:
        old = list(replica.addresses)
        await replica.replace_addresses(pipeline)
        try:
            await replica.wire()
        except StagemeshError as err:
            await replica.replace_addresses(old)
            replica.needs_rewire = True  # the old stages may have taken part of the new wiring
            replica.mark_unhealthy(f"re-wire with {pipeline} failed: {err}")
            raise Conflict(f"re-wiring replica {replica.id} as {pipeline} failed, the old pipeline is kept "
                           f"(the health loop re-wires it): {err}") from None
        replica.mark_healthy()


async def _wait(done: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
