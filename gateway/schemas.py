"""Request bodies of the OpenAI-compatible endpoints (pydantic); unknown fields are ignored.

Only shapes and types live here; value checks that need the model (lengths, vocabulary)
happen in `prompts.py` and `sampling.py` so that their messages name the numbers.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, WithJsonSchema

# Roles a chat message may have (the model's template may accept fewer).
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# The documented schemas say what `prompts.py` accepts (non-empty text, non-empty id lists,
# ids >= 0) while validation stays there, so that its messages name the numbers.
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# Smart-mode union: each prompt form matches exactly one member; bools never pass as ids.
PromptInput = (
    Annotated[StrictStr, WithJsonSchema(_TEXT)]
    | Annotated[list[StrictInt], WithJsonSchema(_IDS)]
    | Annotated[list[StrictStr], WithJsonSchema({"type": "array", "items": _TEXT, "minItems": 1})]
    | Annotated[list[list[StrictInt]], WithJsonSchema({"type": "array", "items": _IDS, "minItems": 1})]
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields the completions and chat endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(json_schema_extra={"enum": sorted(CHAT_ROLES)})
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
