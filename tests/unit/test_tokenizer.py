"""stagekit.tokenizer matches transformers' tokenizer, and streaming decode concatenates to full decode."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from stagekit.demo import ARCHS, write_demo_model
from stagekit.tokenizer import TOKENIZER_FILES, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world",
    "héllo wörld 你好 🙂",
    "  leading spaces, trailing\n\nnewlines\t\ttabs  ",
    "The keeper made tea at 14.5 C; boats out: 7 ❤️ 🐙",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "héllo wörld 你好 🙂"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  and again\n"},
    ],
]


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tok") / request.param, arch=request.param)


@pytest.fixture(scope="module")
def pair(model_dir: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_dir(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)


def test_encode_decode_match_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("héllo wörld 你好 🙂")) == "héllo wörld 你好 🙂"


def test_decode_random_ids_matches_transformers(pair: tuple[Tokenizer, object]) -> None:
    ours, hf = pair
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_transformers(pair: tuple[Tokenizer, object], model_dir: Path) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids[0] == hf.eos_token_id
    gen = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert set(ours.eos_token_ids) == {hf.eos_token_id, *gen}
    assert len(ours.eos_token_ids) == len(set(ours.eos_token_ids))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    pair: tuple[Tokenizer, object], add_generation_prompt: bool
) -> None:
    ours, hf = pair
    for chat in CHATS:
        prompt = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert prompt == expected
        hf_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt)
        hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
        assert ours.encode(prompt, add_special_tokens=False) == list(hf_ids)


def test_chat_template_errors(pair: tuple[Tokenizer, object], model_dir: Path) -> None:
    ours, _ = pair
    with pytest.raises(ValueError, match="Unsupported role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    files = {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILES}
    config = json.loads(files["tokenizer_config.json"])
    del config["chat_template"]
    files["tokenizer_config.json"] = json.dumps(config).encode()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_files(files).apply_chat_template(CHATS[0])
    files["chat_template.jinja"] = b"{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert (
        Tokenizer.from_files(files).apply_chat_template(CHATS[1])
        == "[You are terse.][héllo wörld 你好 🙂][Hello!][  and again\n]"
    )


def test_from_files_matches_from_dir_and_requires_tokenizer_json(model_dir: Path, tmp_path: Path) -> None:
    files = {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILES}
    a, b = Tokenizer.from_dir(model_dir), Tokenizer.from_files(files)
    assert (a.vocab_size, a.eos_token_ids, a.bos_token_id) == (b.vocab_size, b.eos_token_ids, b.bos_token_id)
    assert a.encode(TEXTS[1]) == b.encode(TEXTS[1])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_files({"tokenizer_config.json": b"{}"})


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool, prompt: list[int] | None) -> str:
    detok = tok.detokenizer(prompt_ids=prompt, skip_special_tokens=skip)
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        piece = detok.push(ids[i : i + n])
        assert not piece.endswith("\ufffd")  # incomplete characters are held back until flush
        pieces.append(piece)
        i += n
    pieces.append(detok.flush())
    assert detok.flush() == ""
    assert detok.token_ids == ids
    return "".join(pieces)


def test_incremental_detokenizer_random_sequences(pair: tuple[Tokenizer, object]) -> None:
    tok, _ = pair
    rng = random.Random(1)
    prompt = tok.encode("The keeper said")
    for trial in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        skip = trial % 2 == 0
        with_prompt = prompt if trial % 3 == 0 else None
        assert _stream(tok, ids, rng, skip, with_prompt) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_multibyte_split(pair: tuple[Tokenizer, object]) -> None:
    tok, _ = pair
    text = "héllo wörld 你好 🙂 ❤️ 🐙 Привет"
    ids = tok.encode(text, add_special_tokens=False)
    singles = [tok.decode([i]) for i in ids]
    assert any(s.endswith("\ufffd") for s in singles), "test text should split a character across tokens"
    detok = tok.detokenizer()
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # Prompt ending in the middle of a character: the generation's text must not absorb the prompt's bytes.
    emoji = tok.encode(" 🙂", add_special_tokens=False)
    assert len(emoji) >= 2
    detok = tok.detokenizer(prompt_ids=emoji[:-1])
    assert detok.push(emoji[-1:]) + detok.flush() == tok.decode(emoji[-1:])
    # An incomplete character left at the end is flushed as U+FFFD, exactly as decode() renders it.
    detok = tok.detokenizer()
    assert detok.push(emoji[:-1]) == ""
    assert detok.flush() == tok.decode(emoji[:-1])
