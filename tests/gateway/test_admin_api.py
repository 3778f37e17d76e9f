"""The admin API against fake stages: off without a key, 401 without the right one, and every
operation's answer and effect (add, drain, resume, remove with migration, replace a stage,
refusals with 400/404/409), plus the stall watch taking a wedged replica out."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator

import httpx
import pytest

from stagekit.ports import free_port
from tests.gateway.fake_stage import FakeStage, StageHost, script_ids, tokenizer
from tests.gateway.harness import GatewayThread, wait_for

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SEED = 1234


@pytest.fixture()
def pair(stage_host: StageHost) -> Iterator[tuple[GatewayThread, list[list[str]]]]:
    """A gateway with the admin API over two fresh replicas of fake stages."""
    replicas = [stage_host.start_replica(2), stage_host.start_replica(2)]
    with GatewayThread(replicas, admin_api_keys=(ADMIN,), api_keys=("client-key",), stall_timeout_s=1.0) as gw:
        yield gw, replicas


def _admin(gw: GatewayThread, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/admin{path}", headers=AUTH, timeout=30, **kw)


def _complete(gw: GatewayThread, max_tokens: int = 6) -> httpx.Response:
    # seeded: a fake stage continues a moved request exactly only when sampling (greedy restarts its script)
    body = {"prompt": "hi", "max_tokens": max_tokens, "temperature": 0.5, "seed": SEED, "ignore_eos": True}
    return httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": "Bearer client-key"})


def _expected(max_tokens: int) -> str:
    """What the fake stages sample for `_complete`, moved or not (fake_stage.py)."""
    ids = script_ids()
    offset = random.Random(SEED).randrange(len(ids))
    return tokenizer().decode([ids[(offset + k) % len(ids)] for k in range(max_tokens)])


def test_admin_api_is_off_without_a_key(gateway: GatewayThread) -> None:
    r = httpx.get(f"{gateway.url}/admin/replicas", headers=AUTH, timeout=10)
    assert r.status_code == 404


def test_admin_calls_need_the_admin_key(pair: tuple[GatewayThread, list[list[str]]]) -> None:
    gw, _ = pair
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer client-key"}, {"Authorization": ADMIN})
    for headers in wrong:
        for method, path in (("GET", "/replicas"), ("POST", "/replicas/r0/drain"), ("DELETE", "/replicas/r0")):
            r = httpx.request(method, f"{gw.url}/admin{path}", headers=headers, timeout=10)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert gw.state.pool.get(0).state == "serving"  # nothing happened
    r = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH, timeout=10)
    assert r.status_code == 401  # the admin key is not a client key
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'stagemesh_requests_total{endpoint="/admin",status="401"} 12.0' in metrics


def test_add_drain_resume_remove(pair: tuple[GatewayThread, list[list[str]]], stage_host: StageHost) -> None:
    gw, replicas = pair
    listed = _admin(gw, "GET", "/replicas").json()["replicas"]
    assert [(r["id"], r["addresses"], r["state"], r["origin"]) for r in listed] == [
        ("r0", replicas[0], "serving", "flag"), ("r1", replicas[1], "serving", "flag")]

    third = stage_host.start_replica(2)
    r = _admin(gw, "POST", "/replicas", json={"stages": third})
    assert r.status_code == 202, r.text
    assert (r.json()["id"], r.json()["state"], r.json()["origin"]) == ("r2", "serving", "admin")
    assert stage_host.stages[third[0]].pipeline == third  # wired
    health = httpx.get(f"{gw.url}/health", timeout=10).json()
    assert [x["id"] for x in health["replicas"]] == ["r0", "r1", "r2"]

    r = _admin(gw, "POST", "/replicas/r0/drain")
    assert r.status_code == 200 and r.json()["state"] == "draining"
    head0 = stage_host.stages[replicas[0][0]]
    before = len(head0.generate_calls)
    for _ in range(4):
        assert _complete(gw).status_code == 200
    assert len(head0.generate_calls) == before  # nothing new goes to a draining replica
    health = httpx.get(f"{gw.url}/health", timeout=10).json()
    assert health["replicas"][0]["state"] == "draining"
    assert _admin(gw, "POST", "/replicas/r0/resume").json()["state"] == "serving"

    r = _admin(gw, "DELETE", "/replicas/r1", params={"timeout": 5})
    assert r.status_code == 200 and r.json() == {"id": "r1", "removed": True, "moved_requests": 0}
    assert _admin(gw, "GET", "/replicas/r1").status_code == 404
    # ids are never reused
    fourth = stage_host.start_replica(1)
    assert _admin(gw, "POST", "/replicas", json={"stages": fourth}).json()["id"] == "r3"
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    for op in ("add", "drain", "resume", "remove"):
        assert f'stagemesh_admin_operations_total{{op="{op}",outcome="ok"}}' in metrics
    assert 'stagemesh_replicas{state="serving"} 3.0' in metrics
    assert 'stagemesh_replica_healthy{replica="1"}' not in metrics  # a removed replica's series go


def test_remove_moves_requests_in_flight(pair: tuple[GatewayThread, list[list[str]]], stage_host: StageHost) -> None:
    gw, replicas = pair
    for rep in replicas:
        stage_host.stages[rep[0]].token_delay_s = 0.05
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(_complete(gw, 40))) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: gw.state.pool.get(0).active_requests > 0, timeout_s=10)
    r = _admin(gw, "DELETE", "/replicas/r0", params={"timeout": 0})
    assert r.status_code == 200, r.text
    assert r.json()["moved_requests"] >= 1
    for t in threads:
        t.join(timeout=30)
    assert [x.status_code for x in results] == [200] * 4
    assert {x.json()["choices"][0]["text"] for x in results} == {_expected(40)}  # unchanged by the move
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    moves = re.findall(r'stagemesh_request_retries_total\{kind="(?:retry|migration)"\} ([\d.]+)', metrics)
    assert sum(float(x) for x in moves) == r.json()["moved_requests"]  # before or after their first tokens
    assert gw.state.pool.get(1).state == "serving"  # an eviction is no fault of the replica


def test_replace_stage(pair: tuple[GatewayThread, list[list[str]]], stage_host: StageHost) -> None:
    gw, replicas = pair
    new = stage_host.start()
    r = _admin(gw, "PUT", "/replicas/r1/stages/1", json={"address": new})
    assert r.status_code == 200, r.text
    assert r.json()["addresses"] == [replicas[1][0], new] and r.json()["state"] == "serving"
    assert stage_host.stages[replicas[1][0]].pipeline == [replicas[1][0], new]  # the head was re-wired
    assert stage_host.stages[new].pipeline == [replicas[1][0], new]
    for _ in range(3):
        assert _complete(gw).json()["choices"][0]["text"] == _expected(6)

    spare = stage_host.start()
    stage_host.stop(spare)  # nothing answers there
    r = _admin(gw, "PUT", "/replicas/r1/stages/0", json={"address": spare})
    assert r.status_code == 409 and "did not answer" in r.json()["error"]["message"]
    assert gw.state.pool.get(1).addresses == (replicas[1][0], new)  # unchanged


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/replicas", None, 400, "'stages'"),
        ("POST", "/replicas", {"stages": []}, 400, "non-empty list"),
        ("POST", "/replicas", {"stages": ["nohost"]}, 400, "not a stage address"),
        ("POST", "/replicas", {"stages": ["h:1", "h:1"]}, 400, "more than once"),
        ("POST", "/replicas", {"stages": "h:1"}, 400, "non-empty list"),
        ("GET", "/replicas/r99", None, 404, "no replica"),
        ("GET", "/replicas/x", None, 404, "no replica"),
        ("POST", "/replicas/r7/drain", None, 404, "no replica"),
        ("DELETE", "/replicas/r0?timeout=-1", None, 400, "timeout"),
        ("DELETE", "/replicas/r0?timeout=nan", None, 400, "timeout"),
        ("PUT", "/replicas/r0/stages/5", {"address": "h:1"}, 404, "no stage 5"),
        ("PUT", "/replicas/r0/stages/0", {"addr": "h:1"}, 400, "'address'"),
        ("PUT", "/replicas/r0/stages/0", {"address": "h:99999"}, 400, "not a stage address"),
    ],
)
def test_bad_admin_requests(pair: tuple[GatewayThread, list[list[str]]], method: str, path: str,
                            body: object, status: int, says: str) -> None:
    gw, _ = pair
    r = _admin(gw, method, path, json=body) if body is not None else _admin(gw, method, path)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
    assert [x.state for x in gw.state.pool.replicas] == ["serving", "serving"]


def test_a_stage_of_another_replica_is_refused(pair: tuple[GatewayThread, list[list[str]]]) -> None:
    gw, replicas = pair
    r = _admin(gw, "POST", "/replicas", json={"stages": [replicas[0][1]]})
    assert r.status_code == 409 and "replica r0" in r.json()["error"]["message"]
    r = _admin(gw, "PUT", "/replicas/r1/stages/1", json={"address": replicas[0][1]})
    assert r.status_code == 409


def test_a_dp_group_member_is_not_removed_alone(stage_host: StageHost) -> None:
    members = [stage_host.start(FakeStage(dp_group="g:1", dp_rank=i, dp_size=2, dp_state="ready")) for i in (0, 1)]
    with GatewayThread([[members[0]], [members[1]]], admin_api_keys=(ADMIN,)) as gw:
        wait_for(lambda: gw.state.pool.dp_groups.groups.get("g:1") is not None, timeout_s=10)
        r = _admin(gw, "DELETE", "/replicas/r1")
        assert r.status_code == 409
        assert "DP-attention group g:1" in r.json()["error"]["message"]
        assert _admin(gw, "PUT", "/replicas/r0/stages/0", json={"address": "h:1"}).status_code == 409
        assert len(gw.state.pool.replicas) == 2


def test_a_stalled_replica_is_taken_out_and_rewired(pair: tuple[GatewayThread, list[list[str]]],
                                                    stage_host: StageHost) -> None:
    gw, replicas = pair
    wedged = stage_host.stages[replicas[0][0]]
    wedged.token_delay_s = 60.0  # answers probes, never completes a step
    wires = wedged.wire_calls
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(_complete(gw, 8))) for _ in range(2)]
    for t in threads:
        t.start()
    stalls = gw.state.metrics.replica_stalls.labels(replica="0")
    wait_for(lambda: stalls._value.get() == 1, timeout_s=20)
    for t in threads:
        t.join(timeout=30)
    assert [x.status_code for x in results] == [200, 200]
    assert {x.json()["choices"][0]["text"] for x in results} == {_expected(8)}
    assert gw.state.pool.get(1).state == "serving"
    wedged.token_delay_s = 0.0
    # its next probe re-wires every stage (they all still say they are wired) and it serves again
    wait_for(lambda: wedged.wire_calls > wires and gw.state.pool.get(0).state == "serving", timeout_s=20)
    log = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'stagemesh_replica_stalls_total{replica="0"} 1.0' in log


def test_a_request_moved_off_a_replica_may_come_back_to_it(pair: tuple[GatewayThread, list[list[str]]],
                                                           stage_host: StageHost) -> None:
    """Moved off r0 (a stage replaced), then off r1: it goes back to r0, serving again, and ends
    as if undisturbed (a replica the gateway moved it off is not one that failed it)."""
    gw, replicas = pair
    for rep in replicas:
        stage_host.stages[rep[0]].token_delay_s = 0.05
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(_complete(gw, 60)))
    thread.start()
    for replica in (0, 1):
        wait_for(lambda r=replica: gw.state.pool.get(r).active_requests == 1, timeout_s=10)
        r = _admin(gw, "PUT", f"/replicas/r{replica}/stages/1", json={"address": stage_host.start()},
                   params={"timeout": 0})
        assert r.status_code == 200 and r.json()["moved_requests"] == 1, r.text
    thread.join(timeout=30)
    assert result[0].status_code == 200, result[0].text
    assert result[0].json()["choices"][0]["text"] == _expected(60)


def test_an_added_replica_joins_when_its_stages_answer(pair: tuple[GatewayThread, list[list[str]]],
                                                        stage_host: StageHost) -> None:
    gw, _ = pair
    port = free_port()
    r = _admin(gw, "POST", "/replicas", json={"stages": [f"127.0.0.1:{port}"]})
    assert r.status_code == 202 and r.json()["state"] == "joining", r.text
    assert "r2" in [x["id"] for x in httpx.get(f"{gw.url}/health", timeout=10).json()["replicas"]]
    stage_host.start(port=port)
    wait_for(lambda: gw.state.pool.get(2).state == "serving", timeout_s=20)  # wired by the health loop


def test_a_body_sent_the_way_curl_d_sends_it(pair: tuple[GatewayThread, list[list[str]]],
                                             stage_host: StageHost) -> None:
    """``curl -d '{...}'`` labels JSON as a form: the README's examples work as written."""
    gw, _ = pair
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    stages = stage_host.start_replica(1)
    r = httpx.post(f"{gw.url}/admin/replicas", content=f'{{"stages": ["{stages[0]}"]}}', headers=form, timeout=10)
    assert r.status_code == 202, r.text
    r = httpx.post(f"{gw.url}/admin/replicas", content="stages=h:1", headers=form, timeout=10)
    assert r.status_code == 400 and "JSON object with 'stages'" in r.json()["error"]["message"]
