"""DP-attention groups at the gateway: the replicas of a group serve together or not at all.

Replicas 0 and 1 (two fake stages each) form one group of 2; replica 2 is outside it. A member
whose stage reports its group forming, or stops answering, takes the whole group out; requests in
flight on the group (failed by its stages) continue on replica 2; the group serves again once
every member is back.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.fake_stage import FakeStage, StageHost
from tests.gateway.harness import GatewayThread, wait_for

GROUP = "10.0.0.1:29600"


@pytest.fixture()
def mesh(stage_host: StageHost) -> Iterator[list[list[str]]]:
    replicas = [stage_host.start_replica(2), stage_host.start_replica(2), stage_host.start_replica(1)]
    for rank, replica in enumerate(replicas[:2]):
        for address in replica:
            stage = stage_host.stages[address]
            stage.dp_group, stage.dp_rank, stage.dp_size, stage.dp_state = GROUP, rank, 2, "ready"
    yield replicas
    for address in [a for r in replicas for a in r]:
        if address in stage_host._servers:
            stage_host.stop(address)


def heads(stage_host: StageHost, replicas: list[list[str]]) -> list[FakeStage]:
    return [stage_host.stages[r[0]] for r in replicas]


def calls(stages: list[FakeStage]) -> list[int]:
    return [len(s.generate_calls) for s in stages]


def complete(gw: GatewayThread, **body: object) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **body}, timeout=10)


def health(gw: GatewayThread) -> dict:
    return httpx.get(f"{gw.url}/health").json()


def group_metric(gw: GatewayThread, name: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    found = re.search(rf'^{name}{{group="{re.escape(GROUP)}"}} ([\d.]+)$', text, re.MULTILINE)
    assert found, f"{name} not exported"
    return float(found.group(1))


def test_a_group_is_routed_least_loaded_by_default(stage_host: StageHost, mesh: list[list[str]]) -> None:
    members = heads(stage_host, mesh[:2])
    with GatewayThread(mesh[:2]) as gw:
        body = health(gw)
        assert body["routing"] == "least_loaded"
        assert body["dp_groups"] == [{"group": GROUP, "size": 2, "members": [0, 1], "up": True, "reason": ""}]
        assert [(r["dp_group"], r["dp_rank"], r["healthy"]) for r in body["replicas"]] == [
            (GROUP, 0, True),
            (GROUP, 1, True),
        ]
        assert group_metric(gw, "stagemesh_dp_group_up") == 1
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 0
        # A long request holds one head: least loaded sends the next ones to the other (round robin would not).
        for stage in members:
            stage.token_delay_s = 0.05
        long = {"prompt": "Hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=long, timeout=10) as response:
            lines = response.iter_lines()  # held: a dropped iterator closes the connection
            next(line for line in lines if line.startswith("data: "))
            busy = next(i for i, stage in enumerate(members) if stage.generate_calls)
            members[1 - busy].token_delay_s = 0.0
            assert [complete(gw).status_code for _ in range(2)] == [200, 200]
            assert calls(members)[busy] == 1 and calls(members)[1 - busy] == 2


def test_an_explicit_routing_policy_wins(mesh: list[list[str]]) -> None:
    with GatewayThread(mesh[:2], routing="round_robin") as gw:
        assert health(gw)["routing"] == "round_robin"


def test_a_forming_member_takes_the_whole_group_out(stage_host: StageHost, mesh: list[list[str]]) -> None:
    all_heads = heads(stage_host, mesh)
    with GatewayThread(mesh) as gw:
        forming = stage_host.stages[mesh[1][1]]  # not the head: any stage of a member counts
        forming.dp_state, forming.dp_detail = "forming", "rank 0 is re-joining"
        wait_for(lambda: not health(gw)["dp_groups"][0]["up"])
        body = health(gw)
        reason = body["dp_groups"][0]["reason"]
        assert reason == (
            f"DP group {GROUP} is down: replica 1 (dp rank 1) is down: "
            f"DP group {GROUP} is forming (stage 1): rank 0 is re-joining"
        )
        assert [r["healthy"] for r in body["replicas"]] == [False, False, True]
        assert body["replicas"][0]["last_error"] == reason  # healthy itself, held out for its group
        before = calls(all_heads)
        assert [complete(gw).status_code for _ in range(4)] == [200] * 4
        assert calls(all_heads) == [before[0], before[1], before[2] + 4]
        assert group_metric(gw, "stagemesh_dp_group_up") == 0
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 1
        assert 'stagemesh_replica_healthy{replica="0"} 0.0' in httpx.get(f"{gw.url}/metrics").text

        forming.dp_state, forming.dp_detail = "ready", ""
        wait_for(lambda: health(gw)["dp_groups"][0]["up"])
        assert all(r["healthy"] for r in health(gw)["replicas"])
        before = calls(all_heads)
        assert [complete(gw).status_code for _ in range(6)] == [200] * 6
        assert all(now > then for now, then in zip(calls(all_heads), before, strict=True))
        assert group_metric(gw, "stagemesh_dp_group_up") == 1
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 1


def test_requests_in_flight_move_off_a_group_whose_member_died(stage_host: StageHost, mesh: list[list[str]]) -> None:
    all_heads = heads(stage_host, mesh)
    for stage in all_heads:
        stage.token_delay_s = 0.05
    with GatewayThread(mesh) as gw:
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: results.append(complete(gw, max_tokens=40, ignore_eos=True)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: all(s.generate_calls for s in all_heads))  # least loaded: one request on each
        # Member 1's second stage dies; the surviving stages of the group fail what they run.
        dead_address = mesh[1][1]
        dead = stage_host.stages[dead_address]
        stage_host.stop(dead_address)
        for rank, stage in enumerate(all_heads[:2]):
            stage.dp_state, stage.dp_detail = "forming", f"rank {1 - rank} left"
        for t in threads:
            t.join(timeout=15)
        assert [r.status_code for r in results] == [200] * 3
        assert [r.json()["usage"]["completion_tokens"] for r in results] == [40] * 3
        assert calls(all_heads)[2] == 3  # its own request and the two from the group
        wait_for(lambda: f"replica 1 stage 1 ({dead_address})" in health(gw)["dp_groups"][0]["reason"])
        reason = health(gw)["dp_groups"][0]["reason"]
        assert f"replica 0 (dp rank 0) is down: DP group {GROUP} is forming: rank 1 left" in reason
        assert [r["healthy"] for r in health(gw)["replicas"]] == [False, False, True]

        # The member restarts (forgetting its wiring) and the group re-forms: both serve again.
        dead.index = -1
        stage_host.start(dead, port=int(dead_address.rsplit(":", 1)[1]))
        for stage in all_heads[:2]:
            stage.dp_state, stage.dp_detail, stage.token_delay_s = "ready", "", 0.0
        wait_for(lambda: health(gw)["dp_groups"][0]["up"], timeout_s=5)
        assert dead.index == 1  # re-wired
        before = calls(all_heads)
        assert [complete(gw).status_code for _ in range(6)] == [200] * 6
        assert all(now > then for now, then in zip(calls(all_heads), before, strict=True))
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 1


def test_a_group_given_only_in_part_is_down(mesh: list[list[str]]) -> None:
    with GatewayThread(mesh[:1]) as gw:
        response = httpx.get(f"{gw.url}/health")
        assert response.status_code == 503
        reason = response.json()["dp_groups"][0]["reason"]
        assert reason == (
            f"DP group {GROUP} is down: the gateway knows 1 of its 2 replicas ([0]): "
            "every replica of the group must be given to the gateway (--replica)"
        )
        refused = complete(gw)
        assert refused.status_code == 503
        assert reason in refused.json()["error"]["message"]
        assert group_metric(gw, "stagemesh_dp_group_up") == 0
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 0  # never up: no transition


def test_a_member_missing_at_start_joins_later(stage_host: StageHost, mesh: list[list[str]]) -> None:
    all_heads = heads(stage_host, mesh)
    absent = {address: stage_host.stages[address] for address in mesh[1]}
    for address in absent:
        stage_host.stop(address)
    with GatewayThread(mesh) as gw:  # replica 2 alone can serve: the gateway does not wait for the group
        body = health(gw)
        assert (body["status"], body["routing"]) == ("ok", "least_loaded")
        assert [r["state"] for r in body["replicas"]] == ["held", "joining", "serving"]
        assert not body["dp_groups"][0]["up"]
        assert "replica(s) [1] never answered" in body["dp_groups"][0]["reason"]
        before = calls(all_heads)
        assert [complete(gw).status_code for _ in range(3)] == [200] * 3
        assert calls(all_heads) == [before[0], before[1], before[2] + 3]

        for address, stage in absent.items():
            stage_host.start(stage, port=int(address.rsplit(":", 1)[1]))
        wait_for(lambda: health(gw)["dp_groups"][0]["up"], timeout_s=5)
        assert [r["state"] for r in health(gw)["replicas"]] == ["serving"] * 3
        before = calls(all_heads)
        assert [complete(gw).status_code for _ in range(6)] == [200] * 6
        assert all(now > then for now, then in zip(calls(all_heads), before, strict=True))
        assert group_metric(gw, "stagemesh_dp_group_down_total") == 0  # never up before: no transition


def test_startup_waits_for_the_group_to_form(stage_host: StageHost, mesh: list[list[str]]) -> None:
    members = heads(stage_host, mesh[:2])
    for stage in members:
        stage.dp_state, stage.dp_detail = "forming", "waiting for rank 1"
    gw = GatewayThread(mesh[:2]).start(wait=False)
    try:
        time.sleep(0.5)
        assert not gw.server.started
        for stage in members:
            stage.dp_state = "ready"
        gw.wait_started()
        assert health(gw)["dp_groups"][0]["up"]
        assert complete(gw).status_code == 200
    finally:
        gw.stop()
