from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from gateway import cli, server
from gateway.auth import ADMIN_API_KEYS_ENV, API_KEYS_ENV


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
        cli.config_from_args(_parse())  # a replica is required (--replica, prefill and decode ones, or a file)
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


def test_admin_and_replica_file_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    keys, replicas = tmp_path / "admin.keys", tmp_path / "replicas"
    keys.write_text("# ops\nadm2\n")
    replicas.write_text("h:3,h:4  # from the file\n")
    config = cli.config_from_args(_parse("--replica", "h:1", "--replica-file", str(replicas), "--admin-api-key",
                                         "adm1", "--admin-api-key-file", str(keys), "--stall-timeout", "12"))
    assert (config.replicas, config.file_replicas) == ((("h:1",),), (("h:3", "h:4"),))
    assert (config.admin_api_keys, config.api_keys, config.stall_timeout_s) == (("adm1", "adm2"), (), 12.0)
    assert "adm1" not in repr(config)
    config = cli.config_from_args(_parse("--replica-file", str(replicas)))  # the file alone is enough
    assert config.replicas == () and config.admin_api_keys == ()
    monkeypatch.setenv(ADMIN_API_KEYS_ENV, "adm3, adm4")
    assert cli.config_from_args(_parse("--replica-file", str(replicas))).admin_api_keys == ("adm3", "adm4")
    with pytest.raises(ValueError, match="stage h:3 is named in two replicas"):
        cli.config_from_args(_parse("--replica", "h:3", "--replica-file", str(replicas)))
    replicas.write_text("h:3\nh:x\n")
    args = _parse("--replica-file", str(replicas))
    assert cli.run(args) == 2  # a malformed file at start: a usage error, logged with its line


def test_up_hands_admin_keys_to_the_gateway_through_its_environment() -> None:
    from stagemesh.cli import up_cmd

    parser = argparse.ArgumentParser()
    up_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["up", "--admin-api-key", "a1", "--admin-api-key", "a2", "--admin-api-key-file", "f",
                              "--no-grpc"])
    gw_args, env, _ = up_cmd._gateway_options(args)
    assert env == {ADMIN_API_KEYS_ENV: "a1,a2"} and "a1" not in " ".join(gw_args)
    assert gw_args[-2:] == ["--admin-api-key-file", "f"]
