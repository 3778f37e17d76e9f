"""How long the gateway's runtime replica operations take under streaming load, and what clients see.

Starts the tiny demo model as 2 replicas x 2 stages (one torch thread each) behind a gateway with
the admin API, streams greedy completions from ``--workers`` clients all along, and times: adding
a replica (POST until it serves), removing one with no grace (DELETE ?timeout=0: its streams move
mid-way), replacing a last stage and a head (PUT, then the old process is killed), and a SIGSTOPped
last stage: from SIGSTOP until the gateway took its replica out, and from SIGCONT until it serves.
Every stream is checked against the undisturbed greedy text of its prompt.

    python benchmarks/admin_ops.py [--workers 3] [--stall-timeout 5] [--health-interval 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec

KEY = "bench-admin"
PROMPTS = ["The mesh", "A replica joins", "Stages move", "Drain and go"]
BODY = {"max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}


def stream(url: str, prompt: str) -> tuple[bool, str]:
    text, done, failed = "", False, False
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": prompt, **BODY}, timeout=300) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                failed |= "error" in event
                text += "".join(c["text"] for c in event.get("choices", []))
    return r.status_code == 200 and done and not failed, text


def until(cond, timeout_s: float = 300.0, every_s: float = 0.02) -> float:  # noqa: ANN001
    """Seconds until ``cond()`` held."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("condition not met in time")
        time.sleep(every_s)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--stall-timeout", type=float, default=5.0)
    ap.add_argument("--health-interval", type=float, default=1.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="admin-ops-"))
    gateway_args = ["--admin-api-key", KEY, "--health-interval", str(args.health_interval),
                    "--stall-timeout", str(args.stall_timeout)]
    mesh = Mesh(MeshSpec(model=str(write_demo_model(root / "demo")), layer_splits=[(0, 2), (2, 4)], dp=2, threads=1,
                         port=free_port(), extra_gateway_args=gateway_args), root / "logs")
    auth = {"Authorization": f"Bearer {KEY}"}

    def admin(method: str, path: str, **kw: object) -> httpx.Response:
        r = httpx.request(method, f"{mesh.url}/admin{path}", headers=auth, timeout=300, **kw)
        assert r.status_code < 300, r.text
        return r

    def state(rid: str) -> str | None:
        return next((r["state"] for r in admin("GET", "/replicas").json()["replicas"] if r["id"] == rid), None)

    try:
        mesh.start(timeout_s=300)
        ready = {k: mesh.ready_file(*k) for k in [(2, 0), (2, 1), (3, 1), (4, 0)]}
        procs = {k: mesh.start_stage(*k, 0, ready_file=f) for k, f in ready.items()}
        deadline = time.monotonic() + 300
        spare = {k: mesh.wait_address(f, deadline) for k, f in ready.items()}
        reference = {p: stream(mesh.url, p)[1] for p in PROMPTS}
        results: list[tuple[str, bool, str]] = []
        stop = threading.Event()

        def worker(w: int) -> None:
            k = w
            while not stop.is_set():
                prompt = PROMPTS[k % len(PROMPTS)]
                results.append((prompt, *stream(mesh.url, prompt)))
                k += 1

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.workers)]
        for t in threads:
            t.start()
        until(lambda: len(results) >= args.workers)
        timings: dict[str, float] = {}
        moved = 0
        start = time.monotonic()
        admin("POST", "/replicas", json={"stages": [spare[(2, 0)], spare[(2, 1)]]})
        until(lambda: state("r2") == "serving")
        timings["add (POST until serving)"] = time.monotonic() - start
        for label, method, path, body in [
            ("remove r0 (DELETE ?timeout=0)", "DELETE", "/replicas/r0", None),
            ("replace last stage of r1 (PUT ?timeout=0)", "PUT", "/replicas/r1/stages/1", {"address": spare[(3, 1)]}),
            ("replace head of r2 (PUT ?timeout=0)", "PUT", "/replicas/r2/stages/0", {"address": spare[(4, 0)]}),
        ]:
            start = time.monotonic()
            moved += admin(method, path, params={"timeout": 0}, json=body).json()["moved_requests"]
            timings[label] = time.monotonic() - start
        for name, p in list(mesh.procs):  # the replaced stages go
            if name in ("stage-r1-s1", "stage-r2-s0"):
                p.kill()
        victim = procs[(3, 1)]  # r1's last stage now
        os.kill(victim.pid, signal.SIGSTOP)
        timings[f"SIGSTOP -> r1 out (stall timeout {args.stall_timeout:g}s)"] = until(lambda: state("r1") == "down")
        os.kill(victim.pid, signal.SIGCONT)
        timings["SIGCONT -> r1 serving"] = until(lambda: state("r1") == "serving")
        n = len(results)
        until(lambda: len(results) >= n + 2 * args.workers)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        failed = sum(not ok for _, ok, _ in results)
        wrong = sum(ok and text != reference[p] for p, ok, text in results)
        for label, seconds in timings.items():
            print(f"{label:50s} {seconds:7.2f} s")
        print(f"streams {len(results)}, failed {failed}, wrong {wrong}, moved by admin operations {moved}")
        for p, ok, text in [x for x in results if not x[1] or x[2] != reference[x[0]]][:3]:
            print(f"  {'failed' if not ok else 'wrong'}: {p!r} -> {text!r}")
    finally:
        mesh.stop()


if __name__ == "__main__":
    main()
