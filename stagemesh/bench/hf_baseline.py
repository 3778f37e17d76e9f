"""The baseline: transformers ``generate`` on the same checkpoint, same prompts, same
number of new tokens, greedy, in this process."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class BaselineResult:
    concurrency: int
    output_tok_s: float
    ttft_s: float


def run_hf(model_dir: str, prompts: list[list[int]], output_len: int, threads: int) -> BaselineResult:
    from transformers import AutoModelForCausalLM

    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, **kwargs)  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, **kwargs)
        wall = time.perf_counter() - t
    new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return BaselineResult(len(prompts), new / wall, ttft)
