"""Train the demo model's byte-level BPE tokenizer and write its HF-style tokenizer files.

Why a real trained tokenizer instead of a toy vocabulary: the serving stack (chat templates, special tokens,
incremental detokenization of multi-byte characters) has to be exercised with the same file formats and
quirks as production checkpoints, and comparing against ``transformers`` needs genuine HF files.
Training uses only ``tokenizers`` on the built-in corpus, so it is offline and deterministic.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from stagekit.demo.corpus import CORPUS

TOKENIZER_VOCAB_SIZE = 1024
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
# Order fixes the ids: the trainer gives special tokens ids 0..3 in this order.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, BEGIN_OF_TEXT)

# ChatML; the llama flavour prepends bos_token (like Llama 3), and unknown roles go through
# raise_exception so that callers see the same error path real templates use.
CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# The real checkpoints' pre-tokenizer splits. transformers 5 rebuilds Qwen2's pipeline from its own class
# (NFC + this regex) whatever tokenizer.json says, so the demo must use exactly these to be comparable.
_SPLIT_REGEX = {
    "llama": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


@functools.cache
def _trained_tokenizer_json(arch: str) -> str:
    """Train once per process and arch; training is deterministic, the cache only saves time in tests."""
    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[arch]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok.to_str()


def trained_vocab_size(arch: str) -> int:
    """Vocabulary size of the trained tokenizer, added tokens included (the tiny model's vocab_size)."""
    return Tokenizer.from_str(_trained_tokenizer_json(arch)).get_vocab_size(with_added_tokens=True)


def special_token_ids(arch: str) -> dict[str, int]:
    """Ids of the special tokens in the arch's trained vocabulary."""
    tok = Tokenizer.from_str(_trained_tokenizer_json(arch))
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise RuntimeError(f"trained tokenizer lacks special tokens {missing}")
    return ids  # type: ignore[return-value]


def build_tokenizer(arch: str) -> Tokenizer:
    """The trained tokenizer with the arch's post-processor: llama adds a BOS token, qwen2 adds nothing."""
    tok = Tokenizer.from_str(_trained_tokenizer_json(arch))
    if arch == "llama":
        bos_id = special_token_ids(arch)[BEGIN_OF_TEXT]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A",
            pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B:1",
            special_tokens=[(BEGIN_OF_TEXT, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def token_settings(arch: str) -> dict[str, Any]:
    """bos/eos/pad per arch, mirroring Llama 3 base (bos, eos=endoftext) and Qwen2-Instruct (no bos)."""
    ids = special_token_ids(arch)
    if arch == "llama":
        bos, eos, pad = BEGIN_OF_TEXT, ENDOFTEXT, None
        gen_eos = [ids[ENDOFTEXT], ids[IM_END]]
    else:
        bos, eos, pad = None, IM_END, ENDOFTEXT
        gen_eos = [ids[IM_END], ids[ENDOFTEXT]]
    return {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "bos_token_id": ids[bos] if bos else None,
        "eos_token_id": ids[eos],
        "pad_token_id": ids[pad] if pad else None,
        "generation_eos_token_ids": gen_eos,
        # Qwen2 configs carry bos_token_id=<|endoftext|> even though the tokenizer adds no BOS.
        "config_bos_token_id": ids[bos] if bos else ids[ENDOFTEXT],
    }


def tokenizer_config(arch: str) -> dict[str, Any]:
    """tokenizer_config.json content, in the shape ``transformers`` writes for fast tokenizers."""
    settings = token_settings(arch)
    ids = special_token_ids(arch)
    return {
        "added_tokens_decoder": {
            str(ids[name]): {
                "content": name,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for name in SPECIAL_TOKENS
        },
        "bos_token": settings["bos_token"],
        "eos_token": settings["eos_token"],
        "pad_token": settings["pad_token"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(directory: Path, arch: str, vocab_size: int | None = None) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the vocab size.

    With ``vocab_size`` larger than the trained vocabulary, the tokenizer is padded with plain
    added tokens ``<|pad_N|>`` so that every id the model can emit decodes to text (a random
    model samples the whole vocabulary; undecodable ids would stream as empty text)."""
    tok = build_tokenizer(arch)
    have = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and vocab_size > have:
        tok.add_tokens([AddedToken(f"<|pad_{i}|>", normalized=False) for i in range(have, vocab_size)])
    settings = token_settings(arch)
    (directory / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", tokenizer_config(arch))
    special_map = {k: settings[k] for k in ("bos_token", "eos_token", "pad_token") if settings[k] is not None}
    _write_json(directory / "special_tokens_map.json", special_map)
    return tok.get_vocab_size(with_added_tokens=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
