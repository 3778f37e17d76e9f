"""A KV sender that stalls in the middle of a UCX bulk transfer: once its UCX runs it prints
``ready`` and reads the transfer's header (hex) and payload size from a line on stdin; it
opens the transfer to the stage (hello, the stage's OK verdict: its receive is posted),
prints ``verdict``, then waits
for a line on stdin before it sends the data (every byte ``--fill``) and prints the stage's
done status. A process of its own (UCX is one per process), for
tests/integration/test_kv_late_bytes.py.

    python -m tests.helpers.stalled_kv_sender ADDRESS_HEX     (then on stdin: HEADER_HEX NBYTES)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

import numpy as np

from stagekit.transport.ucx import bulk, wire
from stagekit.transport.ucx.runtime import UcxRuntime
from stagekit.transport.ucx.settings import UcxSettings

FILL = 0x42   # every byte of the payload: as float32, 48.56 (KV no model computes)


async def main(address: bytes) -> None:
    settings = UcxSettings.from_env().validated()
    rt = UcxRuntime.get(settings)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    header_hex, size = (await loop.run_in_executor(None, sys.stdin.readline)).split()
    header, nbytes = bytes.fromhex(header_hex), int(size)
    peer = wire.PeerAddress.unpack(address)
    me = wire.PeerAddress(rt.worker_address(), secrets.randbits(32), os.getpid(), wire.this_host())
    eh = rt.link_error_handling(settings, peer)
    ep = await rt.endpoint(peer.worker_address, eh)
    tid = secrets.randbits(31) | 1
    hello = np.frombuffer(bulk.BulkHello(tid, me, eh, header, (nbytes,)).pack(), dtype=np.uint8)
    verdict, done = np.zeros(bulk.STATUS_BYTES, dtype=np.uint8), np.zeros(bulk.STATUS_BYTES, dtype=np.uint8)
    reqs = [rt.recv(ep, verdict, wire.bulk_tag(wire.BULK_VERDICT, tid)),
            rt.send(ep, hello, wire.bulk_hello_tag(peer.inbox))]
    await rt.progress.wait(reqs, timeout=30)
    bulk.raise_status(verdict, "stage")
    print("verdict", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)   # stalled until told
    data = np.full(nbytes, FILL, dtype=np.uint8)
    answer = rt.recv(ep, done, wire.bulk_tag(wire.BULK_DONE, tid))
    sent = rt.send(ep, data, wire.bulk_tag(wire.BULK_DATA, tid, 0))
    await rt.progress.wait([answer], timeout=30)
    try:
        bulk.raise_status(done, "stage")
        print("done ok", flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(f"done {type(e).__name__}: {e}", flush=True)
    await rt.progress.wait([sent], timeout=10)   # the late bytes went out (into whatever the stage posted)
    print("sent", flush=True)
    os._exit(0)   # skip UCX teardown: the stage may keep the endpoint


if __name__ == "__main__":
    asyncio.run(main(bytes.fromhex(sys.argv[1])))
