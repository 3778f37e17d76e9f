"""`GatewayConfig`: everything a gateway is started with."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.roles import BOTH, PREFILL, PdSettings, check_roles
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials

ROUTING_POLICIES = ("round_robin", "least_loaded", "prefix")


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """How much the gateway holds at once: requests in flight per replica, and requests waiting
    for a slot (per replica and in total). Beyond these a request is refused with 429, so
    memory stays bounded however many clients arrive."""

    max_running_per_replica: int = 256
    max_waiting_per_replica: int = 256
    max_waiting_total: int = 1024

    def __post_init__(self) -> None:
        if self.max_running_per_replica < 1:
            raise ValueError("max_running_per_replica must be at least 1")
        if self.max_waiting_per_replica < 0 or self.max_waiting_total < 0:
            raise ValueError("waiting limits must be >= 0")


# A prompt longer than this many characters per token of the limit is refused before it is
# tokenized: ordinary text averages ~4 characters a token, and even runs of spaces or
# punctuation, which some vocabularies hold as single long tokens, rarely reach 32.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request limits checked at the gateway before any stage sees the request.
    ``max_prompt_chars`` bounds a text prompt before tokenizing (None: ``PROMPT_CHARS_PER_TOKEN``
    per token of ``max_prompt_tokens``, else of the model's context; see ``prompt_chars``)."""

    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be at least 1")

    def prompt_chars(self, max_model_len: int) -> int | None:
        """The most characters a text prompt (or a chat's messages together) may have."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        tokens = self.max_prompt_tokens or max_model_len
        return PROMPT_CHARS_PER_TOKEN * tokens if tokens > 0 else None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The replicas (each an ordered list of stage addresses, head first) and gateway knobs.

    ``replicas`` come from ``--replica``, ``file_replicas`` from ``replica_file`` (read at start,
    reloaded on SIGHUP); at least one of them is given. ``api_keys`` and ``admin_api_keys`` are
    kept out of ``repr`` so that logging a config never shows a key; no admin key, no admin API.
    """

    replicas: tuple[tuple[str, ...], ...]
    model_name_override: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    routing: str | None = None  # None: round_robin, or least_loaded when the replicas form a DP group
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    tls_cert: str | None = None  # PEM files: serve the REST API and the gRPC Generation API over TLS
    tls_key: str | None = None
    rest_tls: bool = True  # False: TLS on gRPC only (the deprecated --grpc-tls-cert/--grpc-tls-key)
    stage_credentials: MeshCredentials = field(default=PLAINTEXT, repr=False)  # TLS and token toward stages
    admission: AdmissionLimits = AdmissionLimits()
    limits: RequestLimits = RequestLimits()
    migrate: bool = True
    transport: str = ""
    startup_timeout_s: float = 300.0
    health_interval_s: float = 5.0
    rpc_timeout_s: float = 5.0
    admin_api_keys: tuple[str, ...] = field(default=(), repr=False)
    replica_file: str | None = None
    file_replicas: tuple[tuple[str, ...], ...] = ()
    stall_timeout_s: float = 30.0  # 0: off
    # prefill/decode disaggregation: each replica's role ("prefill", "decode", "both"; empty: all both)
    roles: tuple[str, ...] = ()
    pd: PdSettings = PdSettings()

    def __post_init__(self) -> None:
        if not self.replicas and not self.file_replicas:
            raise ValueError("no replica: give --replica (or --prefill-replica and --decode-replica) or a "
                             "--replica-file that names one")
        if any(not r for r in (*self.replicas, *self.file_replicas)):
            raise ValueError("every replica needs at least one stage address")
        seen: set[str] = set()
        for address in (a for r in (*self.replicas, *self.file_replicas) for a in r):
            if address in seen:  # two pipelines wiring one stage would take turns re-pointing its link
                raise ValueError(f"stage {address} is named in two replicas (or twice in one): a stage belongs to "
                                 "one pipeline")
            seen.add(address)
        if self.stall_timeout_s < 0:
            raise ValueError("the stall timeout must be >= 0 (0: off)")
        if self.roles and len(self.roles) != len(self.replicas):
            raise ValueError(f"{len(self.roles)} roles for {len(self.replicas)} replicas")
        check_roles(self.roles)
        if self.routing is not None and self.routing not in ROUTING_POLICIES:
            raise ValueError(f"unknown routing policy {self.routing!r} (choose from {', '.join(ROUTING_POLICIES)})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if any(not key for key in (*self.api_keys, *self.admin_api_keys)):
            raise ValueError("API keys must not be empty")

    def role_of(self, replica: int) -> str:
        # replicas past the flags' (from --replica-file or the admin API) serve both roles
        return self.roles[replica] if replica < len(self.roles) else BOTH

    @property
    def disaggregated(self) -> bool:
        """Prefill replicas hand requests to decode replicas (gateway/pd.py)."""
        return PREFILL in self.roles
