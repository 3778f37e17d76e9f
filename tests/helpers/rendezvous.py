"""Where a test's spawned ranks meet: a file each rank opens (torch's FileStore). A TCP port
probed free beforehand can be taken by another process before rank 0 binds it (CI saw
EADDRINUSE); a fresh file name cannot."""

from __future__ import annotations

import uuid
from pathlib import Path


def rendezvous_url(directory: Path) -> str:
    """A ``file://`` init_method for one world, under ``directory`` (a test's tmp_path)."""
    return f"file://{directory / f'rendezvous-{uuid.uuid4().hex}'}"
