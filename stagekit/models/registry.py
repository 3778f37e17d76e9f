"""The decoder layer class of an architecture, from the table in stagekit.config.architectures."""

from __future__ import annotations

import importlib

from torch import nn

from stagekit.config.architectures import ARCHITECTURES


def decoder_layer_class(architecture: str) -> type[nn.Module]:
    module, _, cls = ARCHITECTURES[architecture].decoder_layer.partition(":")
    return getattr(importlib.import_module(f"stagekit.models.{module}"), cls)
