"""``stagemesh gateway --replica-file``: a real gateway process over fake stages, reloaded with a
real SIGHUP: new lines added, missing ones removed, a changed line re-wired, a malformed file
ignored (logged with its line); replicas of --replica flags are left alone."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.replica_file import parse_replica_file
from stagekit.errors import InvalidRequest
from stagekit.ports import free_port
from tests.gateway.fake_stage import StageHost
from tests.gateway.harness import wait_for

KEY = "file-admin-key"


def test_parse_replica_file(tmp_path: Path) -> None:
    f = tmp_path / "replicas"
    f.write_text("# the mesh\n\nh:1, h:2   # replica one\n[::1]:3\n")
    assert parse_replica_file(f) == [("h:1", "h:2"), ("[::1]:3",)]
    for text, says in [("h:1\nh:x\n", ":2: 'h:x' is not a stage address"),
                       ("h:1,,h:2\n", ":1: a stage address is a 'host:port' string, not ''"),
                       ("h:1,h:2\nh:2\n", ":2: stage h:2 is named on line 1 too"),
                       ("h:1,h:1\n", ":1: stage h:1 is named earlier on this line too")]:
        f.write_text(text)
        with pytest.raises(InvalidRequest, match=re.escape(says)):
            parse_replica_file(f)


@contextlib.contextmanager
def _gateway(tmp_path: Path, replica_file: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.server", "--port", str(port), "--replica-file", str(replica_file),
             "--admin-api-key", KEY, "--health-interval", "0.2", *flags],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or proc.poll() is not None, timeout_s=60, interval_s=0.1)
        assert proc.poll() is None, log.read_text()
        yield proc, url, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _replicas(url: str) -> list[tuple[str, list[str], str, str]]:
    body = httpx.get(f"{url}/admin/replicas", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    return [(r["id"], r["addresses"], r["origin"], r["state"]) for r in body["replicas"]]


def test_replica_file_reloads_on_sighup(tmp_path: Path, stage_host: StageHost) -> None:
    a, b, c, d = (stage_host.start_replica(2) for _ in range(4))
    a1 = stage_host.start()
    f = tmp_path / "replicas"
    f.write_text(f"# two replicas\n{','.join(a)}\n{','.join(b)}\n")
    with _gateway(tmp_path, f, "--replica", ",".join(c)) as (proc, url, log):
        wait_for(lambda: _replicas(url) == [("r0", c, "flag", "serving"), ("r1", a, "file", "serving"),
                                            ("r2", b, "file", "serving")], timeout_s=30, interval_s=0.1)
        f.write_text(f"{a[0]},{a1}   # stage 1 moved\n{','.join(d)}\n")  # b gone, d new
        proc.send_signal(signal.SIGHUP)
        expect = [("r0", c, "flag", "serving"), ("r1", [a[0], a1], "file", "serving"), ("r3", d, "file", "serving")]
        wait_for(lambda: _replicas(url) == expect, timeout_s=30, interval_s=0.1)
        assert stage_host.stages[a1].pipeline == [a[0], a1] and stage_host.stages[a[0]].pipeline == [a[0], a1]

        f.write_text(f"{a[0]},{a1}\nnot-an-address\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: 'stagemesh_replica_file_reloads_total{outcome="invalid"} 1.0'
                 in httpx.get(f"{url}/metrics", timeout=5).text, timeout_s=30, interval_s=0.1)
        assert _replicas(url) == expect  # the old set is kept
        assert f"{f}:2: 'not-an-address' is not a stage address" in log.read_text()
        assert 'stagemesh_replica_file_reloads_total{outcome="ok"} 1.0' in httpx.get(f"{url}/metrics").text
