"""`TextAssembler`: a choice's text, built token by token, cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.domain import TopLogprob


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One generated token with where its text starts in the choice's text."""

    token_id: int
    text_offset: int
    logprob: float | None
    top: tuple[TopLogprob, ...]


class TextAssembler:
    """Accumulates detokenized text and releases only what can no longer start a stop string.

    Invariant: released text never contains a stop string, and only a tail of the text that
    could begin a stop string is held back; once a stop string is seen the text ends just
    before it.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.stopped = False
        self._released = 0
        self._pending: list[TokenOutput] = []

    def add_token(
        self,
        token_id: int,
        piece: str,
        logprob: float | None,
        top: tuple[TopLogprob, ...],
        can_stop: bool = True,
    ) -> bool:
        """Append one token's text; True when a stop string now ends the choice.

        ``can_stop=False`` (before ``min_tokens``) appends without looking for stop strings.
        """
        self._pending.append(TokenOutput(token_id, len(self.text), logprob, top))
        return self.add_text(piece, can_stop)

    def add_text(self, piece: str, can_stop: bool = True) -> bool:
        if self.stopped or not piece:
            return self.stopped
        start = len(self.text)
        self.text += piece
        if not can_stop:
            return False
        # No stop string was in the text before, so a new one ends inside ``piece``.
        search_from = max(0, start - self._hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        tail = self.text[-self._hold :] if self._hold else ""
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop):
                return k
        return 0

    def release(self, final: bool = False) -> tuple[str, tuple[TokenOutput, ...]]:
        """Text and tokens safe to show now (everything when ``final`` or stopped)."""
        if final or self.stopped:
            safe = len(self.text)
            tokens, self._pending = tuple(self._pending), []
        else:
            safe = max(self._released, len(self.text) - self._partial_stop_len())
            tokens = tuple(t for t in self._pending if t.text_offset < safe)
            self._pending = self._pending[len(tokens) :]
        text = self.text[self._released : safe]
        self._released = safe
        return text, tokens
