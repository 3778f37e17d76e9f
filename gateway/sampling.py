"""Checking a request's sampling fields and turning them into `SamplingParams`."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace

from gateway.config import RequestLimits
from gateway.errors import ContextLengthExceeded
from gateway.prompts import check_token_ids
from gateway.schemas import SamplingFields
from stagekit.errors import InvalidRequest
from stagekit.types.sampling_params import SEED_RANGE, SamplingParams, temperature_ok, temperature_rule

MAX_N = 128
MAX_TOP_LOGPROBS = 20


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def check_sampling_fields(req: SamplingFields, vocab_size: int) -> None:
    """Value checks that need no prompt; raises `InvalidRequest` naming the field."""
    _require(1 <= req.n <= MAX_N, f"'n' must be between 1 and {MAX_N}, got {req.n}.", "n")
    if req.temperature is not None:
        _require(
            temperature_ok(req.temperature),
            f"'temperature' must be {temperature_rule()}, got {req.temperature}.",
            "temperature",
        )
    if req.top_p is not None:
        _require(0 < req.top_p <= 1, f"'top_p' must be in (0, 1], got {req.top_p}.", "top_p")
    if req.top_k is not None:
        _require(req.top_k >= -1, f"'top_k' must be -1 (off), 0 (off) or positive, got {req.top_k}.", "top_k")
    if req.seed is not None:
        _require(SEED_RANGE[0] <= req.seed < SEED_RANGE[1], "'seed' must fit in a signed 64-bit integer.", "seed")
    _require(req.min_tokens >= 0, f"'min_tokens' must be >= 0, got {req.min_tokens}.", "min_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        _require(not value, f"'{name}' is not supported (only 0).", name)
    _require(not req.logit_bias, "'logit_bias' is not supported.", "logit_bias")
    _require(
        req.stream or req.stream_options is None,
        "'stream_options' is only allowed when 'stream' is true.",
        "stream_options",
    )
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, vocab_size, param="stop_token_ids")
    for stop in stop_strings(req.stop):
        _require(bool(stop), "Stop strings must not be empty.", "stop")


def check_prompt_limit(prompt_len: int, limits: RequestLimits) -> None:
    if limits.max_prompt_tokens is not None and prompt_len > limits.max_prompt_tokens:
        raise ContextLengthExceeded(
            f"The prompt has {prompt_len} tokens, above this gateway's limit of {limits.max_prompt_tokens}.",
            param="prompt",
        )


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def request_seed(req: SamplingFields) -> int:
    """The request's seed, or a random one: every request is sampled with a seed, which its
    response reports, so that any output can be reproduced by sending the seed back."""
    return req.seed if req.seed is not None else secrets.randbits(63)


def build_sampling(
    req: SamplingFields,
    *,
    seed: int,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    top_logprobs: int = 0,
    limits: RequestLimits | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplingParams:
    """Sampling for one prompt with ``seed`` (`request_seed`); ``max_tokens=None`` means
    whatever the context (and the gateway's ``--max-tokens`` limit) leaves. Checked as the
    stage will check it (``validate``), so what the gateway sends on is never refused there."""
    limits = limits or RequestLimits()
    check_prompt_limit(prompt_len, limits)
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"'max_tokens' is {max_tokens}, above this gateway's limit of {limits.max_tokens} tokens per completion.",
            param="max_tokens",
        )
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
        if limits.max_tokens is not None:
            max_tokens = min(max_tokens, limits.max_tokens)
        if max_tokens <= 0:
            raise InvalidRequest(
                f"This model's maximum context length is {max_model_len} tokens, "
                f"but the prompt has {prompt_len} tokens, leaving no room for the completion.",
                param="max_tokens",
            )
    _require(max_tokens > 0, f"'max_tokens' must be at least 1, got {max_tokens}.", "max_tokens")
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens.",
            param="max_tokens",
        )
    _require(
        req.min_tokens <= max_tokens,
        f"'min_tokens' ({req.min_tokens}) must not exceed 'max_tokens' ({max_tokens}).",
        "min_tokens",
    )
    top_p = 1.0 if req.top_p is None else req.top_p
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=top_p,
        top_k=min(max(req.top_k or 0, 0), vocab_size),
        seed=seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        top_logprobs=top_logprobs,
    )
    params.validate(vocab_size, eos_token_ids)
    return params


def for_choice(params: SamplingParams, choice: int) -> SamplingParams:
    """The ``choice``-th of ``n`` samples: a seeded request must not give n identical samples.
    Choice c uses seed + c, wrapped into the signed 64-bit range the stage API carries."""
    if params.seed is None or choice == 0:
        return params
    lo, hi = SEED_RANGE  # wraps around: the stage API's seed is an int64
    return replace(params, seed=(params.seed + choice - lo) % (hi - lo) + lo)
