"""Regressions from the first fuzzing pass against a live TP1·PP2 replica of the demo model (stage
processes) with an in-process gateway over it: sampling values no sampler can use are refused by
the stage (INVALID_ARGUMENT) and by the gateway (400) while the replica serves on; a Wire naming a
stage twice is refused before anything changes; malformed protobuf bytes on the Stage API are
INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from google.protobuf.message import DecodeError

from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from tests.gateway.harness import GatewayThread
from tests.helpers.raw_grpc import GARBAGE, raw_call
from tests.helpers.stage_client import demo_replica, generate, stage_info, tokens_of, wire

PROMPT = [3, 200, 201, 202, 50, 60]
STAGE = "/stagemesh.v1.Stage/"


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with demo_replica(tmp_path_factory.mktemp("fuzz-replica")) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def gw(replica: list[str]) -> Iterator[GatewayThread]:
    with GatewayThread([replica], startup_timeout_s=60, rpc_timeout_s=10) as gateway:
        yield gateway


def greedy(head: str, n: int = 8, request_id: str = "greedy") -> list[int]:
    return tokens_of(generate(head, PROMPT, request_id, temperature=0.0, max_tokens=n, ignore_eos=True))


def assert_serving(gw: GatewayThread) -> None:
    health = httpx.get(f"{gw.url}/health", timeout=10)
    assert health.status_code == 200 and [r["healthy"] for r in health.json()["replicas"]] == [True]
    done = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert done.status_code == 200, done.text


def test_the_stage_refuses_sampling_values_no_sampler_can_use(replica: list[str], gw: GatewayThread) -> None:
    head = replica[0]
    reference = greedy(head, 24)
    vocab = stage_info(head).vocab_size
    bad = [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf"), min_tokens=1), "temperature"),
        (dict(temperature=1e-45), "temperature"),  # a float32 denormal
        (dict(temperature=0.005), "temperature"),
        (dict(temperature=1.0, min_tokens=1, stop_token_ids=list(range(vocab))), "whole vocabulary"),
        (dict(stop_token_ids=[-5]), "outside the vocabulary"),
        (dict(stop_token_ids=[vocab]), "outside the vocabulary"),
    ]
    with ThreadPoolExecutor(1) as pool:  # a request in flight meanwhile is untouched
        running = pool.submit(generate, head, PROMPT, "running", temperature=0.0, max_tokens=24, ignore_eos=True)
        for i, (sampling, message) in enumerate(bad):
            with pytest.raises(grpc.RpcError) as err:
                generate(head, PROMPT, f"bad-{i}", max_tokens=4, **sampling)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sampling
            assert message in err.value.details(), err.value.details()
        assert tokens_of(running.result()) == reference
    assert_serving(gw)


def test_the_gateway_refuses_them_and_passes_the_bounds(gw: GatewayThread) -> None:
    with httpx.Client(base_url=gw.url, timeout=60) as client:
        for temperature in (1e-45, 3.5e38):
            r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": temperature})
            assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
        for temperature in (0.01, 100.0):  # float32 on the way to the stage: 0.01 arrives as 0.0099999998
            r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": temperature,
                                                     "seed": 1})
            assert r.status_code == 200, r.text
    assert_serving(gw)


def _refused_wire(address: str, pipeline: list[str], index: int) -> str:
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
        stage_pb2_grpc.StageStub(ch).Wire(stage_pb2.WireRequest(pipeline=pipeline, index=index), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details()


def test_a_wire_naming_a_stage_twice_changes_nothing(replica: list[str], gw: GatewayThread) -> None:
    head, last = replica
    before = greedy(head)
    assert "more than once" in _refused_wire(head, [head, head], 0)
    assert "more than once" in _refused_wire(last, [last, last], 1)
    assert "more than once" in _refused_wire(last, [head, last, last], 2)
    assert greedy(head) == before  # the data links are as they were: no re-wire needed
    assert_serving(gw)
    wire(replica)  # and a correct Wire still works
    assert greedy(head) == before
    assert stage_info(head).wired and stage_info(last).wired


@pytest.mark.parametrize(
    ("method", "request_message", "streaming"),
    [("GetInfo", stage_pb2.GetInfoRequest, ""), ("Wire", stage_pb2.WireRequest, ""),
     ("Generate", stage_pb2.GenerateRequest, "response"), ("Abort", stage_pb2.AbortRequest, ""),
     ("PushFrames", stage_pb2.Frame, "request"), ("PushKvBlocks", stage_pb2.KvBlocksChunk, "request")],
)
def test_malformed_bytes_on_the_stage_api_are_invalid_argument(
    replica: list[str], gw: GatewayThread, method: str, request_message: type, streaming: str
) -> None:
    before = greedy(replica[0], 4)
    for payload in GARBAGE:
        with pytest.raises(DecodeError):
            request_message.FromString(payload)
        for address in replica:
            err = raw_call(address, STAGE + method, payload, request_streaming=streaming == "request",
                           response_streaming=streaming == "response")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, address, err.code(), err.details())
            assert "malformed request message" in err.details()
    assert greedy(replica[0], 4) == before
    assert_serving(gw)
