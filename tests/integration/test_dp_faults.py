"""A DP-attention group fails as one and comes back as one, through real processes and the
real gateway: SIGKILL a member mid-stream, or SIGSTOP it, and the other member's stream
ends with an error within the collective timeout, it reports the group forming, the gateway
takes both replicas out and says why; restarting (or continuing) the member brings the
group back, and its greedy tokens are transformers' again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.gateway.tokenizer_files import tokenizer_files
from tests.helpers.checkpoints import NUM_NEW, PROMPTS, Reference
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire

TIMEOUT_S = 4.0   # --collective-timeout of these groups
GREEDY = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture
def group(moe_checkpoints: dict, tmp_path):
    ref: Reference = moe_checkpoints["mixtral"]
    # the gateway needs a tokenizer; the test checkpoint has none (its requests go by token ids)
    model = tmp_path / "model"
    shutil.copytree(ref.path, model)
    for name, content in tokenizer_files().items():
        (model / name).write_bytes(content)
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=split_layers(5, 1), dp=2, threads=1, port=free_port(),
                         dp_attention=True, collective_timeout=TIMEOUT_S, stage_metrics=True,
                         extra_gateway_args=["--health-interval", "1"]), tmp_path / "logs")
    try:
        mesh.start(timeout_s=240)
        yield mesh, ref
    finally:
        mesh.stop()


def _health(mesh: Mesh) -> dict:
    """The gateway's /health body (503 while no replica serves, 200 otherwise)."""
    try:
        with urllib.request.urlopen(f"{mesh.url}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.code == 503
        return json.loads(e.read())


def _wait(cond, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _group_up(mesh: Mesh) -> bool:
    groups = _health(mesh).get("dp_groups", [])
    return len(groups) == 1 and groups[0]["up"]


def _both_ready(mesh: Mesh) -> bool:
    try:
        return all(stage_info(p[0]).dp_state == "ready" for p in mesh.replicas)
    except grpc.RpcError:
        return False


def _stage_proc(mesh: Mesh, replica: int):
    return next(p for name, p in mesh.procs if name == f"stage-r{replica}-s0")


def _check_tokens(mesh: Mesh, ref: Reference) -> None:
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(generate, mesh.replicas[r][0], PROMPTS[i], f"after-{r}", **GREEDY)
                for r, i in ((0, 2), (1, 0))]
        assert [tokens_of(f.result()) for f in futs] == [ref.tokens[2], ref.tokens[0]]


def _stream_fails_in_time(mesh: Mesh, stop_member, survivor: int = 0) -> None:
    """Long streams one after another on replica ``survivor`` while ``stop_member()`` hits the
    other: the stream running then ends with an error within the collective timeout (plus the
    time to notice), never hangs. (Back to back, so one runs whatever the kernels' speed.)"""

    def streams() -> tuple[grpc.RpcError, int]:
        for n in range(10_000):
            try:
                generate(mesh.replicas[survivor][0], PROMPTS[1], f"long-{n}", temperature=0.0, max_tokens=200,
                         ignore_eos=True)
            except grpc.RpcError as e:
                return e, n
        raise AssertionError("10,000 streams and no error")

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(streams)
        time.sleep(1.0)
        assert not fut.done(), "the streams should still run when the member goes"
        hit = time.monotonic()
        stop_member()
        error, _ = fut.result(timeout=TIMEOUT_S + 30)
        assert time.monotonic() - hit < TIMEOUT_S + 15
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "DP group" in error.details()
    info = stage_info(mesh.replicas[survivor][0])
    assert info.dp_state == "forming" and "failed" in info.dp_detail
    metrics = _stage_metrics(mesh, survivor)
    assert metrics["stagemesh_dp_group_ready"] == 0 and metrics["stagemesh_dp_group_failures_total"] >= 1


def _stage_metrics(mesh: Mesh, replica: int) -> dict[str, float]:
    with urllib.request.urlopen(mesh.stage_metrics_urls[(replica, 0)], timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {line.split("{")[0]: float(line.split()[-1]) for line in lines if line.startswith("stagemesh_dp_group")}


@pytest.mark.parametrize("victim_rank", [1, 0], ids=["member", "rendezvous-host"])
def test_killed_member_fails_the_group_and_a_restart_brings_it_back(group, victim_rank: int) -> None:
    mesh, ref = group
    _wait(lambda: _group_up(mesh), "the gateway to see the group up")
    victim = _stage_proc(mesh, victim_rank)
    _stream_fails_in_time(mesh, lambda: os.killpg(victim.pid, signal.SIGKILL), survivor=1 - victim_rank)
    victim.wait(timeout=10)
    _wait(lambda: not _group_up(mesh), "the gateway to take the group out")
    health = _health(mesh)
    assert health["dp_groups"][0]["reason"] and not any(r["healthy"] for r in health["replicas"])
    # restart the member on its old port (the host also on its old rendezvous port): the gateway
    # re-wires it and the group re-forms
    port = int(mesh.replicas[victim_rank][0].rsplit(":", 1)[1])
    mesh.procs = [(n, p) for n, p in mesh.procs if p is not victim]
    mesh.start_stage(victim_rank, 0, port)
    mesh.wait_stage(mesh.replicas[victim_rank][0], time.monotonic() + 120)
    _wait(lambda: _both_ready(mesh), "the group to re-form")
    _wait(lambda: _group_up(mesh), "the gateway to route to the group again")
    _check_tokens(mesh, ref)
    assert _stage_metrics(mesh, 1 - victim_rank)["stagemesh_dp_group_ready"] == 1


def test_stopped_member_fails_the_group_and_continuing_brings_it_back(group) -> None:
    mesh, ref = group
    victim = _stage_proc(mesh, 1)
    _stream_fails_in_time(mesh, lambda: os.killpg(victim.pid, signal.SIGSTOP))
    _wait(lambda: not _group_up(mesh), "the gateway to take the group out")
    os.killpg(victim.pid, signal.SIGCONT)
    _wait(lambda: _both_ready(mesh), "the group to re-form")
    wire(mesh.replicas[1])
    _check_tokens(mesh, ref)
