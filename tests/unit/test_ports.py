"""free_port draws ports the kernel never hands out by itself (below its ephemeral range), and
only ports nobody is bound to."""

from __future__ import annotations

import socket

from stagekit.ports import ephemeral_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_are_free() -> None:
    span = ephemeral_range()
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # drawn at random, not one fixed port
    for port in ports:
        if span is not None and span[0] >= 11000:
            assert 10000 <= port < span[0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_returned(monkeypatch) -> None:
    import stagekit.ports as ports

    held = socket.socket()
    held.bind(("127.0.0.1", free_port()))
    taken = held.getsockname()[1]
    forced = [taken, taken]  # the first two draws hit the held port; later ones are random again
    real = ports._rng.randrange
    monkeypatch.setattr(ports._rng, "randrange", lambda lo, hi: forced.pop() if forced else real(lo, hi))
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (32768, 60999))
    try:
        assert free_port() != taken and not forced
    finally:
        held.close()


def test_unknown_range_falls_back_to_the_kernels_choice(tmp_path, monkeypatch) -> None:
    import stagekit.ports as ports

    assert ephemeral_range(str(tmp_path / "missing")) is None
    monkeypatch.setattr(ports, "ephemeral_range", lambda: None)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
