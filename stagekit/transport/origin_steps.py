"""Which steps this stage started and still waits on, so a transport that loses a link
can fail exactly those steps at once instead of leaving them to the head's step timeout.

A step *originates* here when it is sent out without having come in: that is the replica
head's step going down the pipeline. Relays send on steps they received; the last stage
sends results. A result coming back closes its step.
"""

from __future__ import annotations

from stagekit.engine.step import Frame, StepResult

_CAP = 4096  # both sets are bounded: a step whose result never comes back must not leak


class OriginSteps:
    """Invariant: ``open`` holds the ids of steps sent from here whose result has not been
    received, oldest first, at most _CAP of them."""

    def __init__(self) -> None:
        self._passing: dict[int, None] = {}
        self.open: dict[int, None] = {}

    def received(self, frame: Frame) -> None:
        if frame.step is not None:
            _add(self._passing, frame.step.step_id)
        elif frame.result is not None:
            self.open.pop(frame.result.step_id, None)

    def sent(self, frame: Frame) -> None:
        if frame.step is None:
            return
        sid = frame.step.step_id
        if sid in self._passing:  # passing through: not ours
            del self._passing[sid]
            return
        _add(self.open, sid)

    def originates(self, frame: Frame) -> bool:
        return frame.step is not None and frame.step.step_id not in self._passing

    def fail_all(self, reason: str) -> list[Frame]:
        """Error results for every open step (and forget them)."""
        frames = [Frame(result=StepResult(sid, [], [], [], error=reason)) for sid in self.open]
        self.open.clear()
        return frames


def _add(d: dict[int, None], key: int) -> None:
    d[key] = None
    if len(d) > _CAP:
        del d[next(iter(d))]
