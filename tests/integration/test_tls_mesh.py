"""A TP1 PP2 mesh secured end to end: the gateway serves REST and the gRPC Generation API over
TLS, gateway and stages (and the two stages between them: Wire, the gRPC data plane) talk mutual
TLS under one CA, and the stages require the mesh token. A completion works through all of it;
plaintext, a certificate from another CA, and a missing or wrong token are refused."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagekit.client import GenerationClient
from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagekit.rpc.channels import stage_channel_sync
from stagekit.rpc.mesh_credentials import MeshCredentials
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.certs import Pki, make_pki, needs_openssl

pytestmark = needs_openssl


@dataclass
class Secured:
    mesh: Mesh
    grpc_target: str
    pki: Pki
    rogue: Pki   # another CA and a certificate it signed
    token: str


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = Path(tmp_path_factory.mktemp("tls-mesh"))
    pki, rogue = make_pki(root / "pki", "mesh"), make_pki(root / "pki", "rogue")
    token_file = root / "mesh-token"
    token_file.write_text("s3cret-mesh-token\n")
    model = str(write_demo_model(root / "demo"))
    grpc_port = free_port()
    mesh = Mesh(MeshSpec(model=model, layer_splits=split_layers(load_model_config(model).num_layers, 2),
                         port=free_port(), threads=1, transport="grpc",
                         extra_gateway_args=["--grpc-port", str(grpc_port)],
                         tls_cert=pki.cert, tls_key=pki.key, stage_tls_ca=pki.ca, stage_tls_cert=pki.cert,
                         stage_tls_key=pki.key, mesh_token_file=str(token_file)), root / "logs")
    try:
        mesh.start(timeout_s=120)
        yield Secured(mesh, f"127.0.0.1:{grpc_port}", pki, rogue, "s3cret-mesh-token")
    finally:
        mesh.stop()


def _creds(s: Secured, **changes: str) -> MeshCredentials:
    files = {"ca": s.pki.ca, "cert": s.pki.cert, "key": s.pki.key, **changes}
    return MeshCredentials.from_files(**files)


def _get_info(address: str, creds: MeshCredentials, metadata: tuple = ()) -> stage_pb2.GetInfoResponse:
    with stage_channel_sync(address, creds) as ch:
        return stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=5, metadata=metadata)


def test_rest_over_tls(secured: Secured) -> None:
    assert secured.mesh.url.startswith("https://")
    with httpx.Client(base_url=secured.mesh.url, verify=ssl.create_default_context(cafile=secured.pki.ca)) as c:
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    plain = secured.mesh.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):   # plain HTTP to the TLS port gets no HTTP answer
        httpx.get(f"{plain}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):     # nor does a client that does not trust the certificate
        httpx.get(f"{secured.mesh.url}/health", timeout=5)


def test_grpc_generation_over_tls(secured: Secured) -> None:
    with GenerationClient(secured.grpc_target, tls=True, root_certificates=secured.pki.ca) as c:
        result = c.complete("Hello", max_tokens=3, temperature=0)
        assert result.usage.completion_tokens == 3 and result.text


def test_stage_refuses_plaintext_and_foreign_certificates(secured: Secured) -> None:
    stage = secured.mesh.replicas[0][1]
    token = MeshCredentials(token=secured.token).metadata()
    assert _get_info(stage, _creds(secured), token).end_layer > 0   # the mesh's own certificate passes
    with grpc.insecure_channel(stage) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    refused = [MeshCredentials.from_files(ca=secured.pki.ca),   # TLS without a client certificate
               _creds(secured, cert=secured.rogue.cert, key=secured.rogue.key)]   # signed by another CA
    for creds in refused:
        with pytest.raises(grpc.RpcError) as err:
            _get_info(stage, creds, token)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:   # and the gateway's side: a stage certificate from another CA
        _get_info(stage, _creds(secured, ca=secured.rogue.ca), token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mesh_token_required(secured: Secured) -> None:
    head = secured.mesh.replicas[0][0]
    for metadata in ((), MeshCredentials(token="not-the-token").metadata()):
        with pytest.raises(grpc.RpcError) as err:
            _get_info(head, _creds(secured), metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "mesh token" in err.value.details()
    with stage_channel_sync(head, _creds(secured)) as ch:   # health stays open: launchers probe it
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    info = _get_info(head, _creds(secured), MeshCredentials(token=secured.token).metadata())
    assert info.start_layer == 0
