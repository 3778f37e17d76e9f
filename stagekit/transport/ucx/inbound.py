"""The receiving side of a stage on UCX: an inbox that accepts links (a hello from an
upstream sender, answered with a welcome over an endpoint back to it), and the reader of
the current link, which receives its frames in sequence.

Receives go through the endpoint back to the sender, so that with error handling on a dead
sender cancels them. Each frame: the envelope into a reused fixed-size slot, then every
tensor straight into memory of its final dtype and shape, allocated before the receive is
posted (no staging copy; large host tensors reuse pooled memory, see recv_pool). Waiting
for the next envelope has no deadline (upstream may be idle); once an envelope arrived,
the rest of its frame must follow within ``part_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stagekit.transport import frame_codec
from stagekit.transport.peer_watch import PeerWatch
from stagekit.transport.ucx import wire
from stagekit.transport.ucx.progress import WaitAborted, Watch
from stagekit.transport.ucx.runtime import UcxRuntime, cuda_present
from stagekit.transport.ucx.settings import UcxSettings
from stagekit.types.step import Frame

log = logging.getLogger(__name__)

_FRAMES_PER_TURN = 16


class InboundLink:
    """Invariant: frames are delivered in ``seq`` order, each exactly once and complete;
    after ``stop`` or a loss nothing more is delivered."""

    def __init__(self, rt: UcxRuntime, settings: UcxSettings, ep: Any, hello: wire.Hello,
                 deliver: Callable[[Frame], None], on_lost: Callable[[str], None]) -> None:
        self.rt, self.settings, self.ep, self.hello = rt, settings, ep, hello
        self.link_id = hello.link_id
        self.peer_pid = hello.sender.pid
        self._deliver, self._on_lost = deliver, on_lost
        self._stopped: asyncio.Future[None] = rt.loop.create_future()
        self._watch: PeerWatch | None = None
        self.lost = ""
        self._slot = np.empty(frame_codec.ENVELOPE_BYTES, dtype=np.uint8)  # reused for every envelope
        self.parked: list[object] = [self._slot]
        self._seq = 0                     # the frame due next
        self._env_req: Any = None         # its envelope's receive, once posted
        self._rest: tuple | None = None   # its header/tensor receives, once posted (see _post_rest)
        self._waiting: Watch | None = None
        self.welcomed = False     # the welcome (our one send on this endpoint) completed
        self._mid_frame = False   # a frame's parts are posted and not all in
        self._dropped = False

    def start(self) -> None:
        if self.hello.error_handling:
            self.ep.set_close_callback(lambda: self.rt.loop.call_soon(self._lose, "UCX endpoint to the sender failed"))
        if self.hello.sender.host == wire.this_host() and self.peer_pid != os.getpid():
            self._watch = PeerWatch(self.peer_pid, self._peer_exited)
        self._receive()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._waiting is not None:
            self._waiting.cancel()
        if not self._stopped.done():
            self._stopped.set_result(None)
        self.parked.append((self._env_req, self._rest))   # may still be posted: UCX may write into them
        if not self._dropped:   # never blocks: see UcxRuntime.drop_endpoint
            self._dropped = True
            settled = self.welcomed and not self.lost and not self._mid_frame
            same_host = self.hello.sender.host == wire.this_host()
            self.rt.drop_endpoint(self.ep, self.hello.error_handling, settled, self.peer_pid if same_host else None)

    def _lose(self, reason: str) -> None:
        if self.lost or self._stopped.done():
            return
        self.lost = reason
        self.stop()
        self._on_lost(reason)

    def _receive(self) -> None:
        """Take frames as far as they have arrived, then watch what is outstanding (the
        pump calls back here when it completes). At most _FRAMES_PER_TURN frames per call,
        so a burst of arrived frames does not hold the loop."""
        self._waiting = None
        rt = self.rt
        try:
            for _ in range(_FRAMES_PER_TURN):
                if self._stopped.done():
                    return
                if self._env_req is None:
                    self._env_req = rt.recv(self.ep, self._slot, wire.frame_tag(self.link_id, self._seq,
                                                                                    wire.PART_ENVELOPE))
                if self._rest is None:
                    if not self._env_req.completed:
                        self._waiting = rt.progress.watch([self._env_req], self._receive, idle=True)
                        return
                    self._env_req.check_error()
                    env = frame_codec.decode(self._slot)
                    if env.seq != self._seq & 0xFFFFFFFF:
                        raise ValueError(f"frame {env.seq} arrived where frame {self._seq} was due")
                    if env.inline is not None:
                        self._env_req = None
                        self._delivered(frame_codec.to_frame(env, env.header, env.inline))
                        continue
                    self._rest = self._post_rest(env)
                env, header, tensors, reqs, _ = self._rest
                if not all(r.completed for r in reqs):
                    self._waiting = rt.progress.watch(reqs, self._receive, timeout=self.settings.part_timeout_s,
                                                      on_timeout=self._stalled)
                    return
                for r in reqs:
                    r.check_error()
                self._rest = None
                self._mid_frame = False
                self._env_req = None
                self._delivered(frame_codec.to_frame(env, env.header if header is None else header.tobytes(),
                                                     tensors))
            rt.loop.call_soon(self._receive)
        except Exception as e:  # a failed request (peer gone) or a corrupt envelope
            self._lose(f"receive failed: {e}")

    def _delivered(self, frame: Frame) -> None:
        self._seq += 1
        self._deliver(frame)

    def _peer_exited(self) -> None:
        if not self.hello.error_handling and self._mid_frame:
            # it may have died inside a write into our FIFO
            self.rt.mark_shm_unsafe(f"upstream process {self.peer_pid} exited in the middle of frame {self._seq}")
        self._lose(f"upstream process {self.peer_pid} exited")

    def _stalled(self) -> None:
        if not self.hello.error_handling:   # a wedged FIFO looks just like this
            self.rt.mark_shm_unsafe(f"frame {self._seq} from process {self.peer_pid} stopped arriving")
        self._lose(f"frame {self._seq} incomplete after {self.settings.part_timeout_s:.0f}s (sender stalled)")

    def _post_rest(self, env: frame_codec.Envelope) -> tuple:
        """Post the receives of the frame's overflowing header and its tensors, into memory
        allocated where they will live: (envelope, header buffer or None, tensors, requests)."""
        bufs: list[object] = []
        tags: list[int] = []
        seq = self._seq
        header = np.empty(env.header_len, dtype=np.uint8) if env.overflow else None
        if header is not None:
            bufs.append(header)
            tags.append(wire.frame_tag(self.link_id, seq, wire.PART_HEADER))
        cuda = cuda_present()
        tensors = []
        for i, spec in enumerate(env.specs):
            if spec.cuda and cuda:
                t = torch.empty(spec.shape, dtype=spec.dtype, device="cuda")  # [*shape]
            else:
                t = self.rt.recv_pool.empty(spec.shape, spec.dtype)         # [*shape]
            tensors.append(t)
            if spec.nbytes:
                bufs.append(frame_codec.wire_view(t))
                tags.append(wire.frame_tag(self.link_id, seq, wire.PART_TENSOR0 + i))
        self._mid_frame = bool(bufs)
        reqs = [self.rt.recv(self.ep, b, tag) for b, tag in zip(bufs, tags, strict=True)]
        return env, header, tensors, reqs, bufs


class Inbox:
    """Accepts upstream links for one transport. Invariant: at most one link is current;
    accepting a new one stops the previous one."""

    def __init__(self, rt: UcxRuntime, settings: UcxSettings, inbox: int, deliver: Callable[[Frame], None],
                 on_link: Callable[[InboundLink], None], on_lost: Callable[[str], None]) -> None:
        self.rt, self.settings, self.inbox = rt, settings, inbox
        self._deliver, self._on_link, self._on_lost = deliver, on_link, on_lost
        self._hello_buf = np.empty(wire.HELLO_BYTES, dtype=np.uint8)
        self._stopped: asyncio.Future[None] = rt.loop.create_future()
        self.link: InboundLink | None = None
        self.retired: list[InboundLink] = []   # stopped links: they may own still-posted buffers
        self._task = rt.loop.create_task(self._accept(), name=f"ucx-inbox-{inbox:x}")

    async def _accept(self) -> None:
        while True:
            req = self.rt.recv(None, self._hello_buf, wire.hello_tag(self.inbox))
            try:
                await self.rt.progress.wait([req], abort=self._stopped, idle=True)
                hello = wire.Hello.unpack(self._hello_buf)
            except WaitAborted:
                return
            except Exception as e:
                log.error("bad UCX hello on inbox %x: %s", self.inbox, e)
                continue
            try:
                await self._welcome(hello)
            except Exception as e:
                log.error("could not accept the UCX link from process %d: %s", hello.sender.pid, e)

    async def _welcome(self, hello: wire.Hello) -> None:
        s = self.settings
        ep = await self.rt.endpoint(hello.sender.worker_address, hello.error_handling)
        msg = np.frombuffer(wire.pack_welcome(wire.WELCOME_OK), dtype=np.uint8)
        link = InboundLink(self.rt, s, ep, hello, self._deliver, self._on_lost)
        if self.link is not None:
            self.link.stop()
            self.retired.append(self.link)
        self.link = link
        link.start()   # post the first envelope receive before the sender can send frames
        await self.rt.progress.wait([self.rt.send(ep, msg, wire.welcome_tag(hello.link_id))],
                                    timeout=s.connect_timeout_s)
        link.welcomed = True
        self._on_link(link)
        log.info("accepted UCX link %x from process %d (%s)", hello.link_id, hello.sender.pid,
                 wire.describe_route(hello.sender.host, hello.error_handling))

    def close(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)
        if self.link is not None:
            self.link.stop()
            self.retired.append(self.link)
            self.link = None
