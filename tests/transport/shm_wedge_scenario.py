"""Run by test_shm_wedge.py in a process of its own (what it does may wedge this process's
shared-memory FIFO for good): a same-host sender on the `auto` profile streams 8 MiB
frames, is stopped in the middle of one and killed; then a new same-host peer links both
ways and a frame goes around. Prints one JSON line with what was seen."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from stagekit.testing.transport_peer import frame_ok, step_frame
from stagekit.transport.ucx import wire
from tests.transport.conftest import LoopThread, link, unlink


async def _kill_mid_frame(tr: object, pid: int) -> bool:
    await asyncio.wait_for(tr.recv(), 30)  # type: ignore[attr-defined]
    mid = False
    for _ in range(50):   # stop the sender until it stops with a frame half-received
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(0.05)
        link_ = tr._inbox.link  # type: ignore[attr-defined]
        mid = link_ is not None and link_._mid_frame
        if mid:
            break
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not tr.inbound_lost and time.monotonic() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    return mid


async def _round_trip(tr: object) -> bool:
    await tr.send(step_frame(5, 1 << 20))  # type: ignore[attr-defined]
    while True:
        f = await asyncio.wait_for(tr.recv(), 30)  # type: ignore[attr-defined]
        if f.step is not None:
            return f.step.step_id == 5 and frame_ok(f)


def main() -> None:
    lt = LoopThread()
    out: dict = {}
    src = link(lt, "ucx", "source", "--nbytes", str(8 << 20), "--interval", "0")
    tr = src.transport
    out["mid_frame"] = lt.run(_kill_mid_frame(tr, src.peer.proc.pid))
    out["inbound_lost"] = tr.inbound_lost
    out["shm_unsafe"] = tr._rt.shm_unsafe  # type: ignore[attr-defined]
    out["published_unsafe"] = wire.PeerAddress.unpack(tr.local_address()).shm_unsafe
    src.peer.kill()
    lt.run(src.host.stop())
    try:
        new = link(lt, "ucx", "echo")
        out["out_error_handling"] = new.transport._out.error_handling  # type: ignore[attr-defined]
        out["in_error_handling"] = new.transport._inbox.link.hello.error_handling  # type: ignore[attr-defined]
        out["round_trip"] = lt.run(_round_trip(new.transport))
        unlink(lt, new)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)   # the kept endpoint to the killed peer must not be closed at exit


if __name__ == "__main__":
    main()
