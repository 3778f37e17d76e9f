"""``stagemesh bench transport``: the data plane against gRPC and the machine's ceilings.

For each message size: one-way bandwidth and round-trip latency of every UCX profile and
of the gRPC fallback, measured through the real Transport API between two processes
(transport_probe), next to ``ucx_perftest`` (UCX's C benchmark) on the same UCX
transports and a same-process memcpy; plus the round trip of a decode-sized step
(2 x [32, 4096] fp16) against two floors: ucx_perftest's round trip of the same 512 KiB
(C), and the same bytes bounced between two Python processes over bare ucxx (ucx_pingpong:
what any data plane written in Python on ucxx costs at least). Bandwidth has a Python
ceiling too: bare ucxx streaming messages of each size between two processes, with as many
in flight as the bandwidth runs. Ratios are ours / ceiling and ours / gRPC for the same
metric.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from stagekit.transport.ucx.settings import PROFILES
from stagemesh.bench import ceilings, ucx_pingpong

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20, 16 << 20]
TRANSPORTS = ["ucx", "ucx:shm", "ucx:cma", "ucx:tcp", "grpc"]
DECODE_BYTES = 2 * 32 * 4096 * 2


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: list(SIZES))
    transports: list[str] = field(default_factory=lambda: list(TRANSPORTS))
    quick: bool = False
    perftest: bool = True
    repeat: int = 1   # rounds over all transports; each figure is the median over rounds
    window: int = 1   # frames in flight in the bandwidth runs


def _ucx_setup(name: str) -> tuple[str, bool] | None:
    """(UCX_TLS, error handling) of a same-host link of this transport, for ucx_perftest."""
    if not name.startswith("ucx"):
        return None
    tls, eh = PROFILES[name.partition(":")[2] or "auto"]
    return os.environ.get("STAGEMESH_UCX_TLS", tls), bool(eh)


def probe(name: str, sizes: list[int], quick: bool, window: int = 1) -> dict:
    cmd = [sys.executable, "-m", "stagemesh.bench.transport_probe", "--transport", name,
           "--sizes", ",".join(map(str, sizes)), "--window", str(window), *(["--quick"] if quick else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"transport": name, "error": "timed out after 900 s"}
    if out.returncode != 0:
        return {"transport": name, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_of(runs: list[dict]) -> dict:
    """One probe result whose figures are the medians over ``runs`` (the raw ones kept)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = {"transport": ok[0]["transport"], "sizes": {}, "rounds": len(ok)}
    for n in ok[0]["sizes"]:
        rtts = [r["sizes"][n]["rtt_us"] for r in ok]
        bws = [r["sizes"][n]["bw_gbps"] for r in ok]
        out["sizes"][n] = {"rtt_us": statistics.median(rtts), "bw_gbps": statistics.median(bws),
                           "rtt_us_rounds": rtts, "bw_gbps_rounds": bws}
    rtts = [r["decode_step"]["rtt_us"] for r in ok]
    out["decode_step"] = {"rtt_us": statistics.median(rtts), "rtt_us_rounds": rtts, "bytes": DECODE_BYTES}
    return out


