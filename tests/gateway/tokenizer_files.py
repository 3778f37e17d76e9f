"""A small byte-level BPE tokenizer in HF file layout, trained in-process for the gateway tests."""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Once upon a time, a quick brown fox jumped over the lazy dog.",
    "The dog did not mind; it was a very lazy dog and the fox was very quick.",
    "Hello world! How are you today? I am fine, thank you.",
    "Stages pass hidden states down the pipeline; the gateway streams tokens back.",
    "The end. Café, naïve, déjà vu — and an emoji: 🦊.",
]


@functools.cache
def tokenizer_files() -> dict[str, bytes]:
    """``tokenizer.json`` + ``tokenizer_config.json`` (with a ChatML template); deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    config = {"eos_token": EOS_TOKEN, "chat_template": CHAT_TEMPLATE, "model_max_length": 128}
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
    }
