"""Free TCP ports on the loopback, for rendezvous and for processes started on port 0.

A port probed free here is bound later by someone else (a stage, the gateway, a rendezvous
host), sometimes tens of seconds later. Meanwhile the kernel hands out ports of its
ephemeral range (``net.ipv4.ip_local_port_range``) to every outgoing connection and every
port-0 bind on the machine, and a test suite makes thousands of those: a probed port from
that range can be taken before its owner binds it (CI saw EADDRINUSE). So ports are drawn
at random from below the ephemeral range, which the kernel never assigns by itself; only
another explicit choice of the same port can collide, and the bind probe rules out ports
already in use. Where no such range is known, the kernel picks (port 0), as before.
"""

from __future__ import annotations

import random
import socket

_rng = random.Random()  # its own state: a test seeding the global generator must not make processes agree
_LOWEST = 10000  # below: ports services are configured on by hand


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """The kernel's ephemeral port range, or None where it cannot be read."""
    try:
        with open(path) as f:
            lo, hi = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return None
    return lo, hi


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the caller binds it soon), outside
    the kernel's ephemeral range where that range leaves room below it."""
    span = ephemeral_range()
    if span is not None and span[0] - _LOWEST >= 1000:
        for _ in range(64):
            port = _rng.randrange(_LOWEST, span[0])
            if _bindable(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
