"""The receiving side of UCX bulk transfers (see ucx/bulk): a loop that takes bulk hellos
on this stage's inbox id (a tag kind of their own: the step link from upstream is never
touched) and serves each transfer in a task of its own.

Serving one: open an endpoint back to the sender (with error handling if it asked, and a
pidfd watch when it runs on this host), hand the header and the parts' sizes to the
handler; the handler checks them and calls ``receive(destinations, deadline)``, which posts
the receives of the payload's parts straight into the destination tensors (the payload's
bytes laid across them in order; no part may straddle two), sends the OK verdict and waits
for the bytes within the data timeout (and before ``deadline``, a ``time.time()``, if any).
A receive UCX has matched cannot be withdrawn: after a failed transfer the destinations may
still be written (they are kept alive), so they must not be memory that is reused.
An error the handler raises before that is the verdict, after it the done status; either
way the sender raises it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from stagekit.errors import InvalidRequest
from stagekit.transport import frame_codec
from stagekit.transport.peer_watch import PeerWatch
from stagekit.transport.ucx import bulk, wire
from stagekit.transport.ucx.progress import WaitAborted
from stagekit.transport.ucx.runtime import UcxRuntime
from stagekit.transport.ucx.settings import UcxSettings

log = logging.getLogger(__name__)

Receive = Callable[[list[torch.Tensor], float | None], Awaitable[None]]
BulkHandler = Callable[[bytes, tuple[int, ...], Receive], Awaitable[None]]
_CLOSE_AFTER_S = 5.0   # the sender closes first; ours goes once our last message surely arrived


class BulkInbox:
    """Invariant: every accepted transfer gets exactly one answer (a verdict, or OK then a done
    status) unless its sender is gone, and its buffers outlive any request that points at them."""

    def __init__(self, rt: UcxRuntime, settings: UcxSettings, inbox: int, handler: BulkHandler) -> None:
        self.rt, self.settings, self.inbox, self.handler = rt, settings, inbox, handler
        self._buf = np.empty(bulk.BULK_HELLO_BYTES, dtype=np.uint8)
        self._stopped: asyncio.Future[None] = rt.loop.create_future()
        self._serving: set[asyncio.Task] = set()
        self._task = rt.loop.create_task(self._accept(), name=f"ucx-bulk-inbox-{inbox:x}")

    async def _accept(self) -> None:
        while True:
            req = self.rt.recv(None, self._buf, wire.bulk_hello_tag(self.inbox))
            try:
                await self.rt.progress.wait([req], abort=self._stopped, idle=True)
                hello = bulk.BulkHello.unpack(self._buf)
            except WaitAborted:
                bulk.PARKED.append((self._buf, req))
                return
            except Exception as e:
                log.error("bad UCX bulk hello on inbox %x: %s", self.inbox, e)
                continue
            task = self.rt.loop.create_task(self._serve(hello), name=f"ucx-bulk-{hello.transfer_id:x}")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, hello: bulk.BulkHello) -> None:
        rt, s, tid = self.rt, self.settings, hello.transfer_id
        try:
            ep = await rt.endpoint(hello.sender.worker_address, hello.error_handling)
        except Exception as e:
            log.error("cannot reach back to the sender of bulk transfer %x (process %d): %s", tid,
                      hello.sender.pid, e)
            return
        lost: asyncio.Future[str] = rt.loop.create_future()

        def lose(reason: str) -> None:
            if not lost.done():
                lost.set_result(reason)

        if hello.error_handling:
            ep.set_close_callback(lambda: rt.loop.call_soon(lose, "UCX endpoint to the sender failed"))
        pid = hello.sender.pid
        watch = (PeerWatch(pid, lambda: lose(f"sending process {pid} exited"))
                 if hello.sender.host == wire.this_host() and pid != os.getpid() else None)
        kept: list[object] = []   # everything a posted request points at
        posted: list = []         # every request posted on ep
        answered = [False]

        async def receive(dests: list[torch.Tensor], deadline: float | None = None) -> None:
            flats = [_bytes_of(d) for d in dests]   # each destination's bytes
            total = sum(f.size for f in flats)
            if sum(hello.part_bytes) != total:
                raise InvalidRequest(f"the sender announced {sum(hello.part_bytes)} bytes for destinations of "
                                     f"{total}")
            views = _lay(hello.part_bytes, flats)
            reqs = [rt.recv(ep, v, wire.bulk_tag(wire.BULK_DATA, tid, i)) for i, v in views]
            ok = bulk.pack_status(None)
            kept.extend([dests, flats, views, ok, reqs])
            reqs.append(rt.send(ep, ok, wire.bulk_tag(wire.BULK_VERDICT, tid)))
            posted.extend(reqs)
            answered[0] = True
            timeout = bulk.data_timeout(s, total)
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.time()))
            await bulk.wait_transfer(rt, reqs, timeout, lost, f"bulk transfer {tid:x}", "complete data")

        error: BaseException | None = None
        try:
            await self.handler(hello.header, hello.part_bytes, receive)
        except Exception as e:
            error = e
            log.warning("bulk transfer %x from process %d failed: %s", tid, pid, e)
        clean = False
        try:
            if not lost.done():
                status = bulk.pack_status(error)
                kept.append(status)
                kind = wire.BULK_DONE if answered[0] else wire.BULK_VERDICT
                posted.append(rt.send(ep, status, wire.bulk_tag(kind, tid)))
                await rt.progress.wait(posted[-1:], timeout=s.connect_timeout_s, abort=lost)
                clean = error is None
        except Exception as e:  # the sender times out on its own
            log.warning("could not answer bulk transfer %x: %s", tid, e or type(e).__name__)
        finally:
            if watch is not None:
                watch.close()
            if not clean:   # a request may still be posted: keep what it points at
                bulk.PARKED.append(kept)
            rt.loop.call_later(_CLOSE_AFTER_S, lambda: rt.drop_endpoint(   # never blocks the loop
                ep, hello.error_handling, bool(posted) and all(r.completed for r in posted),
                pid if watch is not None else None))

    def close(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)
        for task in list(self._serving):
            task.cancel()


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    if not t.is_contiguous() or t.is_cuda:
        raise ValueError("bulk receives land in contiguous host tensors")
    return frame_codec.wire_view(t.reshape(-1)).view(np.uint8)  # type: ignore[attr-defined]


def _lay(part_bytes: tuple[int, ...], flats: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(part index, where its bytes land) for every non-empty part: the parts' bytes laid
    across ``flats`` in order (their total sizes are equal); InvalidRequest when a part would
    straddle two destinations."""
    out, di, off = [], 0, 0
    for i, n in enumerate(part_bytes):
        if not n:
            continue
        while flats[di].size == off:
            di, off = di + 1, 0
        if off + n > flats[di].size:
            raise InvalidRequest(f"bulk part {i} ({n} bytes) straddles two destinations")
        out.append((i, flats[di][off:off + n]))
        off += n
    return out
