"""Turning request prompts into token ids, and checking them before any stage sees them.

The functions here are CPU-heavy for large prompts (tokenizing, chat templates): request
handlers run them on the gateway's worker pool (`GatewayState.offload`). Text is bounded in
characters before it is tokenized, and must be valid Unicode: a lone UTF-16 surrogate that a
JSON string can carry (``"\\ud800"``) has no UTF-8 form, so no tokenizer can take it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import PROMPT_CHARS_PER_TOKEN
from gateway.errors import ContextLengthExceeded
from gateway.schemas import CHAT_ROLES, ChatMessage, PromptInput
from gateway.tokenizing import TokenizerLike
from stagekit.errors import InvalidRequest


def check_token_ids(ids: Sequence[int], vocab_size: int, *, param: str) -> None:
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(
                f"Token id {token_id} in '{param}' is out of vocabulary (must be in [0, {vocab_size})).",
                param=param,
            )


def check_text(text: str, *, param: str, where: str = "The prompt") -> None:
    """Refuse text with a lone surrogate: it cannot be encoded, so it cannot be tokenized."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"{where} contains an unpaired UTF-16 surrogate (U+{ord(text[err.start]):04X} at character "
            f"{err.start}); text must be valid Unicode.",
            param=param,
        ) from None


def check_chars(num_chars: int, max_chars: int | None, *, param: str) -> None:
    if max_chars is not None and num_chars > max_chars:
        raise ContextLengthExceeded(
            f"The prompt has {num_chars} characters, above this gateway's limit of {max_chars} "
            f"(--max-prompt-chars; by default {PROMPT_CHARS_PER_TOKEN} per token of the context).",
            param=param,
        )


def completion_prompts(
    prompt: PromptInput, tokenizer: TokenizerLike, vocab_size: int, max_chars: int | None = None
) -> list[list[int]]:
    """One token-id list per prompt of a completions request (text, ids, or a batch of either);
    every text is checked (size, Unicode) before any is tokenized."""
    if isinstance(prompt, str):
        batch: list[str] | list[list[int]] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        batch = [list(prompt)]  # type: ignore[arg-type]
    else:
        batch = list(prompt)  # type: ignore[arg-type]
    if not batch or any(not item for item in batch):
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    for item in batch:
        if isinstance(item, str):
            check_chars(len(item), max_chars, param="prompt")
            check_text(item, param="prompt")
    out = []
    for item in batch:
        ids = tokenizer.encode(item, add_special_tokens=True) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequest("The prompt must not be empty.", param="prompt")
        check_token_ids(ids, vocab_size, param="prompt")
        out.append(ids)
    return out


def _message_text(message: ChatMessage, position: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"messages[{position}]: only text content parts are supported, got '{part.type}'.",
                param="messages",
            )
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(
    messages: Sequence[ChatMessage], tokenizer: TokenizerLike, vocab_size: int, max_chars: int | None = None
) -> list[int]:
    """The chat template rendered and encoded (the template carries its own special tokens);
    ``max_chars`` bounds the messages' text together."""
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    rendered_messages = []
    for position, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{position}]: unknown role '{message.role}' "
                f"(expected one of {', '.join(sorted(CHAT_ROLES))}).",
                param="messages",
            )
        rendered_messages.append({"role": message.role, "content": _message_text(message, position)})
    check_chars(sum(len(m["content"]) for m in rendered_messages), max_chars, param="messages")
    for position, message in enumerate(rendered_messages):
        check_text(message["content"], param="messages", where=f"messages[{position}]")
    try:
        text = tokenizer.apply_chat_template(rendered_messages, add_generation_prompt=True)
    except Exception as err:  # a template's raise_exception() is the user's fault, not ours
        raise InvalidRequest(f"Could not apply the chat template: {err}", param="messages") from err
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequest("The rendered chat prompt is empty.", param="messages")
    check_token_ids(ids, vocab_size, param="messages")
    return ids
