"""``--replica-file``: the gateway's replicas read from a file, reloaded on SIGHUP.

One replica per line, its stage addresses in layer order, comma separated; ``#`` starts a
comment, blank lines are skipped. A reload compares the file with the replicas that came from
it (those of ``--replica`` flags and of the admin API are left alone):

- a line naming the same stages as a replica: nothing changes;
- a line with as many stages as a replica no line names any more and the same address in at
  least one position: that replica with the other stages replaced (re-wired, `ReplicaAdmin`);
- any other new line: a new replica; a replica no line names: drained and removed.

A file that does not parse (or names a stage twice) is refused as a whole: the error is logged
with its line, and the replicas stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from gateway.metrics import GatewayMetrics
from gateway.replica import ReplicaClient
from gateway.replica_admin import ReplicaAdmin, parse_address
from stagekit.errors import InvalidRequest, StagemeshError

logger = logging.getLogger("stagemesh.gateway")

Pipeline = tuple[str, ...]


def parse_replica_file(path: str | Path) -> list[Pipeline]:
    """The replicas a file names; `InvalidRequest` naming the file and line when it is malformed,
    OSError when it cannot be read."""
    out: list[Pipeline] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            pipeline = tuple(parse_address(p) for p in parts)
        except InvalidRequest as err:
            raise InvalidRequest(f"{path}:{number}: {err} in {raw.strip()!r}") from None
        for address in pipeline:
            if address in seen:
                where = "earlier on this line" if seen[address] == number else f"on line {seen[address]}"
                raise InvalidRequest(f"{path}:{number}: stage {address} is named {where} too: a stage belongs to "
                                     "one pipeline")
            seen[address] = number
        out.append(pipeline)
    return out


def _match(pipeline: Pipeline, replicas: Sequence[ReplicaClient]) -> ReplicaClient | None:
    """The replica this changed line describes: same length, one address in the same place."""
    for r in replicas:
        if len(r.addresses) == len(pipeline) and any(a == b for a, b in zip(r.addresses, pipeline, strict=True)):
            return r
    return None


class ReplicaFile:
    """Keeps the file's replicas in the pool equal to what the file says, at each `reload`.

    Invariant: reloads run one at a time, in the order asked for; a reload that fails halfway
    (a stage that does not fit) logs why and leaves what it had done so far. A SIGHUP before the
    gateway serves (``admin`` not attached yet) is applied once it does.
    """

    def __init__(self, path: str, metrics: GatewayMetrics | None = None, timeout_s: float = 30.0) -> None:
        self.path = path
        self.admin: ReplicaAdmin | None = None
        self.metrics = metrics
        self._pending = False
        self.timeout_s = timeout_s  # for in-flight requests of a removed replica or a replaced stage
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def install_sighup(self) -> bool:
        """Reload on SIGHUP; False where the loop cannot take signals (not the main thread)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_soon)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            logger.warning("--replica-file %s: no SIGHUP reloads here (%s)", self.path, err)
            return False
        return True

    def uninstall_sighup(self) -> None:
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (RuntimeError, ValueError, NotImplementedError):
            pass

    def attach(self, admin: ReplicaAdmin) -> None:
        """The gateway serves: reloads can change its pool now (one asked for meanwhile runs)."""
        self.admin = admin
        if self._pending:
            self._pending = False
            self.reload_soon()

    def reload_soon(self) -> None:
        if self.admin is None:
            logger.info("SIGHUP during start-up: %s is read again once the gateway serves", self.path)
            self._pending = True
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.replica_file_reloads.labels(outcome=outcome).inc()

    async def reload(self) -> bool:
        """Apply the file now; False (and a log line saying why) if it was refused or a change failed."""
        async with self._lock:
            logger.info("reloading replicas from %s", self.path)
            try:
                wanted = parse_replica_file(self.path)
            except (InvalidRequest, OSError, UnicodeDecodeError) as err:
                logger.error("--replica-file not applied, the replicas stay as they were: %s", err)
                self._count("invalid")
                return False
            try:
                await self._apply(wanted)
            except StagemeshError as err:
                logger.error("--replica-file %s applied in part: %s", self.path, err)
                self._count("failed")
                return False
            self._count("ok")
            return True

    async def _apply(self, wanted: list[Pipeline]) -> None:
        admin = self.admin
        assert admin is not None  # reloads start only once attached
        ours = [r for r in admin.pool.replicas if r.origin == "file"]
        kept = {r.addresses for r in ours}
        gone = [r for r in ours if r.addresses not in set(wanted)]
        changed: list[tuple[ReplicaClient, Pipeline]] = []
        added: list[Pipeline] = []
        for pipeline in (p for p in wanted if p not in kept):
            r = _match(pipeline, gone)
            if r is None:
                added.append(pipeline)
            else:
                gone.remove(r)
                changed.append((r, pipeline))
        for r in gone:  # first: a stage may move from a removed replica to a new one
            await admin.remove(r, self.timeout_s)
            logger.info("--replica-file: removed replica %s %s", r.id, list(r.addresses))
        for pipeline in added:
            replica = await admin.add(list(pipeline), origin="file")
            logger.info("--replica-file: added replica %s %s", replica.id, list(pipeline))
        for r, pipeline in changed:
            for index, address in enumerate(pipeline):
                if r.addresses[index] != address:
                    await admin.replace_stage(r, index, address, self.timeout_s)
