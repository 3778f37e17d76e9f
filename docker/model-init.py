#!/usr/bin/env python3
"""One-shot model check for docker compose (installed in the image as ``stagemesh-model-init``).

Makes sure ``$STAGEMESH_MODEL_ROOT/$STAGEMESH_MODEL`` (default ``/models/demo-llama``) holds a
model before the stages start:

- it has a ``config.json``: nothing to do;
- it is missing and the models come from the compose project's own volume
  (``STAGEMESH_MODELS_DIR`` unset or ``models``): write the demo model there
  (``stagemesh demo-model``, arch ``$STAGEMESH_DEMO_ARCH``, seed ``$STAGEMESH_DEMO_SEED``);
- it is missing from a directory you mounted: fail, naming what is there. It never writes
  into your own model directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    root = Path(os.environ.get("STAGEMESH_MODEL_ROOT", "/models"))
    name = os.environ.get("STAGEMESH_MODEL", "demo-llama")
    source = os.environ.get("STAGEMESH_MODELS_DIR", "") or "models"
    target = root / name
    if (target / "config.json").is_file():
        print(f"model ready: {target}")
        return 0
    if source != "models":
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        print(f"stagemesh-model-init: no config.json in {target} (STAGEMESH_MODELS_DIR={source} is mounted at "
              f"{root}; it holds: {', '.join(present) or 'nothing'}). Set STAGEMESH_MODEL to a directory in it.",
              file=sys.stderr)
        return 1
    arch = os.environ.get("STAGEMESH_DEMO_ARCH", "llama")
    seed = int(os.environ.get("STAGEMESH_DEMO_SEED", "0"))
    from stagekit.demo import write_demo_model

    print(f"writing the demo model (arch {arch}, seed {seed}) to {target}", flush=True)
    write_demo_model(target, arch=arch, seed=seed)
    print(f"model ready: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
