"""`stagemesh up` as a user runs it: a subprocess on a free port, serving the demo model
over HTTP (TP1·PP2 here), then stopped with SIGTERM leaving no process behind. The same
mesh answers bad requests with 4xx and keeps serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from stagekit.ports import free_port


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    found, frontier = set(), {pid}
    while frontier:
        nxt = {p for p, pp, _ in rows if pp in frontier and p not in found}
        found |= nxt
        frontier = nxt
    return sorted(found)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = dict(os.environ, XDG_CACHE_HOME=str(home / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagemesh.cli.main", "up", "--port", str(port), "--pp", "2", "--threads", "1",
         "--log-dir", str(home / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "stagemesh is up" in line:
                break
        assert any(url in line for line in lines), "".join(lines)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_up_serves_completions(up) -> None:
    proc, url = up
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    name = models["data"][0]["id"]
    r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Hello, mesh", "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
    again = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Hello, mesh", "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True}, timeout=60).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": [1, 99999], "max_tokens": 4}, 400, "vocab"),
        ({"prompt": "", "max_tokens": 4}, 400, "empty"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "context"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404, "no-such-model"),
    ],
)
def test_bad_requests_get_4xx_and_mesh_keeps_serving(up, body, status, needle) -> None:
    _, url = up
    name = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": name, **body}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_is_400(up) -> None:
    _, url = up
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=10)
    assert r.status_code == 400
    assert json.loads(r.text)["error"]["message"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_sigterm_stops_everything(up) -> None:
    proc, url = up
    before = _children(proc.pid)
    assert len(before) >= 3  # two stages and the gateway
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    alive = [p for p in before if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert not alive, f"left running: {alive}"
