"""The data plane: how step frames move between neighbouring stages."""

from stagekit.transport.base import Transport

__all__ = ["Transport"]
