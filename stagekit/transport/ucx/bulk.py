"""One-off bulk transfers over UCX: one small header plus a payload, from any stage to any
other stage's worker (the KV blocks a replica exports to another), outside the step links.

The payload is a list of contiguous *parts* (views of the sender's memory, e.g. runs of KV
blocks of one layer in the pool) whose bytes, joined, are one tensor on the receiver: each
part travels as a message of its own, sent from where it lives and received straight into
its place in the receiver's tensor, so neither side gathers or stages the bytes.

A transfer: the sender opens an endpoint to the receiver's worker and sends a *bulk hello*
(a fresh transfer id, its own address, the parts' sizes, the header) on the receiver's
inbox id; the receiver checks the header and answers with a *verdict* (an error, or OK
once it posted the receives of the parts into a tensor of the announced dtype and shape);
the sender then sends the parts, and the receiver answers *done* (OK, or the error that
writing the tensor raised). Errors travel as a code and a message and are raised again as the same typed
error on the sender. The tags are control tags of their own (ucx/wire), so a transfer
never replaces or disturbs the step link from upstream.

Nothing waits forever: the verdict within ``connect_timeout_s``, the data and done within
``part_timeout_s`` plus the time the bytes take at a floor rate; a peer on this host that
exits is seen through its pidfd, one elsewhere through the endpoint's error.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stagekit.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)
from stagekit.transport import frame_codec
from stagekit.transport.peer_watch import PeerWatch
from stagekit.transport.ucx import wire
from stagekit.transport.ucx.progress import WaitAborted
from stagekit.transport.ucx.runtime import UcxRuntime
from stagekit.transport.ucx.settings import UcxSettings
from stagekit.transport.ucx.wire import PeerAddress

BULK_HELLO_BYTES = 256 << 10
STATUS_BYTES = 4 << 10
MIN_RATE_BYTES_S = 50e6   # the data may take this long at least before a transfer is declared stalled
STATUS_OK = 0
_ERRORS: list[type[StagemeshError]] = [InvalidRequest, NotFound, CapacityExceeded, StageUnavailable,
                                        DeadlineExceeded, StagemeshError]
_HELLO_HEAD = struct.Struct("<4sIIBxHIII")  # magic, transfer id, pid, flags, host/worker/header len, parts
MAX_PARTS = 1 << 14
_HELLO_MAGIC = b"SMBK"
_STATUS = struct.Struct("<4sBxH")          # magic, code, message length
_STATUS_MAGIC = b"SMST"

# Buffers and endpoints of abandoned transfers: UCX may still read or write them.
PARKED: list[object] = []


@dataclass(frozen=True, slots=True)
class BulkHello:
    """Opens a transfer; the receiver reaches back to ``sender`` with the same error handling."""

    transfer_id: int
    sender: PeerAddress
    error_handling: bool
    header: bytes
    part_bytes: tuple[int, ...]   # the payload's parts, in order

    def pack(self) -> bytes:
        host = self.sender.host.encode()
        if len(self.part_bytes) > MAX_PARTS:
            raise InvalidRequest(f"a bulk transfer of {len(self.part_bytes)} parts (at most {MAX_PARTS})")
        head = _HELLO_HEAD.pack(_HELLO_MAGIC, self.transfer_id, self.sender.pid, int(self.error_handling),
                                len(host), len(self.sender.worker_address), len(self.header), len(self.part_bytes))
        parts = struct.pack(f"<{len(self.part_bytes)}Q", *self.part_bytes)
        raw = head + host + self.sender.worker_address + parts + self.header
        if len(raw) > BULK_HELLO_BYTES:
            raise InvalidRequest(f"a bulk transfer header of {len(self.header)} bytes is too large for UCX")
        return raw

    @classmethod
    def unpack(cls, raw: bytes | memoryview | np.ndarray) -> BulkHello:
        magic, tid, pid, flags, host_len, addr_len, header_len, num_parts = _HELLO_HEAD.unpack_from(raw, 0)
        if magic != _HELLO_MAGIC or num_parts > MAX_PARTS:
            raise ValueError("not a stagemesh UCX bulk hello")
        off = _HELLO_HEAD.size
        host = bytes(raw[off:off + host_len]).decode()
        off += host_len
        worker = bytes(raw[off:off + addr_len])
        off += addr_len
        parts = struct.unpack_from(f"<{num_parts}Q", raw, off)
        off += 8 * num_parts
        header = bytes(raw[off:off + header_len])
        return cls(tid, PeerAddress(worker, 0, pid, host), bool(flags), header, parts)


def pack_status(error: BaseException | None) -> np.ndarray:
    """OK, or the error as the index of its class in _ERRORS (+1) and its message."""
    if error is None:
        code, msg = STATUS_OK, b""
    else:
        code = 1 + next(i for i, cls in enumerate(_ERRORS) if isinstance(error, cls) or cls is StagemeshError)
        msg = (str(error) or type(error).__name__).encode()[:STATUS_BYTES - _STATUS.size]
    return np.frombuffer(_STATUS.pack(_STATUS_MAGIC, code, len(msg)) + msg, dtype=np.uint8)


def raise_status(buf: np.ndarray, who: str) -> None:
    magic, code, n = _STATUS.unpack_from(buf, 0)
    if magic != _STATUS_MAGIC:
        raise StageUnavailable(f"{who} answered the bulk transfer with garbage")
    if code != STATUS_OK:
        cls = _ERRORS[min(code, len(_ERRORS)) - 1]
        raise cls(f"{who}: {bytes(buf[_STATUS.size:_STATUS.size + n]).decode(errors='replace')}")


def data_timeout(settings: UcxSettings, nbytes: int) -> float:
    return settings.part_timeout_s + nbytes / MIN_RATE_BYTES_S


async def send_bulk(rt: UcxRuntime, s: UcxSettings, me: PeerAddress, peer_name: str, peer: PeerAddress, header: bytes,
                    parts: list[torch.Tensor]) -> None:
    """Send ``header`` and the payload ``parts`` (contiguous tensors, sent from their memory)
    to the stage ``peer_name`` whose data plane published ``peer``; returns once it wrote
    them, else raises its typed error (StageUnavailable when it cannot be reached or dies,
    DeadlineExceeded when it stalls). The parts must not change until this returns. ``s``:
    the sending transport's settings (error handling, timeouts)."""
    same_host = peer.host == wire.this_host()
    eh = rt.link_error_handling(s, peer)
    tid = secrets.randbits(31) | 1
    lost: asyncio.Future[str] = rt.loop.create_future()

    def lose(reason: str) -> None:
        if not lost.done():
            lost.set_result(reason)

    try:
        ep = await rt.endpoint(peer.worker_address, eh)
    except Exception as e:
        raise StageUnavailable(f"cannot reach stage {peer_name} over UCX ({s.describe()}): {e}") from None
    if eh:
        ep.set_close_callback(lambda: rt.loop.call_soon(lose, "UCX endpoint failed (peer gone or reset)"))
    watch = (PeerWatch(peer.pid, lambda: lose(f"stage process {peer.pid} exited"))
             if same_host and peer.pid != os.getpid() else None)
    if any(not t.is_contiguous() for t in parts):
        raise ValueError("bulk parts must be contiguous (UCX would ship a strided view's wrong bytes)")
    part_bytes = tuple(t.numel() * t.element_size() for t in parts)
    hello = np.frombuffer(BulkHello(tid, me, eh, header, part_bytes).pack(), dtype=np.uint8)
    verdict, done = np.zeros(STATUS_BYTES, dtype=np.uint8), np.zeros(STATUS_BYTES, dtype=np.uint8)
    reqs: list[Any] = []
    ok = False
    try:
        reqs += [rt.recv(ep, verdict, wire.bulk_tag(wire.BULK_VERDICT, tid)),
                 rt.send(ep, hello, wire.bulk_hello_tag(peer.inbox))]
        await wait_transfer(rt, reqs, s.connect_timeout_s, lost, f"UCX transfer to stage {peer_name}", "answer")
        raise_status(verdict, f"stage {peer_name}")
        reqs.append(rt.recv(ep, done, wire.bulk_tag(wire.BULK_DONE, tid)))
        for i, t in enumerate(parts):
            if t.numel():
                reqs.append(rt.send(ep, frame_codec.wire_view(t), wire.bulk_tag(wire.BULK_DATA, tid, i)))
        await wait_transfer(rt, reqs, data_timeout(s, sum(part_bytes)), lost, f"UCX transfer to stage {peer_name}",
                            "data")
        raise_status(done, f"stage {peer_name}")
        ok = True
    finally:
        if watch is not None:
            watch.close()
        pid = peer.pid if same_host else None
        if ok:
            rt.drop_endpoint(ep, eh, True, pid)
        else:  # requests may still be posted: keep what they point at, drop the endpoint later
            PARKED.append((hello, verdict, done, parts, reqs, ep))
            rt.loop.call_later(s.connect_timeout_s, lambda: rt.drop_endpoint(
                ep, eh, all(r.completed for r in reqs), pid))


async def wait_transfer(rt: UcxRuntime, reqs: list[Any], timeout: float, lost: asyncio.Future[str], label: str,
                        what: str) -> None:
    """Wait for ``reqs`` of a bulk transfer (either side); a lost peer, a stall or a failed
    request as StageUnavailable / DeadlineExceeded naming ``label``."""
    try:
        await rt.progress.wait(reqs, timeout=timeout, abort=lost)
    except WaitAborted:
        raise StageUnavailable(f"{label} failed: {lost.result()}") from None
    except TimeoutError:
        raise DeadlineExceeded(f"{label}: no {what} within {timeout:.0f}s") from None
    except Exception as e:
        raise StageUnavailable(f"{label} failed: {e}") from None
