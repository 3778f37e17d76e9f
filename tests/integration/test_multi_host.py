"""Multi-host on one machine: stages on separate "hosts" (network namespaces on a switch, each with an
address and a hostname of its own; tests/helpers/netns.py), the gateway on a host of its own reaching them
by their hosts' addresses, the test as its client from the root namespace.

- A PP2 replica with a stage on each host, on the UCX data plane (where ucxx imports) and on gRPC: greedy
  tokens through the gateway equal transformers' (which a single-host mesh gives too: test_parity.py), and
  the data plane takes its cross-host path: UCX links with endpoint error handling over TCP between the two
  addresses, or the gRPC frame streams. Pulling the last stage's host off the switch fails the step in
  flight within the step timeout; plugged back, the replica serves exact tokens again.
- A data-parallel-attention group of two Mixtral replicas, one per host: tokens equal transformers' with
  requests on both, and the EP group's collectives go over gloo/TCP, not shared memory (the hosts are
  different machines to the stages; gloo binds eth0 by GLOO_SOCKET_IFNAME, as on real hosts whose name
  does not resolve to their address).

Skipped where the machine allows no network namespaces (not root, no `ip`/`unshare`, refused).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from stagekit.client import GenerationClient
from stagekit.errors import StagemeshError, StageUnavailable
from stagekit.transport.ucx.runtime import ucx_importable
from tests.gateway.tokenizer_files import tokenizer_files
from tests.helpers.checkpoints import NUM_NEW, PROMPTS, Reference
from tests.helpers.netns import Host, NetnsLab, tcp_connections, unavailable_reason
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no network namespaces here: {_REASON}")

GREEDY = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
STEP_TIMEOUT_S = 3.0
PORT = 50051        # every host is a fresh network namespace: any port is free there
DP_STAGE_PORT = 50052   # the PP replica's stages may still hold PORT
DP_PORT = 29600
GATEWAY_PORT = 8000     # HTTP; gRPC on the next port
HOST_ENV = {"GLOO_SOCKET_IFNAME": "eth0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    """Hosts a and b for stages, c for the gateway: everything a killed run leaves is in a namespace, which
    the next run removes (tests/helpers/netns.py)."""
    with NetnsLab(3) as lab:
        yield lab


def stage_argv(model: str, host: Host, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stagemesh.cli.main", "stage", "--model", model, "--host", host.address,
            "--port", str(port), "--threads", "1", "--kv-cache-memory", "64MiB", "--no-progress", *extra]


def wait_until(cond: Callable[[], bool], what: str, procs: list[subprocess.Popen], logs: list[Path],
               timeout_s: float = 120.0) -> None:
    """Poll ``cond`` until it holds; fail with the logs' tails when a process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        exited = [p.args for p in procs if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in logs)
            raise AssertionError(f"{'a process exited' if exited else 'timed out'} waiting for {what}\n{tails}")
        time.sleep(0.2)


@dataclass
class Replica:
    plane: str
    ref: Reference
    addresses: list[str]
    logs: list[Path]
    procs: list[subprocess.Popen]
    client: GenerationClient


@pytest.fixture(scope="module", params=[
    pytest.param("ucx", marks=pytest.mark.skipif(not ucx_importable(), reason="ucxx does not import")), "grpc"])
