"""What UCX peers say to each other besides frames: the published address, the hello a
sender opens a link with, the receiver's welcome, and the tag scheme.

Tags are 64 bits. Frame parts: ``link_id (31 bits) | seq (24 bits) | part (8 bits)`` with
the top bit clear; part 0 is the envelope, 1 an overflowing header, 2.. the tensors. A link
is one sender->receiver connection (a fresh random id per ``connect``); ``seq`` counts its
frames, so the receiver posts exactly the next frame's tags and frames on a link can only
be read in order (seq wraps at 2**24: far more frames than can ever be in flight).
Control messages set the top bit: ``hello`` carries the receiver's inbox id, ``welcome``
the link id. One-off bulk transfers (KV blocks between replicas, see ucx/bulk) have kinds
of their own, so they never touch the step links: a ``bulk hello`` on the inbox id, then
the receiver's verdict, the data and its done status on the transfer's id.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_CONTROL = 1 << 63
_HELLO, _WELCOME = 1 << 56, 2 << 56
_BULK_HELLO, BULK_VERDICT, BULK_DATA, BULK_DONE = 3 << 56, 4 << 56, 5 << 56, 6 << 56
PART_ENVELOPE, PART_HEADER, PART_TENSOR0 = 0, 1, 2
HELLO_BYTES = 64 << 10
WELCOME_OK = 0

_ADDRESS = struct.Struct("<6sBxIIH")   # magic, flags, reserved, inbox, pid, host length
ADDRESS_SHM_UNSAFE = 1
_ADDRESS_MAGIC = b"SMUCX1"
_HELLO_HEAD = struct.Struct("<4sIIBxHI")  # magic, link, pid, flags, host length, worker address length
_HELLO_MAGIC = b"SMHI"
_WELCOME_MSG = struct.Struct("<4sI")
_WELCOME_MAGIC = b"SMOK"
FLAG_ERROR_HANDLING = 1


def frame_tag(link_id: int, seq: int, part: int) -> int:
    return ((link_id & 0x7FFFFFFF) << 32) | ((seq & 0xFFFFFF) << 8) | part


def hello_tag(inbox: int) -> int:
    return _CONTROL | _HELLO | inbox


def welcome_tag(link_id: int) -> int:
    return _CONTROL | _WELCOME | link_id


def bulk_hello_tag(inbox: int) -> int:
    return _CONTROL | _BULK_HELLO | inbox


def bulk_tag(kind: int, transfer_id: int, part: int = 0) -> int:
    """A bulk transfer's verdict, data part or done message (``kind`` is BULK_*; parts < 2**24)."""
    return _CONTROL | kind | ((part & 0xFFFFFF) << 32) | (transfer_id & 0xFFFFFFFF)


@functools.cache
def this_host() -> str:
    """Who shares memory and pids with this process: host name, boot and pid namespace.
    Peers with the same identity get shared memory and are watched by pid."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the host name alone
        pass
    return "/".join(parts)


def describe_route(peer_host: str, error_handling: bool) -> str:
    """Where a link's peer runs and how UCX may reach it, for the log: endpoint error handling
    excludes UCX's shared-memory transports, so a link with it goes over the network (TCP)."""
    where = "this host" if peer_host == this_host() else f"host {peer_host.split('/')[0]}"
    how = "error handling on: network transports only" if error_handling else "no error handling: shared memory"
    return f"{where}, {how}"


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Who a peer is on the UCX data plane: its worker address, the inbox its receiver
    listens on, and (to watch its liveness on the same host) its pid and host name.
    ``shm_unsafe``: its shared-memory receive queue may be wedged (UcxRuntime.mark_shm_unsafe):
    reach it over an error-handling (TCP) endpoint."""

    worker_address: bytes
    inbox: int
    pid: int
    host: str
    shm_unsafe: bool = False

    def pack(self) -> bytes:
        host = self.host.encode()
        flags = ADDRESS_SHM_UNSAFE if self.shm_unsafe else 0
        return _ADDRESS.pack(_ADDRESS_MAGIC, flags, self.inbox, self.pid, len(host)) + host + self.worker_address

    @classmethod
    def unpack(cls, raw: bytes) -> PeerAddress:
        if len(raw) < _ADDRESS.size or raw[:6] != _ADDRESS_MAGIC:
            raise ValueError("not a stagemesh UCX address (is the peer running the ucx data plane?)")
        _, flags, inbox, pid, host_len = _ADDRESS.unpack_from(raw, 0)
        host = raw[_ADDRESS.size:_ADDRESS.size + host_len].decode()
        worker = raw[_ADDRESS.size + host_len:]
        return cls(worker, inbox, pid, host, bool(flags & ADDRESS_SHM_UNSAFE))


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens a link; the receiver reaches back to ``sender`` with the same error handling."""

    link_id: int
    sender: PeerAddress
    error_handling: bool

    def pack(self) -> bytes:
        host = self.sender.host.encode()
        flags = FLAG_ERROR_HANDLING if self.error_handling else 0
        head = _HELLO_HEAD.pack(_HELLO_MAGIC, self.link_id, self.sender.pid, flags, len(host),
                                len(self.sender.worker_address))
        raw = head + host + self.sender.worker_address
        if len(raw) > HELLO_BYTES:
            raise ValueError(f"UCX worker address too large for the hello ({len(raw)} bytes)")
        return raw

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Hello:
        magic, link_id, pid, flags, host_len, addr_len = _HELLO_HEAD.unpack_from(raw, 0)
        if magic != _HELLO_MAGIC:
            raise ValueError("not a stagemesh UCX hello")
        off = _HELLO_HEAD.size
        host = bytes(raw[off:off + host_len]).decode()
        worker = bytes(raw[off + host_len:off + host_len + addr_len])
        return cls(link_id, PeerAddress(worker, 0, pid, host), bool(flags & FLAG_ERROR_HANDLING))


def pack_welcome(status: int) -> bytes:
    return _WELCOME_MSG.pack(_WELCOME_MAGIC, status)


def unpack_welcome(raw: bytes | memoryview) -> int:
    magic, status = _WELCOME_MSG.unpack_from(raw, 0)
    if magic != _WELCOME_MAGIC:
        raise ValueError("not a stagemesh UCX welcome")
    return status
