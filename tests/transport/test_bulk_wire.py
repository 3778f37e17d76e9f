"""The UCX bulk-transfer wire format (KV blocks between replicas): hellos carry the sender,
the header and the parts' sizes intact; errors come back as the same typed errors; bulk
tags never collide with a step link's tags."""

from __future__ import annotations

import pytest

from stagekit.errors import InvalidRequest, StagemeshError, StageUnavailable
from stagekit.transport.ucx import bulk as ucx_bulk
from stagekit.transport.ucx import wire as ucx_wire


def test_a_bulk_hello_round_trips() -> None:
    sender = ucx_wire.PeerAddress(b"\x01worker\x00addr", 0, 4321, "host/boot/ns")
    hello = ucx_bulk.BulkHello(0x1234567, sender, True, b"\x00header\xff", (1 << 20, 0, 49152))
    raw = hello.pack()
    buf = bytearray(ucx_bulk.BULK_HELLO_BYTES)   # received into a larger fixed buffer
    buf[:len(raw)] = raw
    assert ucx_bulk.BulkHello.unpack(memoryview(buf)) == hello


def test_too_many_parts_or_too_large_a_header_are_refused() -> None:
    sender = ucx_wire.PeerAddress(b"w", 0, 1, "h")
    with pytest.raises(InvalidRequest):
        ucx_bulk.BulkHello(1, sender, False, b"", (1,) * (ucx_bulk.MAX_PARTS + 1)).pack()
    with pytest.raises(InvalidRequest):
        ucx_bulk.BulkHello(1, sender, False, b"x" * ucx_bulk.BULK_HELLO_BYTES, ()).pack()


@pytest.mark.parametrize("error", [InvalidRequest("layers 0:3 vs 3:5"), StageUnavailable("gone"),
                                   RuntimeError("a bug")])
def test_errors_come_back_typed(error: Exception) -> None:
    status = ucx_bulk.pack_status(error)
    with pytest.raises(StagemeshError) as raised:
        ucx_bulk.raise_status(status, "stage X")
    expected = type(error) if isinstance(error, StagemeshError) else StagemeshError
    assert type(raised.value) is expected and str(error) in str(raised.value)
    ucx_bulk.raise_status(ucx_bulk.pack_status(None), "stage X")   # OK raises nothing


def test_bulk_tags_are_a_space_of_their_own() -> None:
    tid = link = 0x7FFFFFFF
    frame_tags = {ucx_wire.frame_tag(link, seq, part) for seq in (0, 1, 0xFFFFFF) for part in (0, 1, 2, 255)}
    control = {ucx_wire.hello_tag(tid), ucx_wire.welcome_tag(tid)}
    bulk = {ucx_wire.bulk_hello_tag(tid)} | {ucx_wire.bulk_tag(kind, tid, part)
                                             for kind in (ucx_wire.BULK_VERDICT, ucx_wire.BULK_DATA,
                                                          ucx_wire.BULK_DONE)
                                             for part in (0, 1, 0xFFFFFF)}
    assert len(bulk) == 10 and not bulk & frame_tags and not bulk & control
    assert all(t < 1 << 64 for t in bulk)
