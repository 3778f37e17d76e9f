"""Where a stage sits: its layer range and TP size, validated against the model."""

from __future__ import annotations

from dataclasses import dataclass

from stagekit.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StageLayout:
    """A stage holds layers ``[start_layer, end_layer)`` of a ``num_layers`` model over
    ``tp_size`` ranks. The stage with ``start_layer == 0`` embeds tokens (the replica
    head); the one with ``end_layer == num_layers`` owns the final norm, LM head and
    sampling."""

    start_layer: int
    end_layer: int
    num_layers: int
    tp_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.num_layers

    @property
    def num_local_layers(self) -> int:
        return self.end_layer - self.start_layer

    def validate(self, num_heads: int, num_kv_heads: int) -> None:
        """Raise ConfigError naming the problem when the layout cannot hold the model."""
        if not 0 <= self.start_layer < self.end_layer <= self.num_layers:
            raise ConfigError(
                f"layer range {self.start_layer}:{self.end_layer} is outside the model's "
                f"{self.num_layers} layers (need 0 <= start < end <= {self.num_layers})"
            )
        if self.tp_size < 1:
            raise ConfigError(f"tp size must be >= 1, got {self.tp_size}")
        if num_heads % self.tp_size:
            raise ConfigError(
                f"tp size {self.tp_size} does not divide the model's {num_heads} attention heads"
            )
        if num_kv_heads % self.tp_size and self.tp_size % num_kv_heads:
            raise ConfigError(
                f"tp size {self.tp_size} and the model's {num_kv_heads} KV heads: one must divide the other"
            )


def parse_layers(spec: str, num_layers: int | None = None) -> tuple[int, int]:
    """Parse ``A:B`` (``A:`` or ``:B`` use the model's ends when ``num_layers`` is known)."""
    try:
        a, b = spec.split(":")
        start = int(a) if a else 0
        if b:
            end = int(b)
        elif num_layers is not None:
            end = num_layers
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--layers must look like A:B (half-open layer range), got {spec!r}") from None
    return start, end
