"""What the SDK hands back: frozen dataclasses, never protobuf."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stagekit.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """New output of one choice; its last chunk has ``finish_reason`` (stop, length or abort).
    ``seed``: the request's seed (sent, or chosen by the gateway; None from a gateway that
    does not report it): sending it back reproduces the output."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] = ()
    finish_reason: str | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TopLogprob, ...], ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """Every choice of a request; ``seed`` as on `Chunk`."""

    request_id: str
    model: str
    choices: tuple[Choice, ...]
    usage: Usage
    seed: int | None = None

    @property
    def text(self) -> str:
        """The first choice's text (the only one unless ``n > 1``)."""
        return self.choices[0].text if self.choices else ""


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    max_model_len: int
    owned_by: str = ""
    created: int = 0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation request: a text prompt, token ids, or chat messages, plus sampling.

    ``None`` means "the gateway's default" (the same defaults as its REST API: 16 tokens for
    prompts, the rest of the context for chat; temperature 1).
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    @classmethod
    def build(
        cls,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        min_tokens: int = 0,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        n: int = 1,
    ) -> GenerationRequest:
        """The request the SDK's keyword arguments describe; exactly one of ``prompt`` and ``messages``."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of a prompt (text or token ids) and chat messages")
        chat = None
        if messages is not None:
            try:
                chat = tuple((str(m["role"]), str(m.get("content") or "")) for m in messages)
            except (KeyError, TypeError, AttributeError) as err:
                raise InvalidRequest("each chat message needs a 'role' and a 'content'") from err
        text_or_ids = None if prompt is None else prompt if isinstance(prompt, str) else tuple(int(t) for t in prompt)
        return cls(
            prompt=text_or_ids,
            messages=chat,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            min_tokens=min_tokens,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            stop_token_ids=tuple(stop_token_ids or ()),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            n=n,
        )
