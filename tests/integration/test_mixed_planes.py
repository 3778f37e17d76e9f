"""A replica whose stages run different data planes (one ``--transport grpc``, one
``--transport ucx``) is refused at wiring, with both stages and both planes named, instead
of failing every frame later; a frame pushed over gRPC to the UCX stage gets a clear error;
and a gateway over such a replica reports why in /health (it does not retry it as a stage
that is still coming up) while it serves from its other replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.transport.grpc.control import HELLO, control_frame
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.gateway.harness import GatewayThread
from tests.helpers.stage_client import wire
from tests.transport.conftest import needs_ucx

pytestmark = needs_ucx


@dataclass
class Stages:
    good: list[str]    # a one-stage replica on gRPC
    mixed: list[str]   # stage 0 on gRPC, stage 1 on UCX


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stages]:
    root = Path(tmp_path_factory.mktemp("mixed-planes"))
    model = str(write_demo_model(root / "demo"))
    num_layers = load_model_config(model).num_layers
    good = Mesh(MeshSpec(model=model, layer_splits=[(0, num_layers)], threads=1, gateway=False, transport="grpc"),
                root / "good")
    mixed = Mesh(MeshSpec(model=model, layer_splits=split_layers(num_layers, 2), threads=1, gateway=False),
                 root / "mixed")
    try:
        good.start(timeout_s=120)
        addrs = []
        for index, plane in enumerate(("grpc", "ucx")):
            mixed.spec.transport = plane   # the launcher starts a mesh on one plane: set it per stage
            port = free_port()
            mixed.start_stage(0, index, port)
            addrs.append(f"127.0.0.1:{port}")
        for addr in addrs:
            mixed.wait_stage(addr, time.monotonic() + 120)
        yield Stages(good.replicas[0], addrs)
    finally:
        good.stop()
        mixed.stop()


def _assert_names_both(details: str, stages: Stages) -> None:
    for needle in (*stages.mixed, "'grpc'", "'ucx'"):
        assert needle in details, details


def test_wiring_refuses_a_replica_that_mixes_data_planes(stages: Stages) -> None:
    with pytest.raises(grpc.RpcError) as err:
        wire(stages.mixed)   # last stage first, as the gateway does
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_names_both(err.value.details(), stages)
    with grpc.insecure_channel(stages.mixed[0]) as ch, pytest.raises(grpc.RpcError) as err:   # the head alone
        stage_pb2_grpc.StageStub(ch).Wire(stage_pb2.WireRequest(pipeline=stages.mixed, index=0), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_names_both(err.value.details(), stages)


def test_a_frame_pushed_over_grpc_to_a_ucx_stage_gets_a_clear_error(stages: Stages) -> None:
    with grpc.insecure_channel(stages.mixed[1]) as ch, pytest.raises(grpc.RpcError) as err:
        stage_pb2_grpc.StageStub(ch).PushFrames(iter([control_frame(HELLO)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'ucx' data plane" in err.value.details() and "PushFrames" in err.value.details()


def test_the_gateway_reports_why_in_health(stages: Stages) -> None:
    started = time.monotonic()
    with GatewayThread([stages.good, stages.mixed], startup_timeout_s=60, rpc_timeout_s=10) as gw:
        assert time.monotonic() - started < 30   # refused, not waited for until the startup timeout
        body = httpx.get(f"{gw.url}/health", timeout=10).json()
    assert body["status"] == "ok"
    good, mixed = body["replicas"]
    assert good["healthy"] and good["last_error"] is None
    assert not mixed["healthy"]
    _assert_names_both(mixed["last_error"], stages)
