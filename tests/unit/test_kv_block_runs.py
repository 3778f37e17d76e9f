"""KV transfer moves blocks as runs of consecutive ids (one UCX part, one strided copy each)."""

from __future__ import annotations

from services.stage.kv_blocks import runs


def test_runs_of_consecutive_blocks() -> None:
    assert runs([]) == []
    assert runs([4, 5, 6]) == [(0, 4, 3)]
    assert runs([9, 8, 7]) == [(0, 9, 1), (1, 8, 1), (2, 7, 1)]
    assert runs([1, 2, 7, 3, 4, 5]) == [(0, 1, 2), (2, 7, 1), (3, 3, 3)]
