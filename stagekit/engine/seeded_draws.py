"""Counter-based randomness for sampling: the token at output position i of a request with
seed s is drawn with noise that is a pure function of (s, i).

A generator per request, advanced once per token, gives a stream that depends on its whole
history: a request recomputed after preemption or continued on another replica after a
migration would have to carry that state along. Keying each draw by (seed, position) needs
no state at all, so any replica, at any time, draws what an undisturbed run would have
drawn. The key is splitmix64 (Steele, Lea, Flood 2014: the generator behind Java's
SplittableRandom, which passes BigCrush): output number ``position`` of the stream whose
state starts at the mixed seed.

The draw is the exponential race (what ``torch.multinomial`` does for one sample): the
index maximising ``probs[i] / E_i`` with ``E_i ~ Exp(1)`` drawn per vocabulary entry from a
CPU generator seeded with the key. Its winner changes only when the two best scores are
within the logits' numerical noise, so a continuation on another replica, whose logits
differ in the last bits (its KV was written by one prefill instead of many decode steps),
still picks the same token. An inverse-CDF lookup of a single uniform number was tried
first: it is cheaper, but a CDF error of e moves the pick to a neighbouring token with a
probability of about e over the picked token's probability (e times the vocabulary size on a
flat distribution), which a continuation test on the demo model hit. The exponentials come
from ``torch.rand`` (-log u) rather than ``exponential_``, which costs about 3-4x more per
token (docs/benchmarks.md, "Measurements behind design choices"). Both are the same for any
thread count; the numbers depend on torch's CPU generator (mt19937), so replicas that must
agree run the same torch version.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: consecutive states are far apart


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit words in which every output bit depends
    on every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_key(seed: int, position: int) -> int:
    """The 64-bit key of the draw at output ``position`` (>= 0) for ``seed`` (any int; taken
    modulo 2^64, so negative seeds are distinct keys too). Mixing the seed first keeps the
    streams of neighbouring seeds (choice c of a request uses seed + c) unrelated."""
    return _mix64((_mix64(seed & _MASK64) + (position + 1) * _GAMMA) & _MASK64)


def seed_generator(generator: torch.Generator, seed: int, position: int) -> torch.Generator:
    """``generator`` seeded for the draw at (seed, position). torch's CPU generator keeps only
    the low 32 bits of a seed, so the key's halves are folded together first."""
    key = draw_key(seed, position)
    return generator.manual_seed((key ^ (key >> 32)) & 0xFFFFFFFF)


def race(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Index i with probability ``probs[i] / sum(probs)``, never one of probability 0: the
    winner of the exponential race with noise from ``generator`` (seeded by
    `seed_generator`). ``probs``: [V] on the CPU, non-negative, not all zero."""
    noise = torch.rand(probs.shape, generator=generator)  # [V] uniform in [0, 1)
    noise.log_().neg_()  # Exp(1); u == 0 gives inf, a score of 0
    index = int(torch.div(probs, noise, out=noise).argmax())
    p = float(probs[index])  # argmax returns a NaN's index if there is one
    if not (p > 0 and math.isfinite(p)):
        raise ValueError("probability tensor contains either inf, nan or no positive element")
    return index
