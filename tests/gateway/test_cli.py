from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from gateway import cli, server
from gateway.auth import API_KEYS_ENV


def test_parse_replicas() -> None:
    assert cli.parse_replicas(["a:1, b:2", "c:3"]) == [["a:1", "b:2"], ["c:3"]]
    with pytest.raises(ValueError, match="names no stage address"):
        cli.parse_replicas([" , "])


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments() -> None:
    args = _parse("--replica", "h:1,h:2", "--replica", "h:3", "--port", "9000", "--api-key", "k")
    assert args.replica == ["h:1,h:2", "h:3"]
    assert (args.host, args.port, args.api_key, args.model_name) == ("127.0.0.1", 9000, ["k"], None)
    assert args.routing is None  # not chosen: round_robin, or least_loaded for a DP group (decided at start)
    with pytest.raises(ValueError, match="no replica"):
        cli.config_from_args(_parse())  # a replica is required (--replica, or prefill and decode ones)
    with pytest.raises(SystemExit):
        _parse("--replica", "h:1", "--routing", "random")


def test_config_from_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk2\n\nk3\n")
    monkeypatch.setenv(API_KEYS_ENV, "k4, k1")
    args = _parse(
        "--replica", "h:1", "--replica", "h:2", "--routing", "prefix", "--grpc-port", "0",
        "--api-key", "k1", "--api-key-file", str(keys), "--max-prompt-tokens", "100", "--max-tokens", "50",
        "--max-running-per-replica", "4", "--max-waiting-per-replica", "2", "--max-waiting", "3", "--no-migration",
        "--max-prompt-chars", "5000",
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert config.replicas == (("h:1",), ("h:2",))
    assert config.api_keys == ("k1", "k2", "k3", "k4")
    assert (config.routing, config.grpc_port, config.migrate) == ("prefix", 0, False)
    assert (config.limits.max_prompt_tokens, config.limits.max_tokens) == (100, 50)
    assert config.limits.max_prompt_chars == 5000
    assert cli.config_from_args(_parse("--replica", "h:1", "--max-prompt-tokens", "10")).limits.prompt_chars(99) == 320
    assert (config.admission.max_running_per_replica, config.admission.max_waiting_per_replica) == (4, 2)
    assert config.admission.max_waiting_total == 3
    assert "k1" not in repr(config)  # keys never reach a log line through the config


def test_main_fails_cleanly_without_stages() -> None:
    start = time.monotonic()
    code = server.main(["--replica", "127.0.0.1:9", "--port", "0", "--startup-timeout", "0.3", "--log-level", "error"])
    assert code == 1
    assert time.monotonic() - start < 5
