"""Wall-clock attribution of a replica head's decode step, from outside the code it times.

Module forward hooks and method wrappers attached to a live engine (never to the code itself:
nothing runs when nothing is attached) open and close timed regions; each region's time counts
once, in the innermost enclosing region (exclusive time), in the record of the step in progress.
The engine side of a step is timed by marks: a step runs from the start of the ``schedule`` call
that made it to the start of the next one, so the categories of a record add up to that
interval by construction, and the gaps between marks are the thread hand-offs.

With ``trace`` on, every region is also a ``torch.profiler.record_function`` range, so a
profiler trace shows the same categories around the aten ops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# category -> what it holds; the table prints them in this order
CATEGORIES: dict[str, str] = {
    "matmul": "matmuls: QKV, O, gate/up, down",
    "fused_layer": "fused layers (MoE: attention half)",
    "lm_head": "matmul: LM head",
    "attention": "attention: KV write + paged decode",
    "norm": "RMSNorm (+ residual add)",
    "rope": "RoPE",
    "act": "SiLU*mul",
    "embed": "embedding",
    "tp_comm": "TP collectives",
    "moe": "MoE routing/experts",
    "layer_glue": "Python + views in the layers",
    "step_setup": "step inputs: KV tables, batch",
    "sampling": "sampling",
    "runtime": "stage runtime + TP executor",
    "scheduler": "scheduler: schedule + postprocess",
    "to_compute": "hand-off loop -> compute thread",
    "to_loop": "hand-off compute thread -> loop",
    "event_loop": "event loop: streaming, wake-ups",
}
# the categories that run on the compute thread (the rest run on the event loop)
COMPUTE = ("matmul", "fused_layer", "lm_head", "attention", "norm", "rope", "act", "embed", "tp_comm", "moe",
           "layer_glue", "step_setup", "sampling", "runtime")


@dataclass
class StepRecord:
    """One engine step: its batch, its marks (perf_counter seconds) and exclusive seconds by category."""

    start: float
    num_seqs: int
    num_tokens: int
    decode: bool
    marks: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    end: float = 0.0

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] = self.seconds.get(category, 0.0) + seconds

    def close(self, end: float) -> None:
        """Fill the engine-side categories from the marks (a step whose marks are missing
        failed or was cut short: it keeps only what was timed)."""
        self.end = end
        m = self.marks
        if {"scheduled", "process_start", "process_end", "post_start", "post_end"} <= m.keys():
            self.add("to_compute", m["process_start"] - m["scheduled"])
            self.add("to_loop", m["post_start"] - m["process_end"])
            self.add("event_loop", end - m["post_end"])

    @property
    def wall(self) -> float:
        return self.end - self.start


class StepClock:
    """Invariant: a timed second is counted at most once, in the innermost open region of the
    thread that spent it, in the record of the step in progress (one step in flight at a time:
    a one-stage pipeline, whose depth is 1)."""

    def __init__(self, trace: bool = False) -> None:
        self.trace = trace
        self.records: list[StepRecord] = []
        self.current: StepRecord | None = None
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    # regions
    def _stack(self) -> list[list[Any]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def enter(self, category: str) -> None:
        rf = None
        if self.trace:
            rf = torch.profiler.record_function(category)
            rf.__enter__()
        self._stack().append([category, time.perf_counter(), 0.0, rf])

    def exit(self) -> None:
        now = time.perf_counter()
        stack = self._stack()
        category, start, children, rf = stack.pop()
        if rf is not None:
            rf.__exit__(None, None, None)
        elapsed = now - start
        if self.current is not None:
            self.current.add(category, elapsed - children)
        if stack:
            stack[-1][2] += elapsed

    # attaching
    def wrap(self, obj: object, name: str, category: str) -> None:
        """Time every call of ``obj.name`` (an instance attribute shadows the method until ``detach``)."""
        original = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(category)
            try:
                return original(*args, **kwargs)
            finally:
                self.exit()

        self._replace(obj, name, timed)

    def hook(self, module: nn.Module, category: str) -> None:
        """Time ``module``'s forward calls as ``category``."""
        pre = module.register_forward_pre_hook(lambda _m, _a: self.enter(category))
        post = module.register_forward_hook(lambda _m, _a, _o: self.exit())
        self._undo += [pre.remove, post.remove]

    def mark(self, obj: object, name: str, before: str, after: str) -> None:
        """Record the perf_counter time at which each call of ``obj.name`` starts and ends."""
        original = getattr(obj, name)

        def marked(*args: Any, **kwargs: Any) -> Any:
            if self.current is not None:
                self.current.marks[before] = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.current is not None:
                    self.current.marks[after] = time.perf_counter()

        self._replace(obj, name, marked)

    def step_boundary(self, scheduler: object) -> None:
        """Wrap ``scheduler.schedule``: its start closes the step in progress; a header it
        returns opens the next record (its own time counts as scheduler time of that step)."""
        original = scheduler.schedule  # type: ignore[attr-defined]

        def schedule(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if self.current is not None:
                self.current.close(start)
                self.records.append(self.current)
                self.current = None
            header = original(*args, **kwargs)
            if header is not None:
                decode = bool(header.seqs) and all(s.num_new == 1 and s.sample for s in header.seqs)
                rec = StepRecord(start, len(header.seqs), header.num_tokens, decode)
                rec.marks["scheduled"] = time.perf_counter()
                rec.add("scheduler", rec.marks["scheduled"] - start)
                self.current = rec
            return header

        self._replace(scheduler, "schedule", schedule)

    def _replace(self, obj: object, name: str, fn: Callable[..., Any]) -> None:
        """Shadow ``obj.name`` with an instance attribute; ``detach`` restores what was there."""
        had = name in vars(obj)
        before = vars(obj).get(name)
        setattr(obj, name, fn)
        self._undo.append(lambda: setattr(obj, name, before) if had else delattr(obj, name))

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
