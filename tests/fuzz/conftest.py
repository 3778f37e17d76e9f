"""The fuzzers' targets: a live two-stage replica of the demo model (stage processes, the real
Stage API) and a gateway over it on loopback (REST with an API key, and the gRPC Generation API).
``STAGEMESH_FUZZ_EXAMPLES`` sets how many examples each fuzzer tries per operation or field (a
short run by default; README, "Fuzzing", for the long one)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import httpx
import pytest

from gateway.config import RequestLimits
from stagekit.client import GenerationClient
from stagekit.demo import write_demo_model
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import GatewayThread
from tests.helpers.stage_client import wire

API_KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("STAGEMESH_FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="session")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two stages (layers 0:2 | 2:4), wired; the gRPC data plane, so that PushFrames is the live path."""
    root = tmp_path_factory.mktemp("fuzz-target")
    model = write_demo_model(root / "demo")
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], threads=1, gateway=False,
                         transport="grpc"), root / "logs")
    try:
        mesh.start(timeout_s=180)
        wire(mesh.replicas[0])
        yield mesh.replicas[0]
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
def gateway(replica: list[str]) -> Iterator[GatewayThread]:
    # short answers keep each generated request cheap; the limits themselves are fuzzed too
    limits = RequestLimits(max_tokens=32, max_prompt_tokens=512)
    with GatewayThread([replica], api_key=API_KEY, grpc_port=0, startup_timeout_s=120, rpc_timeout_s=10,
                       limits=limits) as gw:
        yield gw


# answers a fuzzed call may get: a refusal naming what is wrong, or success. UNKNOWN and INTERNAL
# (an unhandled exception) and DEADLINE_EXCEEDED (a hang) never; UNAVAILABLE only where it is right
# (the Stage API's calls that dial an address they were given)
REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED})


def assert_gateway_serves(gw: GatewayThread) -> None:
    """Healthy, and a good request over each API still gets its tokens."""
    assert httpx.get(f"{gw.url}/health", timeout=30).status_code == 200
    done = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3, done.text
    with GenerationClient(gw.grpc_target, api_key=API_KEY, timeout_s=60) as client:
        assert client.complete("Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3
