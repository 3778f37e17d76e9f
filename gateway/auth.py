"""API keys: which bearer tokens open ``/v1`` and the gRPC Generation API."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

API_KEYS_ENV = "STAGEMESH_API_KEYS"
ADMIN_API_KEYS_ENV = "STAGEMESH_ADMIN_API_KEYS"  # the admin API's (gateway/admin.py), never the same set


class ApiKeys:
    """A set of accepted keys, compared in constant time.

    Invariant: a key never appears in ``repr``, logs or error messages; an empty set means
    the gateway is open.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} key(s))"

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value (``Bearer KEY``) carries an accepted key."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        found = False
        for key in self._keys:  # no early exit: the time taken says nothing about which key matched
            found |= hmac.compare_digest(given, key)
        return found


def load_api_keys(keys: Sequence[str] = (), files: Sequence[str] = (), *, use_env: bool = True,
                  env: str = API_KEYS_ENV) -> tuple[str, ...]:
    """Keys from ``--api-key`` values, ``--api-key-file`` files (one key per line, ``#``
    comments) and the comma-separated environment variable ``env`` (``STAGEMESH_API_KEYS``)."""
    out = [k.strip() for k in keys if k.strip()]
    for name in files:
        for line in Path(name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    if use_env:
        out.extend(k.strip() for k in os.environ.get(env, "").split(",") if k.strip())
    return tuple(dict.fromkeys(out))
