"""`GatewayConfig`: everything a gateway is started with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The replicas (each an ordered list of stage addresses, head first) and gateway knobs."""

    replicas: tuple[tuple[str, ...], ...]
    model_name_override: str | None = None
    api_key: str | None = None
    transport: str = ""
    startup_timeout_s: float = 300.0
    health_interval_s: float = 5.0
    rpc_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.replicas or any(not r for r in self.replicas):
            raise ValueError("every replica needs at least one stage address")
