"""Stages addressed by DNS name, and a stage replaced at a new address under the same name (what a
Kubernetes pod replaced by its StatefulSet looks like to the mesh: deploy/k8s).

Hosts a, b, c and d are network namespaces on one switch (tests/helpers/netns.py), each resolving the
names s0.mesh.test and s1.mesh.test through its own /etc/hosts. The gateway on c is given only names; it
and stage s0 (on a) resolve s1.mesh.test when they dial it. Stage s1 runs on b, is killed, and comes back
on d while the name moves to d's address: the gateway's gRPC channels re-resolve the name, re-wire the
replica, s0 dials the new s1 (GetInfo, then the UCX link to the worker address it publishes, over TCP
across hosts), and greedy tokens equal those before the move. Skipped where the machine allows no network
namespaces. ~40 s alone, most of it three stage start-ups.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagekit.client import GenerationClient
from stagekit.demo import write_demo_model
from stagekit.errors import StagemeshError
from stagekit.transport.ucx.runtime import ucx_importable
from tests.helpers.netns import Host, NetnsLab, unavailable_reason
from tests.integration.test_multi_host import wait_until

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no network namespaces here: {_REASON}")

PORT = 50051
GATEWAY_PORT = 8000
PLANE = "ucx" if ucx_importable() else "grpc"
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
S0, S1 = "s0.mesh.test", "s1.mesh.test"


@pytest.fixture()
def lab() -> Iterator[NetnsLab]:
    with NetnsLab(4) as lab:
        yield lab


def _stage(lab: NetnsLab, host: Host, model: Path, layers: str, log: Path):
    argv = [sys.executable, "-m", "stagemesh.cli.main", "stage", "--model", str(model), "--host", "0.0.0.0",
            "--port", str(PORT), "--layers", layers, "--threads", "1", "--kv-cache-memory", "32MiB",
            "--transport", PLANE, "--no-progress"]
    return lab.spawn(host, argv, log, {"PYTHONUNBUFFERED": "1"})


def _tokens(client: GenerationClient) -> list[int] | None:
    try:
        return list(client.complete("Hello, mesh", timeout=20, **GREEDY).choices[0].token_ids)
    except StagemeshError:   # not serving (yet, or again)
        return None


def test_a_stage_replaced_at_a_new_address_under_its_name_is_reached_again(lab: NetnsLab, tmp_path: Path) -> None:
    a, b, c, d = lab.hosts
    model = write_demo_model(tmp_path / "demo", arch="llama", seed=0)
    logs = [tmp_path / name for name in ("s0.log", "s1-on-b.log", "gateway.log", "s1-on-d.log")]
    lab.set_names({S0: a, S1: b})
    procs = [_stage(lab, a, model, ":2", logs[0]), _stage(lab, b, model, "2:", logs[1])]
    procs.append(lab.spawn(c, [sys.executable, "-m", "stagemesh.cli.main", "gateway", "--host", "0.0.0.0",
                               "--port", str(GATEWAY_PORT), "--grpc-port", str(GATEWAY_PORT + 1),
                               "--replica", f"{S0}:{PORT},{S1}:{PORT}", "--health-interval", "0.5"], logs[2]))
    client = GenerationClient(f"{c.address}:{GATEWAY_PORT + 1}", timeout_s=60)
    try:
        before: list[list[int] | None] = [None]

        def serves() -> bool:
            before[0] = _tokens(client)
            return before[0] is not None

        wait_until(serves, "the gateway to serve through the names", procs, logs, timeout_s=180)
        assert len(before[0]) == GREEDY["max_tokens"]

        lab.kill(procs.pop(1))          # s1's pod is gone ...
        lab.set_names({S0: a, S1: d})   # ... and its name now points at the replacement's address
        procs.insert(1, _stage(lab, d, model, "2:", logs[3]))
        wait_until(lambda: _tokens(client) == before[0], "the replica to serve again through the moved name",
                   procs, logs, timeout_s=180)
    finally:
        client.close()
    s0_log = logs[0].read_text()
    if PLANE == "ucx":  # s0's link to s1 was re-made to the new host, over TCP (another machine to it)
        route = "error handling on: network transports only"
        for host in (b, d):
            assert re.search(rf"UCX link \w+ to {re.escape(S1)}:{PORT} open \(host {host.hostname}, {route}\)",
                             s0_log), s0_log[-3000:]
