from __future__ import annotations

import argparse
import time

import pytest

from gateway import cli, server


def test_parse_replicas() -> None:
    assert cli.parse_replicas(["a:1, b:2", "c:3"]) == [["a:1", "b:2"], ["c:3"]]
    with pytest.raises(ValueError, match="names no stage address"):
        cli.parse_replicas([" , "])


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--replica", "h:1,h:2", "--replica", "h:3", "--port", "9000", "--api-key", "k"])
    assert args.replica == ["h:1,h:2", "h:3"]
    assert (args.host, args.port, args.api_key, args.model_name) == ("127.0.0.1", 9000, "k", None)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --replica is required


def test_main_fails_cleanly_without_stages() -> None:
    start = time.monotonic()
    code = server.main(["--replica", "127.0.0.1:9", "--port", "0", "--startup-timeout", "0.3", "--log-level", "error"])
    assert code == 1
    assert time.monotonic() - start < 5
