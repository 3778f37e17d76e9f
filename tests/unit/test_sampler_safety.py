"""The sampler never fails a whole step for one sequence's parameters, and `SamplingParams.validate`
refuses the values that would make a row unsampleable (the stage's first line of defence)."""

from __future__ import annotations

import math

import pytest
import torch

from stagekit.engine.sampler import Sampler
from stagekit.errors import InvalidRequest
from stagekit.types.sampling_params import SamplingParams

VOCAB = 32
EOS = [0]


def logits(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 4


UNSAMPLEABLE = [
    SamplingParams(temperature=1e-45),
    SamplingParams(temperature=float("nan")),
    SamplingParams(temperature=float("inf"), min_tokens=1),
    SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=tuple(range(VOCAB))),
]


@pytest.mark.parametrize("bad", UNSAMPLEABLE)
def test_a_row_that_cannot_be_sampled_takes_the_greedy_token_and_spares_the_others(bad: SamplingParams) -> None:
    x = logits(3)
    suppressed = x[1].clone()
    if bad.min_tokens:
        suppressed[list(EOS) + list(bad.stop_token_ids)] = float("-inf")
    with pytest.raises(RuntimeError):  # what failed the whole step before
        torch.multinomial(torch.softmax(suppressed / bad.temperature, dim=-1), 1)
    good = SamplingParams(temperature=0.8, seed=11, top_logprobs=2)
    sampler = Sampler(EOS)
    for seq_id, params in ((1, good), (2, bad), (3, SamplingParams(temperature=0.0))):
        sampler.add(seq_id, params)
    out = sampler.sample([1, 2, 3], x)
    alone = Sampler(EOS)
    alone.add(1, good)
    assert out.token_ids[0] == alone.sample([1], x[:1]).token_ids[0]  # the same draw as without the bad row
    finite_allowed = suppressed if torch.isfinite(suppressed).any() else x[1]
    assert out.token_ids[1] == int(finite_allowed.argmax())
    assert out.token_ids[2] == int(x[2].argmax())
    assert all(math.isfinite(lp) for lp in out.logprobs)
    assert len(out.top_logprobs[0]) == 2


def test_top_logprobs_above_the_vocabulary_do_not_fail_the_step() -> None:
    sampler = Sampler(EOS)
    sampler.add(1, SamplingParams(temperature=0.0, top_logprobs=VOCAB + 5))
    out = sampler.sample([1], logits(1))
    assert len(out.top_logprobs[0]) == VOCAB


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 1e-45}, "temperature"),
        ({"temperature": 0.009}, "temperature"),
        ({"temperature": 100.01}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop_token_ids": (VOCAB,)}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"stop_token_ids": tuple(range(1, VOCAB)), "min_tokens": 1}, "stop_token_ids"),  # with EOS: all of it
        ({"top_logprobs": VOCAB + 1}, "top_logprobs"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_validate_refuses_what_no_sampler_can_use(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**fields).validate(VOCAB, EOS)
    assert err.value.param == param


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 0.0}, {"temperature": 0.01}, {"temperature": float(torch.tensor(0.01).item())},
     {"temperature": 100.0}, {"stop_token_ids": tuple(range(1, VOCAB))},  # min_tokens 0: nothing masked
     {"stop_token_ids": tuple(range(2, VOCAB)), "min_tokens": 3}, {"seed": -(2**63)}],
)
def test_validate_accepts_the_bounds(fields: dict) -> None:
    SamplingParams(**fields).validate(VOCAB, EOS)
