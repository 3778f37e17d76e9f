"""The sampler's randomness is a pure function of (seed, output position): a fresh sampler that
continues a request at output position k (``seed_offset``) draws exactly what an uninterrupted
one draws there, whatever else it sampled before; the draws follow the distribution and shrug
off logits that differ in their last bits; greedy ignores the seed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from stagekit.engine.sampler import Sampler
from stagekit.engine.seeded_draws import draw_key, race, seed_generator
from stagekit.types.sampling_params import SamplingParams

VOCAB = 300
STEPS = 24
EOS = 2


def _rows(seed: int) -> list[torch.Tensor]:
    """The logits a request sees at each output position (fixed, as the model would give)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(VOCAB, generator=g) * 3 for _ in range(STEPS)]


def _run(sampler: Sampler, seq_id: int, rows: list[torch.Tensor]) -> list[int]:
    return [sampler.sample([seq_id], row[None, :]).token_ids[0] for row in rows]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=0.9, seed=1234),
    SamplingParams(temperature=0.7, top_k=20, seed=-5),
    SamplingParams(temperature=1.3, seed=2**63 - 1, min_tokens=4, max_tokens=STEPS),
], ids=["top_p", "top_k_negative_seed", "min_tokens"])
def test_a_continuation_at_offset_k_draws_what_the_uninterrupted_run_draws(params: SamplingParams) -> None:
    rows = _rows(0)
    whole = Sampler([EOS])
    whole.add(1, params)
    expected = _run(whole, 1, rows)
    assert len(set(expected)) > 3  # really sampled
    for k in (1, 5, 17):
        # Another replica, which has sampled other requests and knows this one under another id;
        # the gateway hands it the rest of min_tokens, as a migration does.
        fresh = Sampler([EOS])
        fresh.add(9, SamplingParams(temperature=1.0, seed=99))
        _run(fresh, 9, rows[:k])
        fresh.add(3, SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                    seed=params.seed, min_tokens=max(0, params.min_tokens - k), seed_offset=k))
        got = []
        for i, row in enumerate(rows[k:]):  # batched with the other sequence, in either order
            order = [3, 9] if i % 2 else [9, 3]
            batch = torch.stack([row if s == 3 else rows[0] for s in order])
            out = fresh.sample(order, batch)
            got.append(out.token_ids[order.index(3)])
        assert got == expected[k:], k


def test_min_tokens_still_suppresses_eos_at_an_offset() -> None:
    row = torch.full((VOCAB,), -10.0)
    row[EOS] = 10.0  # EOS all but certain
    s = Sampler([EOS])
    s.add(1, SamplingParams(temperature=1.0, seed=3, min_tokens=2, seed_offset=6))
    tokens = [s.sample([1], row[None, :]).token_ids[0] for _ in range(3)]
    assert EOS not in tokens[:2] and tokens[2] == EOS


def test_seeds_and_positions_give_independent_draws() -> None:
    rows = _rows(1)
    streams = []
    for seed in (7, 8, 9):  # what choices 0, 1, 2 of a request with seed 7 use
        s = Sampler([EOS])
        s.add(1, SamplingParams(temperature=1.0, seed=seed))
        streams.append(_run(s, 1, rows))
    assert streams[0] != streams[1] != streams[2] != streams[0]
    keys = {draw_key(seed, pos) for seed in range(-50, 50) for pos in range(200)}
    assert len(keys) == 100 * 200


def test_unseeded_sequences_get_seeds_of_their_own() -> None:
    rows = _rows(2)
    s = Sampler([EOS])
    s.add(1, SamplingParams(temperature=1.0))
    s.add(2, SamplingParams(temperature=1.0))
    out = [s.sample([1, 2], torch.stack([row, row])).token_ids for row in rows]
    assert [a for a, _ in out] != [b for _, b in out]


def _draw(probs: torch.Tensor, seed: int, position: int) -> int:
    return race(probs, seed_generator(torch.Generator(), seed, position))


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.3, 0.4])
    n = 20000
    counts = Counter(_draw(probs, 42, pos) for pos in range(n))
    assert counts[0] == counts[3] == 0
    for token, p in ((1, 0.1), (2, 0.2), (4, 0.3), (5, 0.4)):
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(counts[token] - n * p) < 5 * sigma, (token, counts)


def test_logits_that_differ_in_their_last_bits_give_the_same_tokens() -> None:
    """What a continuation on another replica sees: the same logits up to float noise (its KV
    came from one prefill). A near-flat distribution over 1000 tokens is the hard case: with
    these 1e-3 logit errors an inverse-CDF draw moved to a neighbouring token in 30 of the 2000
    draws, the race in 1."""
    g = torch.Generator().manual_seed(5)
    flips = 0
    for pos in range(2000):
        logits = torch.randn(1000, generator=g) * 0.5
        noisy = logits + 1e-3 * torch.randn(1000, generator=g)
        flips += _draw(torch.softmax(logits, 0), 9, pos) != _draw(torch.softmax(noisy, 0), 9, pos)
    assert flips <= 3


def test_unusable_probabilities_raise() -> None:
    for probs in (torch.tensor([float("nan"), 1.0]), torch.zeros(3)):
        with pytest.raises(ValueError, match="nan"):
            _draw(probs, 1, 0)


def test_greedy_ignores_the_seed() -> None:
    rows = _rows(3)
    tokens = []
    for seed in (None, 1, 2):
        s = Sampler([EOS])
        s.add(1, SamplingParams(temperature=0.0, seed=seed, seed_offset=4))
        tokens.append(_run(s, 1, rows))
    assert tokens[0] == tokens[1] == tokens[2] == [int(r.argmax()) for r in rows]