def replica(request: pytest.FixtureRequest, lab: NetnsLab, hf_checkpoints: dict,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """Llama's layers 0:3 on host a, 3:5 on host b, a gateway on host c; the test is the gateway's client."""
    ref: Reference = hf_checkpoints["llama"]
    root = tmp_path_factory.mktemp(f"multi-host-{request.param}")
    model = root / "model"  # the gateway needs a tokenizer; requests go by token ids
    shutil.copytree(ref.path, model)
    for name, content in tokenizer_files().items():
        (model / name).write_bytes(content)
    logs = [root / "stage-a.log", root / "stage-b.log", root / "gateway.log"]
    a, b, c = lab.hosts
    procs = [lab.spawn(host, stage_argv(str(model), host, PORT, "--layers", layers, "--transport", request.param,
                                        "--step-timeout", str(STEP_TIMEOUT_S)), log, HOST_ENV)
             for host, layers, log in ((a, "0:3", logs[0]), (b, "3:5", logs[1]))]
    addresses = [f"{host.address}:{PORT}" for host in (a, b)]
    procs.append(lab.spawn(c, [sys.executable, "-m", "stagemesh.cli.main", "gateway", "--host", c.address,
                               "--port", str(GATEWAY_PORT), "--grpc-port", str(GATEWAY_PORT + 1),
                               "--replica", ",".join(addresses), "--health-interval", "0.5"], logs[2]))
    client = GenerationClient(f"{c.address}:{GATEWAY_PORT + 1}", timeout_s=60)
    try:
        wait_until(lambda: _serving(client), "the gateway to serve", procs, logs)
        yield Replica(request.param, ref, addresses, logs, procs, client)
    finally:
        client.close()
        lab.hosts[1].set_link(True)
        for p in procs:
            lab.kill(p)


def _serving(client: GenerationClient) -> bool:
    try:
        return bool(client.list_models(timeout=2))
    except StagemeshError:  # not up yet
        return False


def _complete(client: GenerationClient, i: int) -> list[int]:
    return list(client.complete(PROMPTS[i], timeout=20, **GREEDY).choices[0].token_ids)


def test_pipeline_across_hosts_is_exact_and_crosses_the_network(replica: Replica, lab: NetnsLab) -> None:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outputs = list(pool.map(lambda i: _complete(replica.client, i), range(len(PROMPTS))))
    assert outputs == replica.ref.tokens
    assert [stage_info(addr).transport for addr in replica.addresses] == [replica.plane] * 2
    a, b, _ = lab.hosts
    conns = tcp_connections(replica.procs[0].pid)  # in host a
    between = {c for c in conns if {c[0], c[2]} == {a.address, b.address}}
    if replica.plane == "ucx":
        # UCX's own TCP connections (the gRPC ones are to or from PORT), and the links' route as logged
        assert any(PORT not in (c[1], c[3]) for c in between), conns
        log_a, log_b = (log.read_text() for log in replica.logs[:2])
        route = "error handling on: network transports only"
        for log, me, peer in ((log_a, 0, b), (log_b, 1, a)):
            assert f"to {replica.addresses[1 - me]} open (host {peer.hostname}, {route})" in log  # outbound
            assert re.search(rf"accepted UCX link \w+ from process \d+ \(host {peer.hostname}, {route}\)", log)
    else:
        assert (a.address, b.address, PORT) in {(c[0], c[2], c[3]) for c in between}, conns  # a's frames to b


def test_a_host_losing_its_link_fails_steps_in_time_and_recovers(replica: Replica, lab: NetnsLab) -> None:
    stream = iter(replica.client.generate(PROMPTS[1], temperature=0.0, max_tokens=250, ignore_eos=True))
    got = 0
    while got < 5:
        got += len(next(stream).token_ids)
    lab.hosts[1].set_link(False)   # the last stage's host: no result comes back, no connection resets
    cut = time.monotonic()
    with pytest.raises(StageUnavailable, match="no result for step"):
        for _ in stream:
            pass
    assert time.monotonic() - cut < STEP_TIMEOUT_S + 2.0
    time.sleep(1.0)
    lab.hosts[1].set_link(True)

    def serves_again() -> bool:
        try:
            return _complete(replica.client, 0) == replica.ref.tokens[0]
        except StageUnavailable:   # the gateway's probe has not seen the stage yet, or TCP is retransmitting
            return False

    wait_until(serves_again, "the replica to serve again", replica.procs, replica.logs, timeout_s=30)
    assert _complete(replica.client, 2) == replica.ref.tokens[2]


def test_dp_attention_group_across_hosts(lab: NetnsLab, moe_checkpoints: dict, tmp_path: Path) -> None:
    ref: Reference = moe_checkpoints["mixtral"]
    hosts = lab.hosts[:2]
    group = f"{hosts[0].address}:{DP_PORT}"
    logs = [tmp_path / f"dp-rank{r}.log" for r in range(2)]
    procs = [lab.spawn(host, stage_argv(ref.path, host, DP_STAGE_PORT, "--dp-size", "2", "--dp-rank", str(r),
                                        "--dp-group", group), logs[r], HOST_ENV) for r, host in enumerate(hosts)]
    heads = [f"{host.address}:{DP_STAGE_PORT}" for host in hosts]
    try:
        wait_until(lambda: _group_ready(heads), "the group to form", procs, logs)
        for head in heads:
            wire([head])
        jobs = [(0, 0), (1, 1), (0, 2), (1, 3)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futs = [pool.submit(generate, heads[r], PROMPTS[i], f"r{r}-p{i}", **GREEDY) for r, i in jobs]
            assert [tokens_of(f.result()) for f in futs] == [ref.tokens[i] for _, i in jobs]
        for log in logs:  # the hosts are two machines to the group: no shared memory between them
            assert "experts over 2 EP ranks, EP collectives: TorchCommunicator" in log.read_text()
    finally:
        for p in procs:
            lab.kill(p)


def _group_ready(heads: list[str]) -> bool:
    try:
        return all(stage_info(head).dp_state == "ready" for head in heads)
    except grpc.RpcError:
        return False
