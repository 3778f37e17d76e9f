"""``stagemesh bench layer`` runs a real decode step both ways on the tiny demo Llama and reports
wall and CPU medians for every batch size asked for."""

from __future__ import annotations

import argparse
import json

import pytest

from stagekit.kernels.fused_layer import native_available
from stagemesh.bench import layer


@pytest.mark.skipif(not native_available(), reason="no C compiler: the kernel is not built")
def test_bench_layer_reports_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.ArgumentParser()
    layer.add_arguments(args)
    ns = args.parse_args(["--size", "tiny", "--batch", "1,3", "--rounds", "2", "--prompt", "5", "--json"])
    assert layer.run(ns) == 0
    result = json.loads(capsys.readouterr().out)["ms_per_step"]
    assert set(result) == {"1", "3"}
    for row in result.values():
        assert set(row) == {"unfused", "fused", "unfused_cpu", "fused_cpu"} and all(v > 0 for v in row.values())
