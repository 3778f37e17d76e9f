"""What a weight loader reads from: a checkpoint tensor that can be sliced before it is
materialised, so each rank reads only its shard."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class WeightSource(Protocol):
    """A lazily readable checkpoint tensor."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Read ``[start, start+length)`` along ``dim`` (everything along other dims)."""
        ...

    def full(self) -> torch.Tensor: ...


class SafetensorsSource:
    """A tensor inside a safetensors file, read through ``safe_open(...).get_slice``."""

    def __init__(self, sl: Any) -> None:
        self._slice = sl

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def full(self) -> torch.Tensor:
        return self._slice[:]


class TensorSource:
    """An in-memory tensor (tests, and checkpoints converted on the fly)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._t.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._t.narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self._t


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copy ``loaded`` into ``param`` (casting dtype), refusing a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


def default_weight_loader(param: torch.nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
    """Load a replicated parameter whole."""
    copy_checked(param, src.full(), "replicated weight")
