"""`stagemesh up --prefill 1 --decode 1` as a user runs it: a disaggregated mesh of the demo
model whose /health shows each replica's role, whose completions are handed from the prefill
replica to the decode replica (the gateway's metrics count the transfer), and which stops on
SIGTERM. Flags that cannot make a disaggregated mesh are refused."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stagekit.errors import ConfigError
from stagekit.ports import free_port
from stagemesh.cli import up_cmd


def _up(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(home / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "stagemesh.cli.main", "up", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


@pytest.mark.parametrize(("args", "message"), [
    (["--decode", "1"], "needs at least one of each"),
    (["--prefill", "1", "--decode", "1", "--dp", "2"], "leave out --dp"),
])
def test_flags_that_cannot_disaggregate_are_refused(args: list[str], message: str) -> None:
    parser = argparse.ArgumentParser()
    up_cmd.register(parser.add_subparsers())
    with pytest.raises(ConfigError, match=message):   # `up` prints it and exits with 2 before starting anything
        up_cmd.pd_roles(parser.parse_args(["up", *args]))
    assert up_cmd.pd_roles(parser.parse_args(["up", "--prefill", "2", "--decode", "1"])) == [
        "prefill", "prefill", "decode"]


def test_up_with_prefill_and_decode_replicas(tmp_path: Path) -> None:
    port = free_port()
    proc = _up(tmp_path, "--port", str(port), "--prefill", "1", "--decode", "1", "--threads", "1", "--no-grpc",
               "--pd-min-prefill-tokens", "0", "--log-dir", str(tmp_path / "logs"))
    url, lines = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("stagemesh is up" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert any("1 prefill, 1 decode" in line for line in lines), "".join(lines)
        assert any("stagemesh is up" in line for line in lines), "".join(lines)
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert [r["role"] for r in health["replicas"]] == ["prefill", "decode"]
        body = {"prompt": "Once upon a time " * 4, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert re.search(r'stagemesh_pd_handoffs_total\{outcome="transferred"\} 1\.0', metrics), metrics
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
