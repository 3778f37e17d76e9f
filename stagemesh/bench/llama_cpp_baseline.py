"""An optional baseline for ``bench serve``: llama.cpp's ``llama-batched-bench`` on a GGUF of the
same weights, same prompt/output lengths, batch sizes and thread count, in the same run.

``llama-batched-bench`` decodes random token ids (the vocabulary does not matter); for each
batch ``B`` it prefills ``B`` prompts, then generates ``output_len`` tokens for each, and
prints one table row: prefill time, generation time and the total. From a row: output tokens
per second including the prefill (what ``bench serve`` measures for stagemesh) and the decode
rate alone (docs/benchmarks.md says how to build the binary and write the GGUF)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from stagekit.errors import ConfigError

# |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6 + r"\s*$")


def parse_rows(text: str) -> dict[int, dict]:
    """Batch size -> figures, from ``llama-batched-bench``'s table."""
    out = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m is None:
            continue
        pp, tg, b = int(m[1]), int(m[2]), int(m[3])
        t_pp, t_tg, t = float(m[5]), float(m[7]), float(m[9])
        out[b] = {"prompt_len": pp, "output_len": tg, "output_tok_s": round(b * tg / t, 2),
                  "decode_tok_s": round(b * tg / t_tg, 2), "decode_step_ms": round(1000 * t_tg / tg, 3),
                  "prefill_s": round(t_pp, 4)}
    return out


def run_llama_batched_bench(binary: str, gguf: str, batches: list[int], prompt_len: int, output_len: int,
                            threads: int, timeout_s: float = 3600.0) -> dict[int, dict]:
    """Run the binary once over all ``batches``; batch size -> figures (see ``parse_rows``)."""
    for what, path in (("--llama-cpp-bench", binary), ("--gguf", gguf)):
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path}: no such file")
    ctx = max(batches) * (prompt_len + output_len)
    cmd = [binary, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt_len),
           "-ntg", str(output_len), "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except OSError as e:
        raise ConfigError(f"--llama-cpp-bench {binary}: cannot run it: {e}") from None
    rows = parse_rows(out.stdout + "\n" + out.stderr)
    if out.returncode != 0 or not rows:
        tail = (out.stderr or out.stdout)[-800:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{tail}")
    return rows
