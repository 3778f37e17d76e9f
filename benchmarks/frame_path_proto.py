"""What a decode step costs per hop when the frame is posted from C: a prototype, measured.

Two processes bounce the decode-sized step (32 sequences, hidden_states and residual
[32, 4096] fp16: 512 KiB) with tight ``progress_once`` loops (no asyncio, no pump), two ways:

- ``ucxx``: today's wire format through ucxx's Python API: the envelope (frame_codec) and a
  tag message per tensor; the receiver reads the envelope, then posts the tensors' receives;
- ``native``: the frame as ONE message, posted from a C shim over libucp
  (``frame_path_shim.c``, built here with ``cc`` against the libucx wheel's headers, on
  ucxx's worker and endpoint): an IOV of envelope + padding + tensors; the receiver posts a
  receive of up to 1 MiB for the next frame ahead of time and makes the tensors views of it.

Both encode the step (StepHeader, 32 SeqSlices) and parse it back on every hop, as stages
do. The measuring side also reports its median phases per round trip (µs): post (encode
and post), send wait, receive wait (includes the peer's take + post), take (decode and
build the step).

    .venv/bin/python benchmarks/frame_path_proto.py --mode native [--profile shm] [--iters 300]

Prints one JSON object. Compare with ``python -m stagemesh.bench.ucx_pingpong --profile shm
--sizes 524288`` (bare ucxx bouncing 512 KiB) in the same session.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagekit.transport import frame_codec
from stagekit.types.step import Frame
from stagemesh.bench.transport_probe import decode_step
from stagemesh.bench.ucx_pingpong import endpoint_to_measurer, endpoint_to_peer, init_ucxx

_ALIGN = 64
_CAP = 1 << 20
_FULL_MASK = (1 << 64) - 1


def _build_shim(out_dir: str) -> ctypes.CDLL:
    import libucx

    root = Path(libucx.__path__[0])
    out = Path(out_dir) / "frame_path_shim.so"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", f"-I{root / 'include'}",
                    str(Path(__file__).with_name("frame_path_shim.c")), "-o", str(out), f"-L{root / 'lib'}",
                    "-lucp", f"-Wl,-rpath,{root / 'lib'}"], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


class Op:
    """One outstanding shim operation: its C struct lives in a numpy buffer Python reads."""

    def __init__(self, lib: ctypes.CDLL, worker_handle: int) -> None:
        self.lib, self.worker_handle = lib, worker_handle
        self.raw = np.zeros(lib.sm_op_size(), np.uint8)
        self.state = self.raw[:8].view(np.int32)     # [state, status]
        self.length = self.raw[8:16].view(np.uint64)
        self.ptrs, self.lens = np.zeros(64, np.uint64), np.zeros(64, np.uint64)

    def _iov(self, arrays: list[np.ndarray]) -> tuple[ctypes.c_void_p, ctypes.c_void_p, int]:
        for i, a in enumerate(arrays):
            self.ptrs[i], self.lens[i] = a.ctypes.data, a.nbytes
        return ctypes.c_void_p(self.ptrs.ctypes.data), ctypes.c_void_p(self.lens.ctypes.data), len(arrays)

    def send(self, ep_handle: int, tag: int, arrays: list[np.ndarray]) -> None:
        self.lib.sm_tag_send(ctypes.c_void_p(ep_handle), ctypes.c_uint64(tag), *self._iov(arrays),
                             ctypes.c_void_p(self.raw.ctypes.data))

    def recv(self, tag: int, arrays: list[np.ndarray]) -> None:
        self.lib.sm_tag_recv(ctypes.c_void_p(self.worker_handle), ctypes.c_uint64(tag), ctypes.c_uint64(_FULL_MASK),
                             *self._iov(arrays), ctypes.c_void_p(self.raw.ctypes.data))

    @property
    def completed(self) -> bool:
        return bool(self.state[0] == 1)

    def check_error(self) -> None:
        if self.state[1] != 0:
            raise RuntimeError(f"UCX status {int(self.state[1])}")


class Bouncer:
    def __init__(self, ucxx: Any, ep: Any, mode: str, lib: ctypes.CDLL | None) -> None:
        self.worker = ucxx.core._get_ctx().worker
        self.ep, self.mode = ep._ep, mode
        if lib is not None:
            self.send_op, self.recv_op = Op(lib, self.worker.handle), Op(lib, self.worker.handle)
        self.pool = torch.empty(_CAP, dtype=torch.uint8)   # [CAP] the pre-posted receive buffer
        self.slot = np.empty(frame_codec.ENVELOPE_BYTES, np.uint8)
        self.pad = np.zeros(_ALIGN, np.uint8)

    def wait(self, req: Any) -> None:
        while not req.completed:
            self.worker.progress_once()
        req.check_error()

    # native: one IOV message per frame
    def post_native(self, seq: int, frame: Frame) -> None:
        env, _, _ = frame_codec.encode(frame, seq)
        parts = [env, self.pad[:(-env.nbytes) % _ALIGN], *[frame_codec.wire_view(t) for t in frame.tensors]]
        self.send_op.send(self.ep.handle, seq, [p for p in parts if p.nbytes])

    def take_native(self) -> Frame:
        raw = self.pool.numpy()
        env = frame_codec.decode(raw)
        off = frame_codec._PREFIX.size + sum(frame_codec._TENSOR.size + 8 * len(s.shape) for s in env.specs)
        off += len(env.header)
        off += (-off) % _ALIGN
        tensors = []
        for s in env.specs:
            tensors.append(self.pool[off:off + s.nbytes].view(s.dtype).view(s.shape))
            off += s.nbytes
        return frame_codec.to_frame(env, env.header, tensors)

    # ucxx: envelope + a message per tensor, as the transport sends today
    def post_ucxx(self, seq: int, frame: Frame) -> list[Any]:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag

        env, _, _ = frame_codec.encode(frame, seq)
        reqs = [self.ep.tag_send(Array(env), Tag(seq * 8))]
        for i, t in enumerate(frame.tensors):
            reqs.append(self.ep.tag_send(Array(frame_codec.wire_view(t)), Tag(seq * 8 + 1 + i)))
        return reqs

    def take_ucxx(self, seq: int) -> Frame:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        self.wait(self.ep.tag_recv(Array(self.slot), Tag(seq * 8), TagMaskFull))
        env = frame_codec.decode(self.slot)
        out = self.pool
        tensors, reqs, off = [], [], 0
        for i, s in enumerate(env.specs):
            t = out[off:off + s.nbytes].view(s.dtype).view(s.shape)
            off += s.nbytes + (-s.nbytes) % _ALIGN
            tensors.append(t)
            reqs.append(self.ep.tag_recv(Array(frame_codec.wire_view(t)), Tag(seq * 8 + 1 + i), TagMaskFull))
        for r in reqs:
            self.wait(r)
        return frame_codec.to_frame(env, env.header, tensors)

    def round(self, seq: int, frame: Frame | None, first: bool) -> tuple[Frame, tuple[float, ...]]:
        """One hop out and one back (first) or back and out (the echo); the phases when first."""
        t0 = time.perf_counter()
        if self.mode == "native":
            if not first:
                self.recv_op.recv(seq, [self.pool.numpy()])
                self.wait(self.recv_op)
                got = self.take_native()
                self.post_native(seq + 1, got)
                self.wait(self.send_op)
                return got, ()
            self.recv_op.recv(seq + 1, [self.pool.numpy()])
            self.post_native(seq, frame)
            t1 = time.perf_counter()
            self.wait(self.send_op)
            t2 = time.perf_counter()
            self.wait(self.recv_op)
            t3 = time.perf_counter()
            got = self.take_native()
        else:
            if not first:
                got = self.take_ucxx(seq)
                for r in self.post_ucxx(seq + 1, got):
                    self.wait(r)
                return got, ()
            reqs = self.post_ucxx(seq, frame)
            t1 = time.perf_counter()
            for r in reqs:
                self.wait(r)
            t2 = time.perf_counter()
            got = self.take_ucxx(seq + 1)   # its receive wait and take are not separable here
            t3 = t2
        t4 = time.perf_counter()
        return got, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)


def _bounce(b: Bouncer, first: bool, iters: int) -> dict:
    frame = decode_step(1)
    rtts, phases = [], []
    got = frame
    for i in range(iters):
        t0 = time.perf_counter()
        got, ph = b.round(2 * i, frame, first)
        rtts.append(time.perf_counter() - t0)
        phases.append(ph)
    if not first:
        return {}
    if not (torch.equal(got.tensors[0], frame.tensors[0]) and got.step.step_id == frame.step.step_id):
        raise AssertionError("the frame came back different")
    warm = iters // 5
    cols = list(zip(*phases[warm:], strict=True))
    return {"rtt_us": statistics.median(rtts[warm:]) * 1e6,
            "phases_us": {k: statistics.median(c) * 1e6
                          for k, c in zip(("post", "send_wait", "recv_wait", "take"), cols, strict=True)}}


async def _main(args: argparse.Namespace) -> None:
    ucxx, error_handling = init_ucxx(args.profile)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        lib = _build_shim(tmp) if args.mode == "native" else None
        if args.serve:
            ep = await endpoint_to_measurer(ucxx, error_handling)
            _bounce(Bouncer(ucxx, ep, args.mode, lib), False, args.iters)
            sys.stdin.readline()   # the measuring side is done: close only then
            return
        cmd = [sys.executable, __file__, "--serve", "--mode", args.mode, "--profile", args.profile,
               "--iters", str(args.iters)]
        async with endpoint_to_peer(ucxx, cmd, error_handling) as ep:
            out = _bounce(Bouncer(ucxx, ep, args.mode, lib), True, args.iters)
        print(json.dumps({"mode": args.mode, "profile": args.profile, **out}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["native", "ucxx"], required=True)
    p.add_argument("--profile", default="shm", help="UCX profile of both ends (default shm)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
