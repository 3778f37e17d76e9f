"""On the gRPC plane a stream from upstream ends the same way whether its sender re-wired
or died; the sender's goodbye tells them apart. A re-wire (or an orderly close) must not
fail the steps the receiver waits on; a stream that just stops must (the kill cases are in
test_peer_death)."""

from __future__ import annotations

import asyncio

from stagekit.testing.transport_host import TransportHost
from stagekit.testing.transport_peer import frame_ok, step_frame
from stagekit.transport.grpc.transport import GrpcTransport
from tests.transport.conftest import LoopThread


def test_rewire_and_close_are_not_a_lost_link(loop_thread: LoopThread) -> None:
    async def scenario() -> None:
        head, last = TransportHost(GrpcTransport()), TransportHost(GrpcTransport())
        await head.start()
        await last.start()
        try:
            await head.link(last.address)
            await last.link(head.address)
            await head.transport.send(step_frame(7, 4096))          # a step of the head's, in flight
            assert frame_ok(await asyncio.wait_for(last.transport.recv(), 10))
            await last.link(head.address)                            # re-wired: bye, then a new stream
            await last.transport.send(step_frame(8, 4096))
            back = await asyncio.wait_for(head.transport.recv(), 10)
            assert back.step is not None and back.step.step_id == 8 and frame_ok(back)
            await asyncio.sleep(0.3)                                 # the old stream's end has been seen
            assert head.transport.inbound_lost == ""
            assert head.transport._inbound.empty()  # type: ignore[attr-defined]  # no error results
            await head.transport.send(step_frame(9, 4096))           # still allowed to originate steps
            await last.transport.close()                             # an orderly close says bye too
            await asyncio.sleep(0.3)
            assert head.transport.inbound_lost == ""
        finally:
            await head.stop()
            await last.stop()

    loop_thread.run(scenario(), timeout=60)
