"""The container health probe (docker/healthcheck.py) against real servers: a gRPC health
service in plaintext, over TLS and over mutual TLS, and an HTTPS endpoint; a probe without the
server's CA, or without a client certificate where one is required, reports unhealthy."""

from __future__ import annotations

import http.server
import importlib.util
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagekit.ports import free_port
from tests.helpers.certs import Pki, make_pki, needs_openssl

_spec = importlib.util.spec_from_file_location("healthcheck", Path(__file__).parents[2] / "docker" / "healthcheck.py")
assert _spec is not None and _spec.loader is not None
healthcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(healthcheck)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "probe")


def _grpc_server(pki: Pki | None, require_client: bool = False, status: int = health_pb2.HealthCheckResponse.SERVING
                 ) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    if pki is None:
        server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(Path(pki.key).read_bytes(), Path(pki.cert).read_bytes())],
                                            root_certificates=Path(pki.ca).read_bytes(),
                                            require_client_auth=require_client)
        server.add_secure_port(address, creds)
    server.start()
    return server, address


def probe(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = healthcheck.main(["stagemesh-healthcheck", *args])
    return code, capsys.readouterr().out.strip()


def test_plaintext_stage(capsys: pytest.CaptureFixture[str]) -> None:
    server, address = _grpc_server(None)
    try:
        assert probe("grpc", address, capsys=capsys) == (0, f"{address}: SERVING")
    finally:
        server.stop(None)
    server, address = _grpc_server(None, status=health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        code, out = probe("grpc", address, capsys=capsys)
        assert code == 1 and "NOT_SERVING" in out
    finally:
        server.stop(None)


@needs_openssl
def test_tls_and_mutual_tls_stage(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    server, address = _grpc_server(pki)
    try:
        assert probe("grpc", address, "--tls-ca", pki.ca, capsys=capsys) == (0, f"{address}: SERVING")
        code, out = probe("grpc", address, capsys=capsys)  # plaintext against a TLS port
        assert code == 1 and out.startswith("unhealthy:")
    finally:
        server.stop(None)
    server, address = _grpc_server(pki, require_client=True)
    try:
        code, out = probe("grpc", address, "--tls-ca", pki.ca, capsys=capsys)  # no client certificate
        assert code == 1 and out.startswith("unhealthy:")
        assert probe("grpc", address, "--tls-ca", pki.ca, "--tls-cert", pki.cert, "--tls-key", pki.key,
                     capsys=capsys) == (0, f"{address}: SERVING")
    finally:
        server.stop(None)


@pytest.fixture
def https_url(pki: Pki) -> Iterator[str]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_openssl
def test_https_gateway(https_url: str, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{https_url}/health"
    assert probe("http", url, "--tls-ca", pki.ca, capsys=capsys) == (0, f"{url}: 200")
    code, out = probe("http", url, capsys=capsys)  # the system's CAs do not know this one
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in out
    code, out = probe("http", f"{https_url}/missing", "--tls-ca", pki.ca, capsys=capsys)
    assert code == 1 and "404" in out


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["stagemesh-healthcheck", "ftp"]) == 2
    assert healthcheck.main(["stagemesh-healthcheck", "grpc", "127.0.0.1:1", "--tls-cert", "x.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
