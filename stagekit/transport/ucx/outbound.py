"""The sending end of one UCX link: an endpoint to the downstream stage's worker, opened
with a hello that the receiver answers, and the frames sent on it in sequence."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stagekit.errors import StageUnavailable
from stagekit.processes import process_running
from stagekit.transport import frame_codec
from stagekit.transport.peer_watch import PeerWatch
from stagekit.transport.ucx import wire
from stagekit.transport.ucx.progress import WaitAborted
from stagekit.transport.ucx.runtime import UcxRuntime
from stagekit.transport.ucx.settings import UcxSettings
from stagekit.transport.ucx.wire import PeerAddress
from stagekit.types.step import Frame

log = logging.getLogger(__name__)


class OutboundLink:
    """Invariant: frames are posted in ``seq`` order, all parts of a frame back to back,
    so the receiver, which posts exactly the next frame's tags, reads them in order. Once
    ``lost`` is set the link sends nothing more."""

    def __init__(self, rt: UcxRuntime, settings: UcxSettings, peer_name: str, peer: PeerAddress,
                 on_lost: Callable[[str], None]) -> None:
        self.rt, self.settings = rt, settings
        self.peer_name, self.peer = peer_name, peer
        self.link_id = secrets.randbits(31) | 1
        self.seq = 0
        self.lost = ""
        self._lost_future: asyncio.Future[None] = rt.loop.create_future()
        self._on_lost = on_lost
        self._ep: Any = None
        self.error_handling = False
        self._watch: PeerWatch | None = None
        self.parked: list[object] = []   # buffers of requests abandoned on failure: UCX may still touch them
        self._waiting = 0   # sends (or the hello) whose requests are being waited for

    async def open(self, me: PeerAddress) -> None:
        s, peer = self.settings, self.peer
        same_host = peer.host == wire.this_host()
        error_handling = self.rt.link_error_handling(s, peer)
        failed = await self._open(me, error_handling)
        if failed and not error_handling and same_host and s.error_handling is None and process_running(peer.pid):
            # a live peer sent no welcome back over shared memory: this process's receive FIFO
            # may be wedged (UcxRuntime.mark_shm_unsafe); try once more over TCP
            self.rt.mark_shm_unsafe(f"no answer over shared memory from stage {self.peer_name}")
            self.rt.drop_endpoint(self._ep, False, settled=False)
            self.link_id = secrets.randbits(31) | 1   # a late welcome of the first try matches nothing
            failed = await self._open(me, True)
        if failed:
            raise StageUnavailable(f"UCX link to stage {self.peer_name} failed: {failed}")
        if same_host and peer.pid != os.getpid():
            self._watch = PeerWatch(peer.pid, self._peer_exited)

    async def _open(self, me: PeerAddress, error_handling: bool) -> str:
        """One try: an endpoint, the hello, the welcome. Returns why it got no welcome ("" once
        welcomed); raises StageUnavailable when the peer cannot be reached or refuses."""
        s, peer = self.settings, self.peer
        self.error_handling = error_handling
        try:
            self._ep = await self.rt.endpoint(peer.worker_address, error_handling)
        except Exception as e:
            raise StageUnavailable(f"cannot reach stage {self.peer_name} over UCX ({s.describe()}): {e}") from None
        if error_handling:
            self._ep.set_close_callback(self._ep_closed)
        hello = np.frombuffer(wire.Hello(self.link_id, me, error_handling).pack(), dtype=np.uint8)
        welcome = np.zeros(8, dtype=np.uint8)
        reqs = [self.rt.recv(self._ep, welcome, wire.welcome_tag(self.link_id)),
                self.rt.send(self._ep, hello, wire.hello_tag(peer.inbox))]
        self._waiting += 1
        try:
            await self.rt.progress.wait(reqs, timeout=s.connect_timeout_s)
            status = wire.unpack_welcome(welcome)
        except Exception as e:
            self.parked += [hello, welcome, reqs]
            what = f"no answer within {s.connect_timeout_s:.0f}s" if isinstance(e, TimeoutError) else str(e)
            same_host = peer.host == wire.this_host()
            hint = "" if same_host or error_handling else f" (profile {s.profile} reaches this host only)"
            return what + hint
        finally:
            self._waiting -= 1
        if status != wire.WELCOME_OK:
            raise StageUnavailable(f"stage {self.peer_name} refused the UCX link (status {status})")
        return ""

    def _peer_exited(self) -> None:
        if not self.error_handling and self._waiting:
            # it may have died inside a write into our FIFO (a rendezvous answer, for one)
            self.rt.mark_shm_unsafe(f"stage process {self.peer.pid} exited during a transfer")
        self.lose(f"stage process {self.peer.pid} exited")

    def _ep_closed(self) -> None:
        self.rt.loop.call_soon(self.lose, "UCX endpoint failed (peer gone or connection reset)")

    def lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = reason
        self._lost_future.set_result(None)
        log.error("data-plane link to %s lost: %s", self.peer_name, reason)
        self._on_lost(reason)

    def _down(self) -> StageUnavailable:
        return StageUnavailable(f"data-plane link to {self.peer_name} is down: {self.lost}")

    async def send(self, frame: Frame) -> None:
        if self.lost:
            raise self._down()
        tensors = [t.detach().contiguous() for t in frame.tensors]  # [*shape] each, sent from this memory
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # UCX reads the memory on its own stream: the producer must be done
        seq = self.seq
        self.seq += 1
        envelope, header, inline = frame_codec.encode(Frame(frame.step, frame.result, tensors), seq)
        bufs: list[object] = [envelope]
        tags = [wire.frame_tag(self.link_id, seq, wire.PART_ENVELOPE)]
        if header:
            bufs.append(np.frombuffer(header, dtype=np.uint8))
            tags.append(wire.frame_tag(self.link_id, seq, wire.PART_HEADER))
        for i, t in enumerate([] if inline else tensors):
            if t.numel():
                bufs.append(frame_codec.wire_view(t))
                tags.append(wire.frame_tag(self.link_id, seq, wire.PART_TENSOR0 + i))
        reqs: list[Any] = []
        self._waiting += 1
        try:
            # no await in between: concurrent senders cannot interleave their frames' parts
            for buf, tag in zip(bufs, tags, strict=True):
                reqs.append(self.rt.send(self._ep, buf, tag))
            await self.rt.progress.wait(reqs, timeout=self.settings.send_timeout_s, abort=self._lost_future)
        except WaitAborted:
            self.parked += [bufs, tensors, reqs]
            raise self._down() from None
        except TimeoutError:
            self.parked += [bufs, tensors, reqs]
            if not self.error_handling:   # a wedged FIFO (ours or its) looks just like this
                self.rt.mark_shm_unsafe(f"a send to stage {self.peer_name} over shared memory was never taken")
            self.lose(f"frame {seq} not taken within {self.settings.send_timeout_s:.0f}s (receiver stalled)")
            raise self._down() from None
        except Exception as e:
            self.parked += [bufs, tensors, reqs]
            self.lose(f"send failed: {e}")
            raise self._down() from None
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Stop watching and drop the endpoint, never blocking: closed only if nothing is
        outstanding on it and the peer still runs, else kept (UcxRuntime.drop_endpoint)."""
        if self._watch is not None:
            self._watch.close()
        settled = not self.lost and not self.parked and self._waiting == 0
        if not self.lost:
            self.lost = "closed"
            self._lost_future.set_result(None)
        if self._ep is not None:
            same_host = self.peer.host == wire.this_host()
            self.rt.drop_endpoint(self._ep, self.error_handling, settled, self.peer.pid if same_host else None)
            self._ep = None
