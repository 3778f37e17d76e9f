"""What the gateway needs from a tokenizer, and how it gets one from the head's files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class IncrementalDetokenizer(Protocol):
    def push(self, ids: list[int]) -> str:
        """Text the new ids complete (may be empty while a UTF-8 sequence is unfinished)."""
        ...

    def flush(self) -> str: ...


class TokenizerLike(Protocol):
    """The subset of `stagekit.tokenizer.Tokenizer` the gateway relies on."""

    vocab_size: int
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def detokenizer(self, prompt_ids: list[int] | None = None) -> IncrementalDetokenizer: ...


TokenizerFactory = Callable[[dict[str, bytes]], TokenizerLike]


def load_tokenizer(files: dict[str, bytes]) -> TokenizerLike:
    """The project's tokenizer built from the files the replica head sent (GetTokenizer)."""
    from stagekit.tokenizer import Tokenizer  # core package; imported late so the gateway imports cheaply

    return Tokenizer.from_files(files)
