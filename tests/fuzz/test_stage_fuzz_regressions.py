"""Regressions the Stage API fuzzer found (tests/fuzz/test_grpc_stage_fuzz.py), each through the
real interface of a live stage: a Wire naming 100,000 stages blocked the stage's event loop for
minutes (a quadratic duplicate check) where it is refused at once; a KV transfer to an address
that is not ``host:port`` was INTERNAL ("Failed to create channel") where it is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from stagekit.rpc.pb import stage_pb2
from tests.fuzz.calls import status_of
from tests.helpers.stage_client import generate, stage_info, tokens_of

SERVICE = "/stagemesh.v1.Stage/"


def test_a_wire_longer_than_the_model_is_refused_at_once(replica: list[str]) -> None:
    for stage, address in enumerate(replica):
        with grpc.insecure_channel(address) as channel:
            for pipeline in ([""] * 100_000, [f"127.0.0.1:{p}" for p in range(1, 30_001)]):
                code, details = status_of(channel, SERVICE + "Wire", stage_pb2.WireRequest(pipeline=pipeline,
                                          index=stage), timeout_s=20)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
                assert "each stage holds at least one layer" in details
        assert stage_info(address).wired  # left as it was
    assert tokens_of(generate(replica[0], [3, 200, 201], "after-wire", temperature=0.0, max_tokens=4)) != []


@pytest.mark.parametrize("destination", ["", ":::", "localhost:", "127.0.0.1:0", "127.0.0.1:99999", "a b:1"])
def test_kv_transfers_to_a_non_address_are_invalid_argument(replica: list[str], destination: str) -> None:
    with grpc.insecure_channel(replica[1]) as channel:
        code, details = status_of(channel, SERVICE + "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
            destination=destination), timeout_s=20)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a stage address (host:port)" in details, details
    prompt = list(range(100, 140))
    generate(replica[0], prompt, f"cache-{destination}", temperature=0.0, max_tokens=1)  # its KV is cached now
    with grpc.insecure_channel(replica[0]) as channel:
        code, details = status_of(channel, SERVICE + "ExportKv", stage_pb2.ExportKvRequest(
            token_ids=prompt, destination=[destination, replica[1]]), timeout_s=20)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a stage address (host:port)" in details, details
