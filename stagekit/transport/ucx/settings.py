"""Settings of the UCX data plane: which UCX transports carry the bytes, whether endpoints
use error handling, how the asyncio loop drives UCX progress, and the timeouts.

UCX cannot give shared memory and peer-failure isolation at once: endpoint error handling
excludes the shared-memory transports, and without it any transport error (cma reading
a dead peer's memory) aborts the process. Hence the profiles:

- ``auto`` (default): ``UCX_TLS=posix,tcp``; a link to a stage on the same host uses
  shared memory without error handling (a dead neighbour is noticed through its pidfd),
  a link to another host uses TCP with error handling.
- ``shm``: ``UCX_TLS=posix``, no error handling: same host only.
- ``cma``: ``UCX_TLS=posix,cma``, no error handling: same host only; large messages move
  with one copy (process_vm_readv) instead of two, but a neighbour dying while this
  process copies out of its memory makes UCX abort this process (SIGABRT): fate-sharing.
- ``tcp``: ``UCX_TLS=tcp`` with error handling: any host; a dead neighbour makes pending
  sends and receives fail (TCP reset).

The environment (``STAGEMESH_UCX_*``) overrides a profile's values; ``UCX_*`` variables
the user set win over both (UCX reads them itself).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from stagekit.errors import ConfigError

# profile -> (UCX_TLS, endpoint error handling; None: off on the same host, on across hosts)
PROFILES: dict[str, tuple[str, bool | None]] = {
    "auto": ("posix,tcp", None),
    "shm": ("posix", False),
    "cma": ("posix,cma", False),
    "tcp": ("tcp", True),
}
DEFAULT_PROFILE = "auto"
PROGRESS_MODES = ("event", "polling")


@dataclass(frozen=True, slots=True)
class UcxSettings:
    """Invariant: ``progress`` is one of PROGRESS_MODES and every timeout is positive."""

    profile: str = DEFAULT_PROFILE
    tls: str = PROFILES[DEFAULT_PROFILE][0]
    error_handling: bool | None = PROFILES[DEFAULT_PROFILE][1]
    # event: sleep in epoll on the worker's event fd once nothing moved for spin_us;
    # polling: spin while any request is pending (lowest latency, burns a core).
    progress: str = "event"
    spin_us: float = 200.0
    part_timeout_s: float = 30.0     # a started frame must complete (or the link is declared lost)
    send_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0

    @classmethod
    def for_profile(cls, profile: str) -> UcxSettings:
        if profile not in PROFILES:
            raise ConfigError(f"unknown UCX profile {profile!r} (available: {', '.join(PROFILES)})")
        tls, eh = PROFILES[profile]
        return cls(profile=profile, tls=tls, error_handling=eh)

    @classmethod
    def from_env(cls, profile: str | None = None) -> UcxSettings:
        """The profile (argument, else STAGEMESH_UCX_PROFILE, else the default) with the
        STAGEMESH_UCX_* overrides applied."""
        env = os.environ
        s = cls.for_profile(profile or env.get("STAGEMESH_UCX_PROFILE") or DEFAULT_PROFILE)
        changes: dict[str, object] = {}
        if "STAGEMESH_UCX_TLS" in env:
            changes["tls"] = env["STAGEMESH_UCX_TLS"]
        if "STAGEMESH_UCX_ERROR_HANDLING" in env:
            v = env["STAGEMESH_UCX_ERROR_HANDLING"].lower()
            changes["error_handling"] = None if v == "auto" else v in ("1", "true", "yes", "on")
        if "STAGEMESH_UCX_PROGRESS" in env:
            changes["progress"] = env["STAGEMESH_UCX_PROGRESS"]
        for field, var in (("spin_us", "SPIN_US"), ("part_timeout_s", "PART_TIMEOUT_S"),
                           ("send_timeout_s", "SEND_TIMEOUT_S"), ("connect_timeout_s", "CONNECT_TIMEOUT_S")):
            if f"STAGEMESH_UCX_{var}" in env:
                changes[field] = _number(f"STAGEMESH_UCX_{var}", env[f"STAGEMESH_UCX_{var}"])
        return replace(s, **changes).validated()

    def validated(self) -> UcxSettings:
        if self.progress not in PROGRESS_MODES:
            raise ConfigError(f"unknown UCX progress mode {self.progress!r} "
                              f"(available: {', '.join(PROGRESS_MODES)})")
        for name in ("part_timeout_s", "send_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"UCX setting {name} must be positive")
        if self.spin_us < 0:
            raise ConfigError("UCX setting spin_us must not be negative")
        return self

    def link_error_handling(self, same_host: bool) -> bool:
        """Error handling for a link: the setting, or (auto) on exactly when the peer is remote."""
        return (not same_host) if self.error_handling is None else self.error_handling

    def runtime_key(self) -> tuple:
        """What the process-wide UCX context is built from (error handling is per endpoint)."""
        return (self.tls, self.progress, self.spin_us)

    @property
    def spin_s(self) -> float:
        return math.inf if self.progress == "polling" else self.spin_us * 1e-6

    def describe(self) -> str:
        eh = {None: "off on this host, on across hosts", True: "on", False: "off"}[self.error_handling]
        return f"profile={self.profile} UCX_TLS={self.tls} error-handling={eh} progress={self.progress}"


def prepare_environment(cuda: bool) -> None:
    """Environment UCX reads at import; must run before ``import ucxx``. ucxx itself sets
    UCX_RNDV_FRAG_MEM_TYPE=cuda, which makes CPU-only nodes stage rendezvous via CUDA."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if not cuda:
        os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")


def _number(var: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        # a ValueError would make the default data plane fall back to gRPC in silence
        raise ConfigError(f"{var} must be a number, got {text!r}") from None
