"""Expert load is visible through the real interfaces: after requests through the gateway,
each stage of a PP2 Qwen2-MoE demo mesh exports tokens per expert per MoE layer
(``stagemesh_moe_expert_tokens_total``) and each layer's imbalance gauge on its metrics
endpoint, GetInfo over gRPC reports the same counts, and the gateway's /health summarises
every layer of the replica (both stages)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import wait_for
from tests.helpers.stage_client import stage_info


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = Path(tmp_path_factory.mktemp("moe-load"))
    model = write_demo_model(root / "demo", arch="qwen2_moe")  # 4 layers, 8 experts top-2
    spec = MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], threads=1, port=free_port(), gateway=True,
                    stage_metrics=True, extra_gateway_args=["--health-interval", "0.3"])
    m = Mesh(spec, root / "logs")
    try:
        m.start(timeout_s=180)
        yield m
    finally:
        m.stop()


def _scrape(url: str) -> tuple[dict[int, dict[int, float]], dict[int, float], float]:
    """(layer -> expert -> tokens, layer -> imbalance, tokens through the stage's layers)."""
    tokens: dict[int, dict[int, float]] = defaultdict(dict)
    imbalance, through = {}, 0.0
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            if s.name == "stagemesh_moe_expert_tokens_total":
                tokens[int(s.labels["layer"])][int(s.labels["expert"])] = s.value
            elif s.name == "stagemesh_moe_expert_imbalance":
                imbalance[int(s.labels["layer"])] = s.value
            elif s.name == "stagemesh_stage_tokens_total":
                through = s.value
    return dict(tokens), imbalance, through


def test_expert_load_in_metrics_getinfo_and_health(mesh: Mesh) -> None:
    cfg = load_model_config(mesh.spec.model)
    for prompt in ("The experts", "Load balancing across many experts is"):
        r = httpx.post(f"{mesh.url}/v1/completions", timeout=60, json={
            "model": "demo", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
    layers_total = {}
    for (_, index), url in sorted(mesh.stage_metrics_urls.items()):
        tokens, imbalance, through = _scrape(url)
        start, end = [(0, 2), (2, 4)][index]
        assert sorted(tokens) == list(range(start, end)) and sorted(imbalance) == sorted(tokens)
        for layer, per_expert in tokens.items():
            counts = [per_expert[e] for e in range(cfg.num_experts)]
            # every token this stage ran went to top-k experts of every MoE layer
            assert sum(counts) == through * cfg.num_experts_per_tok > 0
            assert imbalance[layer] == pytest.approx(max(counts) / (sum(counts) / len(counts)))
            layers_total[layer] = sum(counts)
        info = stage_info(mesh.replicas[0][index])
        assert info.moe_parallel == "tp"
        assert {e.layer: list(e.tokens) for e in info.expert_load} == {
            layer: [int(per_expert[e]) for e in range(cfg.num_experts)] for layer, per_expert in tokens.items()}

    def summary() -> dict | None:
        return httpx.get(f"{mesh.url}/health", timeout=10).json()["replicas"][0]["moe"]

    wait_for(lambda: summary() is not None and summary()["layers"].get("3", {}).get("tokens") == layers_total[3],
             timeout_s=20, interval_s=0.1)
    moe = summary()
    assert moe["moe_parallel"] == "tp"
    assert {int(k): v["tokens"] for k, v in moe["layers"].items()} == layers_total
    assert moe["max_imbalance"] == pytest.approx(max(v["imbalance"] for v in moe["layers"].values()))
    assert moe["max_imbalance"] >= 1.0
