"""A data-plane peer process for the transport benchmark and tests.

    python -m stagekit.testing.transport_peer --transport ucx:tcp --connect HOST:PORT --role echo

It hosts a transport (see transport_host), links it to the transport hosted at
``--connect`` (if given), prints ``PEER READY <its address>`` and then plays its role
until killed, until stdin closes, until its host (``--parent-pid``, by default the
process that started it) exits, or until no frame moved for ``--idle-timeout`` seconds
(see peer_watchdog; an orderly stop that hangs is cut short too):

- ``echo``: send every frame received straight back.
- ``sink``: drop step frames, send result frames and steps with a negative ``step_id``
  back (one-way bandwidth: N steps, then a result as the acknowledgement; round trips
  with negative ids).
- ``source``: send step frames of ``--nbytes`` of fp16 tensor data, ``step_id`` 0, 1, 2...,
  each tensor filled with ``pattern(step_id)``, ``--interval`` seconds apart.
- ``report``: print ``FRAME <step_id> ok|bad`` per step frame received (checking the
  pattern), ``NOTICE 0 <reason>`` for a link-lost notice (``RESULT <step_id> <error>`` for
  any other result frame) and ``LOST <reason>`` once the inbound link is reported lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import torch

from stagekit.engine.startup_heap import freeze_startup_heap
from stagekit.testing.peer_watchdog import PeerWatchdog
from stagekit.testing.transport_host import TransportHost
from stagekit.transport.factory import make_transport
from stagekit.types.step import Frame, SeqSlice, StepHeader


def pattern(step_id: int) -> float:
    return float(step_id % 1000) / 8.0  # exact in fp16


def step_frame(step_id: int, nbytes: int, dtype: torch.dtype = torch.float16) -> Frame:
    """A step frame with one tensor of ``nbytes`` filled with ``pattern(step_id)``."""
    n = max(nbytes // dtype.itemsize, 0)
    header = StepHeader(step_id, [SeqSlice(1, 0, 1, True)])
    return Frame(step=header, tensors=[torch.full((n,), pattern(step_id), dtype=dtype)])


def frame_ok(frame: Frame) -> bool:
    if frame.step is None or len(frame.tensors) != 1:
        return False
    t = frame.tensors[0]
    return bool((t == pattern(frame.step.step_id)).all())


async def _role(role: str, host: TransportHost, nbytes: int, interval_s: float, watchdog: PeerWatchdog) -> None:
    tr = host.transport
    if role == "source":
        i = 0
        while True:
            await tr.send(step_frame(i, nbytes))
            watchdog.touch()
            i += 1
            await asyncio.sleep(interval_s)  # the gRPC fallback queues sends without bound: pace it
    while True:
        if role == "report":
            try:
                frame = await asyncio.wait_for(tr.recv(), 0.2)
            except asyncio.TimeoutError:
                lost = getattr(tr, "inbound_lost", "")
                if lost:
                    print(f"LOST {lost}", flush=True)
                    return
                continue
            watchdog.touch()
            if frame.result is not None:   # a link-lost notice (the upstream died) or a step's result
                kind = "NOTICE" if frame.result.link_lost else "RESULT"
                print(f"{kind} {frame.result.step_id} {frame.result.error}", flush=True)
                continue
            print(f"FRAME {frame.step.step_id if frame.step else -1} {'ok' if frame_ok(frame) else 'bad'}",
                  flush=True)
            continue
        frame = await tr.recv()
        watchdog.touch()
        if role == "echo" or frame.result is not None or (frame.step is not None and frame.step.step_id < 0):
            await tr.send(frame)


async def _main(args: argparse.Namespace, watchdog: PeerWatchdog) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.read(1) or stop.set())
    host = TransportHost(make_transport(args.transport))
    addr = await host.start()
    if args.connect:
        await host.link(args.connect)
    freeze_startup_heap()   # as a stage does once it serves
    print(f"PEER READY {addr}", flush=True)
    watchdog.touch()
    role = asyncio.create_task(_role(args.role, host, args.nbytes, args.interval, watchdog))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({role, stopped}, return_when=asyncio.FIRST_COMPLETED)
    watchdog.stopping()
    for t in (role, stopped):
        t.cancel()
        with contextlib.suppress(BaseException):
            await t
    if role.done() and not role.cancelled() and role.exception() is not None:
        print(f"ERROR {role.exception()}", flush=True)
    await host.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", required=True, help="ucx, ucx:shm, ucx:tcp or grpc")
    p.add_argument("--connect", default="", help="the other side's host:port (a TransportHost); without it, "
                   "no outbound link (a pure receiver)")
    p.add_argument("--role", choices=["echo", "sink", "source", "report"], default="echo")
    p.add_argument("--nbytes", type=int, default=1 << 20, help="tensor bytes per frame (source)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between frames (source)")
    p.add_argument("--parent-pid", type=int, default=os.getppid(),
                   help="exit when this process exits (default: the process that started this one)")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="exit after this many seconds without a frame sent or received")
    args = p.parse_args(argv)
    watchdog = PeerWatchdog(args.parent_pid, args.idle_timeout).start()
    torch.set_num_threads(1)  # idle OpenMP workers spin and steal the other side's core on small machines
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_main(args, watchdog))


if __name__ == "__main__":
    main()
