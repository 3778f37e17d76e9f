"""OpenAI log-probability structures (legacy completions and chat) from generated tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gateway.textstream import TokenOutput
from gateway.tokenizing import TokenizerLike

# OpenAI's stand-in for "no usable log-probability" (missing, -inf, NaN); JSON has no infinities.
_MISSING = -9999.0


def _finite(logprob: float | None) -> float:
    return logprob if logprob is not None and math.isfinite(logprob) else _MISSING


def _token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokens: Sequence[TokenOutput], tokenizer: TokenizerLike, num_top: int) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` of legacy completions."""
    top_logprobs: list[dict[str, float] | None] = []
    for t in tokens:
        top: dict[str, float] = {}
        for entry in t.top[:num_top]:
            top.setdefault(_token_text(tokenizer, entry.token_id), _finite(entry.logprob))
        if t.logprob is not None:
            top.setdefault(_token_text(tokenizer, t.token_id), _finite(t.logprob))
        top_logprobs.append(top)
    return {
        "tokens": [_token_text(tokenizer, t.token_id) for t in tokens],
        "token_logprobs": [None if t.logprob is None else _finite(t.logprob) for t in tokens],
        "top_logprobs": top_logprobs,
        "text_offset": [t.text_offset for t in tokens],
    }


def _chat_entry(tokenizer: TokenizerLike, token_id: int, logprob: float | None) -> dict[str, Any]:
    text = _token_text(tokenizer, token_id)
    return {
        "token": text,
        "logprob": _finite(logprob),
        "bytes": list(text.encode("utf-8")),
    }


def chat_logprobs(tokens: Sequence[TokenOutput], tokenizer: TokenizerLike, num_top: int) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}`` of chat completions."""
    content = []
    for t in tokens:
        entry = _chat_entry(tokenizer, t.token_id, t.logprob)
        entry["top_logprobs"] = [_chat_entry(tokenizer, e.token_id, e.logprob) for e in t.top[:num_top]]
        content.append(entry)
    return {"content": content}
