"""Take what a process built at start-up (modules, the model, torch's registries) out of
the garbage collector's sight, so that collections during serving only walk what serving
allocates.

Without it, every full collection in a stage process walks torch's and the model's
object graph, a pause of tens of milliseconds in the middle of some decode step
(docs/benchmarks.md, "Measurements behind design choices"). vLLM does the same after its engine has started.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation
    (``gc.freeze``). Returns how many objects were frozen. Call once start-up is done."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze %d start-up objects out of the garbage collector's sight", frozen)
    return frozen
