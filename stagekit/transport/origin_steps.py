"""Which steps this stage started and still waits on, so a transport that loses a link
can fail exactly those steps at once instead of leaving them to the head's step timeout.

A step *originates* here when it is sent out without having come in: that is the replica
head's step going down the pipeline. Relays send on steps they received; the last stage
sends results. A result coming back closes its step.

A stage that loses its link from upstream cannot know which steps were on their way to it,
and in a ring of four or more stages the head may be adjacent to neither side of the loss.
So that stage sends a *link-lost notice* (a result frame with ``link_lost`` set) on toward
the head: relays pass results on unchanged, and the head's transport, on receiving one,
fails every step it originated and refuses to originate more until it is re-wired. Every
stage after the lost link is alive (a single failure), so the notice always gets through.
"""

from __future__ import annotations

from stagekit.types.step import Frame, StepResult

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

    @staticmethod
    def notice(reason: str) -> Frame:
        """The link-lost notice a stage sends toward the head when its link from upstream is lost."""
        return Frame(result=StepResult(0, [], [], [], error=reason, link_lost=True))

    def fail_all(self, reason: str) -> list[Frame]:
        """Error results for every open step (and forget them)."""
        frames = [Frame(result=StepResult(sid, [], [], [], error=reason)) for sid in self.open]
        self.open.clear()
        return frames


def lost_notice(local_name: str, reason: str) -> str:
    """What a link-lost notice says: whose link from upstream, and why."""
    return f"data-plane link from upstream into stage {local_name or '(not wired)'} lost: {reason}"


def refusal(inbound_lost: str, ring_broken: str) -> str:
    """Why a stage originates no step: its results could not come back."""
    if inbound_lost:
        return f"results cannot come back: the link from upstream is down ({inbound_lost})"
    return f"the ring is broken downstream ({ring_broken}); waiting to be re-wired"


def _add(d: dict[int, None], key: int) -> None:
    d[key] = None
    if len(d) > _CAP:
        del d[next(iter(d))]
