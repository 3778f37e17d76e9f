"""Human-readable sizes on the command line."""

from __future__ import annotations

import re

from stagekit.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``512MiB`` -> 536870912; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r} (examples: 512MiB, 4GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
