"""What one sampled token's random draw costs, three ways, on probability rows of real vocabulary sizes.

- ``stream``: what the sampler did before draws were keyed by position: one ``torch.Generator``
  per request, seeded once, and ``torch.multinomial`` on it per token (an exponential race
  with ``exponential_`` noise);
- ``keyed_multinomial``: a generator re-seeded per token from splitmix64(seed, position), then
  ``torch.multinomial``;
- ``keyed_race``: what the sampler does (``stagekit/engine/seeded_draws.py``): the same
  re-seeded generator, the race's noise from ``torch.rand`` (-log u);
- ``inverse_cdf``: splitmix64(seed, position) as one 53-bit uniform, inverse CDF in float64
  (cheapest, but it flips tokens on logits that differ in their last bits; not used).

Also the whole ``Sampler.sample`` of a 32-sequence step (temperature 1, top_p 0.9), per token,
for context. The fastest of ``--repeat`` rounds of ``--iters`` draws each (the least disturbed
on a shared box).

    PYTHONPATH=. .venv/bin/python benchmarks/sampler_draws.py [--vocab 4096 32000 152064]

Prints one JSON object (microseconds per token).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from stagekit.engine.sampler import Sampler
from stagekit.engine.seeded_draws import draw_key, race, seed_generator
from stagekit.types.sampling_params import SamplingParams


def _per_call_us(fn: Callable[[int], object], iters: int, repeat: int) -> float:
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(iters):
            fn(i)
        rounds.append((time.perf_counter() - start) / iters * 1e6)
    return round(min(rounds), 2)


def measure(vocab: int, iters: int, repeat: int) -> dict[str, float]:
    probs = torch.softmax(torch.randn(vocab) * 3, dim=-1)
    gen = torch.Generator().manual_seed(1234)
    regen = torch.Generator()

    def keyed_multinomial(i: int) -> int:
        return int(torch.multinomial(probs, 1, generator=seed_generator(regen, 1234, i)))

    def inverse_cdf(i: int) -> int:
        cdf = probs.double().cumsum(0)
        return int((cdf <= (draw_key(1234, i) >> 11) * 2.0**-53 * float(cdf[-1])).sum())

    sampler = Sampler([0])
    for s in range(32):
        sampler.add(s, SamplingParams(temperature=1.0, top_p=0.9, seed=s))
    logits = torch.randn(32, vocab) * 3
    seq_ids = list(range(32))
    return {
        "stream": _per_call_us(lambda i: int(torch.multinomial(probs, 1, generator=gen)), iters, repeat),
        "keyed_multinomial": _per_call_us(keyed_multinomial, iters, repeat),
        "keyed_race": _per_call_us(lambda i: race(probs, seed_generator(regen, 1234, i)), iters, repeat),
        "inverse_cdf": _per_call_us(inverse_cdf, iters, repeat),
        "sampler_step32_per_token": round(
            _per_call_us(lambda i: sampler.sample(seq_ids, logits), max(1, iters // 32), repeat) / 32, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000, 152064])
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a stage's compute thread count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": args.threads}
    out.update({str(v): measure(v, args.iters, args.repeat) for v in args.vocab})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