def _perftest_ceilings(setups: set[tuple[str, bool]], sizes: list[int], quick: bool, repeat: int = 1) -> dict:
    """Per UCX setup and size, ucx_perftest's bandwidth and round trip: medians over
    ``repeat`` runs (single runs of one size swing several-fold on a shared box)."""
    out: dict = {}
    for tls, eh in sorted(setups):
        key = f"{tls}{' +eh' if eh else ''}"
        per: dict = {}
        for n in [*sizes, DECODE_BYTES]:
            iters = max(20, min(2000, (64 << 20) // n)) // (4 if quick else 1)
            bws = [ceilings.perftest("tag_bw", n, tls, eh, iters) for _ in range(repeat)]
            rtts = [ceilings.perftest("tag_lat", n, tls, eh, iters) for _ in range(repeat)]
            bw, rtt = _median_or_none(bws), _median_or_none(rtts)
            per[str(n)] = {"bw_gbps": bw / 1e9 if bw else None, "rtt_us": rtt * 1e6 if rtt else None}
        out[key] = per
    return out


def _median_or_none(xs: list[float | None]) -> float | None:
    ok = [x for x in xs if x]
    return statistics.median(ok) if ok else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _probe_rounds(cfg: BenchConfig) -> dict:
    # round-robin, so that a burst of other load on the machine hits one round of each, not one transport
    runs: dict[str, list[dict]] = {name: [] for name in cfg.transports}
    for _ in range(cfg.repeat):
        for name in cfg.transports:
            runs[name].append(probe(name, cfg.sizes, cfg.quick, cfg.window))
    return {name: _median_of(r) for name, r in runs.items()}


def _bare_ucxx(cfg: BenchConfig, measure: Callable[[str], dict[str, float] | None],
               sizes: list[int]) -> dict[str, dict[str, float | None]]:
    """Per UCX transport and size, the median over ``cfg.repeat`` runs of ``measure(profile)``
    (a bare-ucxx figure per size, measured in fresh processes; None where every run failed)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in cfg.transports:
        if name.startswith("ucx"):
            runs = [r for r in (measure(name.partition(":")[2] or "auto") for _ in range(cfg.repeat)) if r]
            out[name] = {str(n): _median_or_none([r.get(str(n)) for r in runs]) for n in sizes}
    return out


def _python_floors(cfg: BenchConfig) -> dict[str, float | None]:
    """Per UCX transport, the median over rounds of bare ucxx's 512 KiB round trip (µs)."""
    floors = _bare_ucxx(cfg, lambda profile: ucx_pingpong.python_floor(
        profile, [DECODE_BYTES], iters=50 if cfg.quick else 200), [DECODE_BYTES])
    return {name: per[str(DECODE_BYTES)] for name, per in floors.items()}


def _python_ceilings(cfg: BenchConfig) -> dict[str, dict[str, float | None]]:
    """Per UCX transport and size, the median over rounds of bare ucxx's stream bandwidth (GB/s)."""
    return _bare_ucxx(cfg, lambda profile: ucx_pingpong.python_ceiling(profile, cfg.sizes, cfg.window, cfg.quick),
                      cfg.sizes)


def run(cfg: BenchConfig) -> dict:
    """Measure everything in ``cfg``; the result is one JSON-ready dict."""
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0]},
        "sizes": cfg.sizes, "quick": cfg.quick, "repeat": cfg.repeat, "window": cfg.window,
        "transports": _probe_rounds(cfg),
        "memcpy_gbps": {str(n): ceilings.memcpy_bandwidth(n) / 1e9 for n in cfg.sizes},
    }
    setups = {s for s in map(_ucx_setup, cfg.transports) if s is not None}
    have_perftest = cfg.perftest and ceilings.perftest_binary() is not None
    result["ucx_perftest"] = _perftest_ceilings(setups, cfg.sizes, cfg.quick, cfg.repeat) if have_perftest else None
    result["python_floor_us"] = _python_floors(cfg)
    result["python_ceiling_gbps"] = _python_ceilings(cfg)
    grpc = result["transports"].get("grpc", {})
    for name, r in result["transports"].items():
        if "error" in r:
            continue
        setup = _ucx_setup(name)
        pt = (result["ucx_perftest"] or {}).get(f"{setup[0]}{' +eh' if setup[1] else ''}", {}) if setup else {}
        for n, m in r["sizes"].items():
            ceil, g = pt.get(n, {}), grpc.get("sizes", {}).get(n, {})
            m["bw_vs_perftest"] = _ratio(m["bw_gbps"], ceil.get("bw_gbps"))
            m["rtt_vs_perftest"] = _ratio(m["rtt_us"], ceil.get("rtt_us"))
            m["bw_vs_grpc"] = _ratio(m["bw_gbps"], g.get("bw_gbps")) if name != "grpc" else None
            m["rtt_vs_grpc"] = _ratio(m["rtt_us"], g.get("rtt_us")) if name != "grpc" else None
            m["bw_vs_memcpy"] = _ratio(m["bw_gbps"], result["memcpy_gbps"].get(n))
            m["bw_vs_bare_ucxx"] = _ratio(m["bw_gbps"], result["python_ceiling_gbps"].get(name, {}).get(n))
        d = r["decode_step"]
        d["floor_us"] = pt.get(str(DECODE_BYTES), {}).get("rtt_us")
        d["vs_floor"] = _ratio(d["rtt_us"], d["floor_us"])
        d["py_floor_us"] = result["python_floor_us"].get(name)
        d["vs_py_floor"] = _ratio(d["rtt_us"], d["py_floor_us"])
        d["vs_grpc"] = _ratio(d["rtt_us"], grpc.get("decode_step", {}).get("rtt_us")) if name != "grpc" else None
    return result


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def format_table(result: dict) -> str:
    lines = [f"# machine: {result['machine']['cpus']} CPUs, load {result['machine']['load_avg_1m']:.2f}, "
             f"{result['machine']['platform']}; medians over {result['repeat']} round(s); "
             f"bandwidth with {result.get('window', 1)} frame(s) in flight", "",
             "| size | transport | GB/s | RTT µs | GB/s ÷ perftest | GB/s ÷ bare ucxx | RTT ÷ perftest | GB/s ÷ gRPC "
             "| RTT ÷ gRPC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in result["sizes"]:
        for name, r in result["transports"].items():
            if "error" in r:
                continue
            m = r["sizes"][str(n)]
            lines.append(f"| {_size(n)} | {name} | {m['bw_gbps']:.3f} | {m['rtt_us']:.0f} | "
                         f"{_fmt(m['bw_vs_perftest'], '.2f')} | {_fmt(m.get('bw_vs_bare_ucxx'), '.2f')} | "
                         f"{_fmt(m['rtt_vs_perftest'], '.1f')} | "
                         f"{_fmt(m['bw_vs_grpc'], '.2f')} | {_fmt(m['rtt_vs_grpc'], '.2f')} |")
    lines += ["", "| ceiling | " + " | ".join(_size(n) for n in result["sizes"]) + " |",
              "|---|" + "---|" * len(result["sizes"])]
    lines.append("| memcpy GB/s | " + " | ".join(f"{result['memcpy_gbps'][str(n)]:.1f}" for n in result["sizes"])
                 + " |")
    for key, per in (result["ucx_perftest"] or {}).items():
        cells = [f"{_fmt(per[str(n)]['bw_gbps'], '.2f')} / {_fmt(per[str(n)]['rtt_us'], '.0f')}"
                 for n in result["sizes"]]
        lines.append(f"| ucx_perftest {key} GB/s / RTT µs | " + " | ".join(cells) + " |")
    for name, per in result.get("python_ceiling_gbps", {}).items():
        cells = [_fmt(per.get(str(n)), ".2f") for n in result["sizes"]]
        lines.append(f"| bare ucxx {name} GB/s | " + " | ".join(cells) + " |")
    lines += ["", "| decode step 2 x [32, 4096] fp16 | RTT µs | floor µs (perftest, 512 KiB) | ÷ floor | "
              "Python floor µs (bare ucxx, 512 KiB) | ÷ Python floor | ÷ gRPC |",
              "|---|---|---|---|---|---|---|"]
    for name, r in result["transports"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        d = r["decode_step"]
        lines.append(f"| {name} | {d['rtt_us']:.0f} | {_fmt(d['floor_us'], '.0f')} | {_fmt(d['vs_floor'], '.1f')} | "
                     f"{_fmt(d.get('py_floor_us'), '.0f')} | {_fmt(d.get('vs_py_floor'), '.1f')} | "
                     f"{_fmt(d['vs_grpc'], '.2f')} |")
    return "\n".join(lines)
