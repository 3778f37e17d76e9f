"""ctypes binding of shm_ring.c: a ring of chunks in shared memory, one writer, n readers.

The C file owns the layout and the protocol (its header comment); Python only maps the
segment, fills a ``RingCtx`` per process and calls ``ring_init`` / ``ring_write`` /
``ring_read``, which release the GIL while they wait. There is no torch fallback of the
ring: without the native library the broadcaster's users keep their pipe
(``native_available``), which is the tested fallback.
"""

from __future__ import annotations

import ctypes
import struct

from stagekit.kernels import cpu_build

MAX_READERS = 16
MAGIC = 0x676E6972626D7473  # "stmbring", stored last by ring_init
HEADER = struct.Struct("<Qqqq")  # magic, n_readers, n_chunks, chunk_bytes: the first 32 bytes
TIMEOUT, DEAD, INTR = -1, -2, -4


class RingCtx(ctypes.Structure):
    """ring_ctx_t of shm_ring.c."""

    _fields_ = [("base", ctypes.c_void_p), ("reader", ctypes.c_int), ("writer_pid", ctypes.c_int),
                ("writer_pidfd", ctypes.c_int), ("parent_is_writer", ctypes.c_int),
                ("reader_pids", ctypes.c_int * MAX_READERS), ("reader_pidfds", ctypes.c_int * MAX_READERS),
                ("next", ctypes.c_uint64), ("spin_ns", ctypes.c_long), ("sleep_ms", ctypes.c_long),
                ("timeout_s", ctypes.c_double), ("who", ctypes.c_int)]


def lib() -> ctypes.CDLL | None:
    """The built library with its signatures set, or None (no compiler, or
    ``STAGEMESH_NATIVE_KERNELS=0``)."""
    so = cpu_build.load("shm_ring")
    if so is not None and not getattr(so, "_stagemesh_typed", False):
        ctx, p, long, i64 = ctypes.POINTER(RingCtx), ctypes.c_void_p, ctypes.c_long, ctypes.c_int64
        so.ring_segment_bytes.argtypes, so.ring_segment_bytes.restype = [long, long], long
        so.ring_init.argtypes, so.ring_init.restype = [p, long, long, long], ctypes.c_int
        so.ring_write.argtypes, so.ring_write.restype = [ctx, p, i64], ctypes.c_int
        so.ring_read.argtypes, so.ring_read.restype = [ctx, p, i64], i64
        so._stagemesh_typed = True
    return so


def native_available() -> bool:
    return lib() is not None
