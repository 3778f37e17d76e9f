"""Turning request prompts into token ids, and checking them before any stage sees them."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.schemas import ChatMessage, PromptInput
from gateway.tokenizing import TokenizerLike
from stagekit.errors import InvalidRequest

_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def check_token_ids(ids: Sequence[int], vocab_size: int, *, param: str) -> None:
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(
                f"Token id {token_id} in '{param}' is out of vocabulary (must be in [0, {vocab_size})).",
                param=param,
            )


def completion_prompts(prompt: PromptInput, tokenizer: TokenizerLike, vocab_size: int) -> list[list[int]]:
    """One token-id list per prompt of a completions request (text, ids, or a batch of either)."""
    if isinstance(prompt, str):
        batch: list[str] | list[list[int]] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        batch = [list(prompt)]  # type: ignore[arg-type]
    else:
        batch = list(prompt)  # type: ignore[arg-type]
    if not batch:
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    out = []
    for item in batch:
        if isinstance(item, str):
            if not item:
                raise InvalidRequest("The prompt must not be empty.", param="prompt")
            ids = tokenizer.encode(item, add_special_tokens=True)
        else:
            ids = list(item)
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


def chat_prompt(messages: Sequence[ChatMessage], tokenizer: TokenizerLike, vocab_size: int) -> list[int]:
    """The chat template rendered and encoded (the template carries its own special tokens)."""
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    rendered_messages = []
    for position, message in enumerate(messages):
        if message.role not in _CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{position}]: unknown role '{message.role}' "
                f"(expected one of {', '.join(sorted(_CHAT_ROLES))}).",
                param="messages",
            )
        rendered_messages.append({"role": message.role, "content": _message_text(message, position)})
    try:
        text = tokenizer.apply_chat_template(rendered_messages, add_generation_prompt=True)
    except Exception as err:  # a template's raise_exception() is the user's fault, not ours
        raise InvalidRequest(f"Could not apply the chat template: {err}", param="messages") from err
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequest("The rendered chat prompt is empty.", param="messages")
    check_token_ids(ids, vocab_size, param="messages")
    return ids
