"""`MeshCredentials`: how a process of the mesh proves itself to stages and checks them.

A stage's certificate is both its server and its client certificate: the stage dials its
neighbours (Wire, the gRPC data plane, KV transfers) with the same pair it serves with, so
one CA can vouch for every member of the mesh. The mesh token travels in call metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from stagekit.errors import ConfigError

MESH_TOKEN_KEY = "x-stagemesh-mesh-token"


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None


@dataclass(frozen=True, slots=True)
class MeshCredentials:
    """PEM bytes and a token; all empty means plaintext without a token (the default).
    Invariant: ``cert`` and ``key`` are both set or both None; ``token`` is never empty."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs both a certificate and its key")
        if self.token is not None and not self.token:
            raise ConfigError("the mesh token must not be empty")

    @classmethod
    def from_files(cls, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   token_file: str | None = None, flag: str = "--tls") -> MeshCredentials:
        """Read the named files (``flag`` names the options in errors); raises ConfigError."""
        token = _read(token_file, "--mesh-token-file")
        text = token.decode().strip() if token is not None else None
        if token_file is not None and not text:
            raise ConfigError(f"--mesh-token-file {token_file} is empty")
        return cls(_read(ca, f"{flag}-ca"), _read(cert, f"{flag}-cert"), _read(key, f"{flag}-key"), text)

    @property
    def tls(self) -> bool:
        """Dial stages over TLS: a CA to check them by, or a certificate to show them, says the mesh uses it."""
        return self.ca is not None or self.cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS checking the peer against ``ca`` (the system roots without one), showing ``cert`` if set."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """None (plaintext) without a certificate; with ``ca``, clients must show a certificate it signed."""
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the token (none without one)."""
        return ((MESH_TOKEN_KEY, self.token),) if self.token else ()


PLAINTEXT = MeshCredentials()
