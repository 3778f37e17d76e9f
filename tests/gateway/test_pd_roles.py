"""Replica roles and the gateway's prefill/decode flow over fake stages: misconfiguration is
refused (at start, when a replica joins, on the command line) with a message, and a hand-off
whose KV transfer fails falls back to the decode replica prefilling, counted, with unchanged
output. The real hand-off (KV moving between stages) is tests/integration/test_pd_disaggregation.py."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from gateway import cli, server
from gateway.domain import StageInfo
from gateway.roles import PdSettings, check_roles, layout_mismatch
from stagekit.ports import free_port
from tests.gateway.fake_stage import SCRIPT, FakeStage, StageHost
from tests.gateway.harness import GatewayThread, wait_for


def test_role_sets_that_cannot_serve_are_refused() -> None:
    check_roles(("prefill", "decode"))
    check_roles(("prefill", "both"))
    check_roles(())
    with pytest.raises(ValueError, match="need at least one prefill replica"):
        check_roles(("decode", "both"))
    with pytest.raises(ValueError, match="need a replica that decodes"):
        check_roles(("prefill",))
    with pytest.raises(ValueError, match="unknown replica role"):
        check_roles(("prefill", "decoder"))
    with pytest.raises(ValueError, match="pd-lease"):
        PdSettings(lease_s=0)


def _infos(*ranges: tuple[int, int]) -> list[StageInfo]:
    return [StageInfo("m", start_layer=a, end_layer=b) for a, b in ranges]


def test_layout_mismatch_says_which_stage_differs() -> None:
    assert layout_mismatch(_infos((0, 2), (2, 4)), _infos((0, 2), (2, 4))) is None
    why = layout_mismatch(_infos((0, 2), (2, 4)), _infos((0, 3), (3, 4)))
    assert why is not None and "stage 0 holds layers 0:2 on the prefill replica and 0:3" in why
    why = layout_mismatch(_infos((0, 2), (2, 4)), _infos((0, 4)))
    assert why is not None and "2 stage(s) [0:2, 2:4], the decode replica 1 [0:4]" in why


def _parse(*argv: str) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.config_from_args(parser.parse_args(list(argv)))


def test_roles_on_the_command_line() -> None:
    config = _parse("--replica", "h:1", "--prefill-replica", "h:2,h:3", "--decode-replica", "h:4,h:5",
                    "--pd-min-prefill-tokens", "8", "--pd-lease", "7")
    assert config.replicas == (("h:1",), ("h:2", "h:3"), ("h:4", "h:5"))
    assert config.roles == ("both", "prefill", "decode") and config.disaggregated
    assert (config.pd.min_prefill_tokens, config.pd.lease_s) == (8, 7.0)
    assert _parse("--replica", "h:1").roles == ()
    # refused before anything starts, with exit code 2 and the reason
    assert server.main(["--decode-replica", "h:4", "--log-level", "error"]) == 2


def _replica(host: StageHost, *ranges: tuple[int, int]) -> list[str]:
    return [host.start(FakeStage(layers=r)) for r in ranges]


def test_mismatched_layer_ranges_are_refused_at_start(stage_host: StageHost, caplog: pytest.LogCaptureFixture) -> None:
    prefill = _replica(stage_host, (0, 1), (1, 2))
    decode = _replica(stage_host, (0, 2))
    gw = GatewayThread([prefill, decode], roles=("prefill", "decode"), startup_timeout_s=5)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(RuntimeError, match="exited during startup"):
            gw.start()
        gw.stop()
    # uvicorn prints the StartupError ("prefill/decode disaggregation refused: ...") on its way out
    assert "replica 1 (decode) cannot exchange KV with replica 0: the prefill replica has 2 stage(s)" in caplog.text


def test_a_decode_replica_joining_with_other_layers_is_refused(stage_host: StageHost) -> None:
    prefill, good = _replica(stage_host, (0, 1), (1, 2)), _replica(stage_host, (0, 1), (1, 2))
    late = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]   # not up when the gateway starts
    with GatewayThread([prefill, good, late], roles=("prefill", "decode", "decode"), startup_timeout_s=5) as gw:
        for address, layers in zip(late, [(0, 3), (3, 4)], strict=True):
            stage_host.start(FakeStage(layers=layers), port=int(address.rsplit(":", 1)[1]))

        def refused() -> dict:
            return httpx.get(f"{gw.url}/health", timeout=10).json()["replicas"][2]

        wait_for(lambda: refused()["state"] == "refused", 10, 0.1)
        health = httpx.get(f"{gw.url}/health", timeout=10).json()
        entry = health["replicas"][2]
        assert (entry["role"], entry["healthy"]) == ("decode", False)
        assert "stage 0 holds layers 0:1 on the prefill replica and 0:3" in entry["last_error"]
        assert [r["role"] for r in health["replicas"][:2]] == ["prefill", "decode"]
        assert health["disaggregation"]["lease_s"] == PdSettings().lease_s


def test_a_failed_transfer_falls_back_to_the_decode_replica_prefilling(
    stage_host: StageHost, caplog: pytest.LogCaptureFixture
) -> None:
    """The fake stages have no ExportKv: every transfer fails, and the decode replica continues
    from the prompt + the prefill replica's first token at output position 1, so the text is the
    colocated one; the fallback is counted by reason and logged."""
    prefill, decode = stage_host.start_replica(1), stage_host.start_replica(1)
    body = {"prompt": SCRIPT + " " + SCRIPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    with GatewayThread([decode]) as colocated:
        expected = httpx.post(f"{colocated.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    p_stage, d_stage = stage_host.stages[prefill[0]], stage_host.stages[decode[0]]
    with GatewayThread([prefill, decode], roles=("prefill", "decode"),
                       pd=PdSettings(min_prefill_tokens=0, lease_s=2)) as gw:
        d_stage.generate_calls.clear()
        reply = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
        first, rest = p_stage.generate_calls[-1], d_stage.generate_calls[-1]
        assert (first.sampling.max_tokens, first.kv_hold_ms) == (1, 2000)
        assert list(rest.prompt_token_ids)[:-1] == list(first.prompt_token_ids)
        assert (rest.sampling.seed_offset, rest.sampling.max_tokens, rest.sampling.seed) == (1, 5, 11)
        metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
        assert re.search(r'stagemesh_pd_fallbacks_total\{reason="transfer_failed"\} 1\.0', metrics)
        assert re.search(r'stagemesh_pd_handoffs_total\{outcome="fallback"\} 1\.0', metrics)
        wait_for(lambda: "hand-off fell back (transfer_failed" in caplog.text)


def test_the_compose_profile_names_a_prefill_and_a_decode_replica() -> None:
    """docker-compose.pd.yml's gateway command (its ${VAR:-default}s at their defaults) is a
    valid disaggregated gateway configuration: replica 0 prefills, replica 1 decodes."""
    yaml = pytest.importorskip("yaml")
    root = Path(__file__).resolve().parents[2]
    command = yaml.safe_load((root / "docker-compose.pd.yml").read_text())["services"]["gateway"]["command"]
    argv = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", command).split()
    assert argv[0] == "gateway"
    config = _parse(*argv[1:])
    assert config.roles == ("prefill", "decode")
    assert config.replicas == (("stage-r0-s0:50051", "stage-r0-s1:50051"), ("stage-r1-s0:50051", "stage-r1-s1:50051"))
