"""How the SDK reaches a gateway: target, TLS, API key, deadlines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from stagekit.rpc.channels import RESOLVE_OPTIONS

_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    *RESOLVE_OPTIONS,   # a gateway behind a name that moves is found again within a second
)


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """Where and how to connect.

    ``tls=True`` verifies the server against the system roots, or against
    ``root_certificates`` (PEM bytes or a path to a PEM file) when given; ``credentials``
    overrides both with any `grpc.ChannelCredentials`. ``api_key`` goes out as
    ``authorization: Bearer KEY`` on every call. ``timeout_s`` is the default deadline of a
    call, retries included (None: no deadline).
    """

    target: str
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    root_certificates: bytes | str | None = None
    credentials: grpc.ChannelCredentials | None = None
    timeout_s: float | None = 60.0
    options: tuple[tuple[str, object], ...] = _OPTIONS

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.credentials is not None:
            return self.credentials
        if not self.tls and self.root_certificates is None:
            return None
        roots = self.root_certificates
        if isinstance(roots, str):
            roots = Path(roots).read_bytes()
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def sync_channel(self) -> grpc.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=list(self.options))
        return grpc.secure_channel(self.target, creds, options=list(self.options))

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=list(self.options))
        return grpc.aio.secure_channel(self.target, creds, options=list(self.options))


_DEFAULT = object()


def deadline_for(timeout: float | None | object, default_s: float | None) -> float | None:
    """The monotonic deadline of a call: its own ``timeout`` if given, else the client's."""
    seconds = default_s if timeout is _DEFAULT else timeout
    return None if seconds is None else time.monotonic() + float(seconds)  # type: ignore[arg-type]


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (never negative), for a gRPC ``timeout``."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


DEFAULT_TIMEOUT: object = _DEFAULT
