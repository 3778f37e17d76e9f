"""Tokenization for the gateway and services: HF tokenizer files, chat templates, streaming detokenization.

Why a package of our own: it needs only ``tokenizers`` and ``jinja2`` (no ``transformers``), and it can be
built from file contents received over gRPC as well as from a checkpoint directory.
"""

from __future__ import annotations

from stagekit.tokenizer.detokenizer import IncrementalDetokenizer
from stagekit.tokenizer.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, Tokenizer

__all__ = ["CHAT_TEMPLATE_FILE", "TOKENIZER_FILES", "IncrementalDetokenizer", "Tokenizer"]
