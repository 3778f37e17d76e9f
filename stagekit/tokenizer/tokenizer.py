"""Tokenizer built from a checkpoint's HF tokenizer files, using only the ``tokenizers`` library.

Why not ``transformers.AutoTokenizer``: the gateway and stage services must start fast and light, and the
gateway may not have the checkpoint on disk at all; it fetches the few tokenizer files over gRPC
(:meth:`Tokenizer.from_files`). The behaviour (special tokens, eos set, chat template) follows HF's so that
prompts and outputs match what ``transformers`` would produce.

Decoding returns the raw decoder output; ``clean_up_tokenization_spaces`` is not applied, because it is not
prefix-stable and streamed text must concatenate to exactly what :meth:`Tokenizer.decode` returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from stagekit.tokenizer.chat_template import render_chat, select_template
from stagekit.tokenizer.detokenizer import IncrementalDetokenizer

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# transformers >= 4.47 may save the template here instead of in tokenizer_config.json; read it when present.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: Any) -> str | None:
    """Special tokens are stored as a string or as a serialized AddedToken dict with a ``content`` key."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _json_file(files: dict[str, bytes], name: str) -> dict[str, Any]:
    raw = files.get(name)
    if raw is None:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """Encode/decode, special-token ids, chat template rendering and incremental detokenization."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        config = config or {}
        special_tokens_map = special_tokens_map or {}
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        self.special_tokens: dict[str, str] = {}
        for name in _SPECIAL_NAMES:
            content = _token_content(config.get(name, special_tokens_map.get(name)))
            if content is not None:
                self.special_tokens[name] = content
        self.chat_template: str | None = chat_template or select_template(config.get("chat_template"))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        self.eos_token_ids: list[int] = self._collect_eos(generation_config or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory; only tokenizer.json is required."""
        directory = Path(path)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}: stagemesh needs a fast (tokenizers) tokenizer file; "
                "convert the model's tokenizer with transformers (save_pretrained) first"
            )
        names = (*TOKENIZER_FILES, CHAT_TEMPLATE_FILE)
        files = {name: (directory / name).read_bytes() for name in names if (directory / name).is_file()}
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Tokenizer:
        """Load from file name -> content, e.g. as shipped over gRPC; unknown names are ignored."""
        raw = files.get("tokenizer.json")
        if raw is None:
            raise FileNotFoundError(f"tokenizer.json missing from the tokenizer files (got {sorted(files)})")
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        template = files.get(CHAT_TEMPLATE_FILE)
        return cls(
            backend,
            config=_json_file(files, "tokenizer_config.json"),
            special_tokens_map=_json_file(files, "special_tokens_map.json"),
            generation_config=_json_file(files, "generation_config.json"),
            chat_template=template.decode("utf-8") if template is not None else None,
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _collect_eos(self, generation_config: dict[str, Any]) -> list[int]:
        """Generation stops on any of these: the tokenizer's eos plus generation_config's (int or list)."""
        ids: list[int] = []
        tok_eos = self._id_of(self.eos_token)
        if tok_eos is not None:
            ids.append(tok_eos)
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        for i in gen_eos or []:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` for anything this wrapper does not expose."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. a BOS token).

        Through ``encode_batch``, which releases the GIL while it works (``encode`` holds it, ~1 s
        per MB of text): a thread tokenizing a huge prompt must not stop the gateway's event loop.
        For one text both give the same ids at the same speed."""
        return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the tokenizer's vocab (padded model vocab) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """The prompt string for ``messages``; encode it with ``add_special_tokens=False``, since templates
        usually emit the BOS token themselves. Extra keyword arguments (``tools``, ...) reach the template."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template (no 'chat_template' in tokenizer_config.json); "
                "use a completions-style raw prompt instead"
            )
        return render_chat(
            self.chat_template, messages, add_generation_prompt, self.special_tokens, **template_vars
        )

    def detokenizer(
        self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for one generation; ``prompt_ids`` give context (see the class)."""
        return IncrementalDetokenizer(
            lambda ids: self.decode(ids, skip_special_tokens=skip_special_tokens), prompt_ids=prompt_ids
        )
