"""Settings a process is started with that cannot work raise ConfigError, never InvalidRequest
(which is a request's fault, HTTP 400): the layout, the model directory and dtype, the data
plane and its STAGEMESH_UCX_* values, sizes on the command line, the mesh's --pp."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.errors import ConfigError, InvalidRequest
from stagekit.parallel.layout import StageLayout, parse_layers
from stagekit.transport.factory import make_transport
from stagekit.transport.ucx.settings import UcxSettings
from stagemesh.cli.sizes import parse_bytes
from stagemesh.launcher import split_layers


def test_config_error_is_not_a_bad_request() -> None:
    assert not issubclass(ConfigError, InvalidRequest)


@pytest.mark.parametrize("layout, message", [
    (StageLayout(2, 9, 4), "outside the model's 4 layers"),
    (StageLayout(0, 4, 4, tp_size=0), "tp size must be >= 1"),
    (StageLayout(0, 4, 4, tp_size=3), "does not divide the model's 4 attention heads"),
])
def test_layout(layout: StageLayout, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        layout.validate(num_heads=4, num_kv_heads=2)


def test_layer_spec() -> None:
    assert parse_layers("1:", 4) == (1, 4)
    with pytest.raises(ConfigError, match="must look like A:B"):
        parse_layers("1-3", 4)


def test_model_directory_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model_config(tmp_path)
    cfg = load_model_config(write_demo_model(tmp_path / "demo"))
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        cfg.torch_dtype("int8")


@pytest.mark.parametrize("env, message", [
    ({"STAGEMESH_UCX_PROFILE": "carrier-pigeon"}, "unknown UCX profile"),
    ({"STAGEMESH_UCX_PROGRESS": "sometimes"}, "unknown UCX progress mode"),
    ({"STAGEMESH_UCX_SEND_TIMEOUT_S": "0"}, "send_timeout_s must be positive"),
    ({"STAGEMESH_UCX_SPIN_US": "soon"}, "STAGEMESH_UCX_SPIN_US must be a number, got 'soon'"),
])
def test_ucx_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        UcxSettings.from_env()


def test_unknown_transport() -> None:
    with pytest.raises(ConfigError, match="unknown transport 'carrier-pigeon'"):
        make_transport("carrier-pigeon")


def test_command_line_sizes_and_pp() -> None:
    assert parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match="--pp 5 must be between 1 and the model's 4 layers"):
        split_layers(4, 5)
