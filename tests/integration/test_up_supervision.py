"""`stagemesh up --dp 2 --pp 2` supervises its stages, driven as a user drives it (a subprocess):
one stage of replica 0 is SIGKILLed while streams run on both replicas; replica 1's streams finish
exactly as undisturbed greedy runs, `up` keeps running and restarts the stage on its port, the
gateway re-wires replica 0 and routes to it again, and SIGTERM then leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stagekit.ports import free_port
from tests.gateway.harness import wait_for

PROMPTS = ["The mesh", "A stage restarts", "Replica one", "Supervision"]
BODY = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in rows if pp in frontier and p not in found}
        found |= frontier
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def stage_pid(up_pid: int, name: str) -> int:
    for pid in descendants(up_pid):
        with contextlib.suppress(OSError):
            if f"{name}.address".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError(f"no process of {name}")


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{want}}} ([\d.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def decisions(url: str) -> list[float]:
    """Requests the gateway routed to replica 0 and 1."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [metric(text, "stagemesh_routing_decisions_total", policy="round_robin", replica=str(i)) for i in (0, 1)]


def moves(url: str) -> tuple[float, float]:
    """Requests moved to another replica: before their first token (retry) and after (migration)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return tuple(metric(text, "stagemesh_request_retries_total", kind=k) for k in ("retry", "migration"))


@pytest.fixture()
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path, set[int]]]:
    """A running ``stagemesh up``; every process it ever started is in the yielded set (the test
    adds the restarted ones) and is killed at the end whatever happened."""
    port = free_port()
    output = tmp_path / "up.out"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stagemesh.cli.main", "up", "--dp", "2", "--pp", "2", "--threads", "1",
             "--port", str(port), "--no-grpc", "--log-dir", str(tmp_path / "logs")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    pids: set[int] = set()

    def started() -> bool:
        return "stagemesh is up" in output.read_text() or proc.poll() is not None

    try:
        wait_for(started, timeout_s=120, interval_s=0.2)
        assert proc.poll() is None, output.read_text()
        pids |= descendants(proc.pid)
        yield proc, f"http://127.0.0.1:{port}", output, pids
    finally:
        pids |= descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for pid in pids | {proc.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # each process leads its own group (stages: their TP workers)
        proc.wait(timeout=10)


def complete_all(url: str, model: str) -> dict[str, str]:
    """Every prompt's undisturbed greedy text, sent at once (batched, as the streams will be)."""
    texts: dict[str, str] = {}

    def one(prompt: str) -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, **BODY}, timeout=60)
        texts[prompt] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return texts


class Stream(threading.Thread):
    """One streamed completion: its text, completion tokens and whether it ended cleanly."""

    def __init__(self, url: str, model: str, prompt: str) -> None:
        super().__init__()
        self.url, self.prompt = url, prompt
        usage = {"include_usage": True}
        self.body = {"model": model, "prompt": prompt, **BODY, "stream": True, "stream_options": usage}
        self.first_token = threading.Event()
        self.text, self.tokens, self.clean = "", None, False

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=120) as response:
            done, failed = False, False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    failed |= "error" in event
                    self.text += "".join(c["text"] for c in event.get("choices", []))
                    self.tokens = (event.get("usage") or {}).get("completion_tokens", self.tokens)
                    if self.text:
                        self.first_token.set()
        self.clean = response.status_code == 200 and done and not failed


def test_a_killed_stage_is_restarted_and_the_other_replica_is_untouched(up) -> None:
    proc, url, output, pids = up
    logs = output.parent / "logs"
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    expected = complete_all(url, model)
    assert len(expected) == len(PROMPTS) and all(expected.values())

    streams: list[tuple[Stream, int]] = []
    for prompt in PROMPTS:  # one at a time, so the routing metric says which replica each stream is on
        before = decisions(url)
        stream = Stream(url, model, prompt)
        stream.start()
        wait_for(lambda b=before: sum(decisions(url)) > sum(b), timeout_s=10, interval_s=0.01)
        now = decisions(url)
        streams.append((stream, next(i for i in (0, 1) if now[i] > before[i])))
    assert sorted(replica for _, replica in streams) == [0, 0, 1, 1]
    assert all(stream.first_token.wait(timeout=30) for stream, _ in streams)
    address = (logs / "stage-r0-s1.address").read_text()
    victim = stage_pid(proc.pid, "stage-r0-s1")
    os.killpg(victim, signal.SIGKILL)  # mid-stream (the migration count below shows it)
    for stream, _ in streams:
        stream.join(timeout=120)

    for stream, replica in streams:
        assert stream.clean and stream.tokens == BODY["max_tokens"], (replica, stream.prompt, stream.text)
        if replica == 1:
            assert stream.text == expected[stream.prompt]  # untouched by replica 0's failure
    assert moves(url)[1] >= 1  # replica 0's streams moved over mid-stream
    assert proc.poll() is None, output.read_text()

    # the stage is back on its port, the gateway re-wires replica 0 and routes to it again
    wait_for(lambda: "stage-r0-s1 serves again" in output.read_text(), timeout_s=60, interval_s=0.2)
    said = output.read_text()
    assert "stage-r0-s1 (replica 0 stage 1) exited with code -9 (SIGKILL)" in said, said
    assert f"stage-r0-s1 serves again on {address.strip()} (restart 1)" in said, said
    assert (logs / "stage-r0-s1.address").read_text() == address
    assert not running(victim) and stage_pid(proc.pid, "stage-r0-s1") != victim
    pids |= descendants(proc.pid)
    wait_for(lambda: [r["state"] for r in httpx.get(f"{url}/health", timeout=10).json()["replicas"]]
             == ["serving", "serving"], timeout_s=30, interval_s=0.2)  # fmt: skip
    before, moved = decisions(url), moves(url)
    for i in range(4):
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": f"after {i}", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
    assert decisions(url)[0] >= before[0] + 2  # round robin: replica 0 took its share...
    assert moves(url) == moved  # ...and served it

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, output.read_text()
    time.sleep(0.5)
    assert not [pid for pid in pids if running(pid)], "left running"
