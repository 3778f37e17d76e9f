from __future__ import annotations

from gateway.textstream import TextAssembler


def feed(asm: TextAssembler, pieces: list[str]) -> list[str]:
    out = []
    for i, piece in enumerate(pieces):
        stopped = asm.add_token(i, piece, -1.0, ())
        out.append(asm.release()[0])
        if stopped:
            break
    return out


def test_no_stop_releases_everything_at_once() -> None:
    asm = TextAssembler()
    assert feed(asm, ["a", "b", "c"]) == ["a", "b", "c"]


def test_holds_back_a_possible_stop_prefix() -> None:
    asm = TextAssembler(["STOP"])
    assert feed(asm, ["hello ", "ST", "O", "x"]) == ["hello ", "", "", "STOx"]
    assert asm.text == "hello STOx" and not asm.stopped
    text, tokens = asm.release(final=True)
    assert text == "" and not tokens


def test_stop_across_tokens_cuts_before_it() -> None:
    asm = TextAssembler(["brown fox", "zzz"])
    released = feed(asm, ["a quick", " bro", "wn f", "ox jumps"])
    assert asm.stopped
    assert "".join(released) == "a quick "
    assert asm.text == "a quick "


def test_tokens_follow_their_text() -> None:
    asm = TextAssembler(["xyz"])
    asm.add_token(7, "ab", None, ())
    asm.add_token(8, "cd", None, ())
    text, tokens = asm.release()
    assert text == "abcd" and [(t.token_id, t.text_offset) for t in tokens] == [(7, 0), (8, 2)]
    asm.add_token(9, "x", None, ())
    text, tokens = asm.release()
    assert text == "" and not tokens  # "x" may start "xyz": held back with its token
    asm.add_token(10, "y", None, ())
    text, tokens = asm.release(final=True)
    assert text == "xy" and [(t.token_id, t.text_offset) for t in tokens] == [(9, 4), (10, 5)]


def test_stop_inside_a_single_piece() -> None:
    asm = TextAssembler(["\n\n"])
    assert asm.add_token(1, "one\n\ntwo", None, ())
    assert asm.release()[0] == "one"
