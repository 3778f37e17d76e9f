"""Render Hugging Face chat templates (Jinja) the way ``transformers`` does, without importing it.

Why: the gateway must turn OpenAI-style message lists into the exact prompt string the model was trained on,
and templates on the Hub rely on HF's rendering environment (trim_blocks/lstrip_blocks, ``raise_exception``,
a non-escaping ``tojson``, loop controls, the ``{% generation %}`` tag). Templates are untrusted code, so they
run in Jinja's immutable sandbox.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used for assistant masks in training) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes; HF's does not, and prompts must match HF byte for byte.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template; a gateway renders the same template for every request."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def select_template(chat_template: Any) -> str | None:
    """The template from tokenizer_config's ``chat_template``: a string, or a list of named ones."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        return named.get("default")
    raise ValueError(f"chat_template has unexpected type {type(chat_template).__name__}")


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    **template_vars: Any,
) -> str:
    """Render ``messages`` with the template; template errors (e.g. ``raise_exception``) become ValueError."""
    context: dict[str, Any] = {"tools": None, "documents": None, **special_tokens, **template_vars}
    # Like HF: drop None-valued keys so templates see a missing key rather than the string "None".
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(
            messages=clean, add_generation_prompt=add_generation_prompt, **context
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template failed: {exc}") from exc
