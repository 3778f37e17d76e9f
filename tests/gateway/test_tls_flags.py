"""The gateway's TLS and mesh-token options: --tls-cert/--tls-key cover REST and gRPC, the
deprecated --grpc-tls-* pair keeps its gRPC-only meaning, and stage credentials are read at start."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from gateway import cli, server
from gateway.config import GatewayConfig
from stagekit.errors import ConfigError


def _config(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.config_from_args(parser.parse_args(["--replica", "h:1", *argv]))


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for name, path in files.items():
        path.write_text(f"-----BEGIN {name}-----\n")
    (tmp_path / "token").write_text(" the-token \n")
    return {name: str(path) for name, path in files.items()} | {"token": str(tmp_path / "token")}


def test_tls_pair_serves_rest_and_grpc(pem: dict[str, str]) -> None:
    config = _config("--tls-cert", pem["cert"], "--tls-key", pem["key"])
    assert (config.tls_cert, config.tls_key, config.rest_tls) == (pem["cert"], pem["key"], True)
    uv = server.build_server(config, "127.0.0.1", 0).config
    assert (uv.ssl_certfile, uv.ssl_keyfile) == (pem["cert"], pem["key"])
    assert server.build_server(_config(), "127.0.0.1", 0).config.ssl_certfile is None


def test_deprecated_grpc_pair_keeps_rest_plain(pem: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stagemesh.gateway"):
        config = _config("--grpc-tls-cert", pem["cert"], "--grpc-tls-key", pem["key"])
    assert "deprecated" in caplog.text
    assert (config.tls_cert, config.rest_tls) == (pem["cert"], False)
    assert server.build_server(config, "127.0.0.1", 0).config.ssl_certfile is None
    with pytest.raises(ConfigError, match="give one pair"):
        _config("--grpc-tls-cert", pem["cert"], "--grpc-tls-key", pem["key"], "--tls-cert", pem["cert"])


def test_bad_tls_options(pem: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both"):
        _config("--tls-cert", pem["cert"])
    with pytest.raises(ConfigError, match="no file"):
        _config("--tls-cert", pem["cert"], "--tls-key", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="--stage-tls-ca"):
        _config("--stage-tls-ca", str(tmp_path / "missing.pem"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        _config("--mesh-token-file", str(tmp_path / "empty"))


def test_stage_credentials(pem: dict[str, str]) -> None:
    assert not _config().stage_credentials.tls
    creds = _config("--stage-tls-ca", pem["ca"], "--stage-tls-cert", pem["cert"], "--stage-tls-key", pem["key"],
                    "--mesh-token-file", pem["token"]).stage_credentials
    assert creds.tls and creds.ca == b"-----BEGIN ca-----\n" and creds.token == "the-token"
    assert "the-token" not in repr(creds) and "BEGIN key" not in repr(creds)
