"""Start a whole mesh on this machine as processes: DP replicas x PP stages (each stage
with its TP ranks) and a gateway. Used by ``stagemesh up`` and by the tests.

Every process starts in its own session, so stopping one kills its TP workers with it
(by process group); ``stop`` ends everything this launcher started and nothing else. A stage
restarted (`restart_stage`) comes back on the port it had, appending to its log; keeping a
mesh running that way is `stagemesh.supervisor`'s job.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagekit.errors import ConfigError
from stagekit.ports import free_port
from stagekit.rpc.channels import stage_channel_sync
from stagekit.rpc.mesh_credentials import MeshCredentials


def split_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Even contiguous split; earlier stages take the remainder one layer each."""
    if not 1 <= pp <= num_layers:
        raise ConfigError(f"--pp {pp} must be between 1 and the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for i in range(pp):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass
class MeshSpec:
    model: str
    layer_splits: list[tuple[int, int]]
    tp: int = 1
    dp: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    threads: int = 0
    kv_cache_memory: str = "1GiB"
    gateway: bool = True
    extra_gateway_args: list[str] = field(default_factory=list)
    transport: str | None = None  # data plane between stages (None: the stage's default)
    extra_stage_args: list[str] = field(default_factory=list)
    # environment of the gateway process only (API keys: never on a command line `ps` shows)
    gateway_env: dict[str, str] = field(default_factory=dict, repr=False)
    stage_metrics: bool = False  # every stage serves Prometheus metrics on a free port
    # the dp replicas form one data-parallel-attention group (MoE models), meeting at a free port
    dp_attention: bool = False
    collective_timeout: float = 30.0
    # PEM files: the gateway serves REST and gRPC over TLS with tls_cert/tls_key; with stage_tls_cert/key every
    # stage serves and dials with that pair (and the gateway dials with it), requiring it be signed by
    # stage_tls_ca when given (mutual TLS); mesh_token_file: stages require the token, the gateway sends it
    tls_cert: str | None = None
    tls_key: str | None = None
    stage_tls_ca: str | None = None
    stage_tls_cert: str | None = None
    stage_tls_key: str | None = None
    mesh_token_file: str | None = None
    # prefill/decode disaggregation: each of the dp replicas' role ("prefill", "decode", "both"); empty: all both
    roles: list[str] = field(default_factory=list)

    def stage_security_args(self, prefix: str) -> list[str]:
        """The stage-facing TLS and token options, as a stage (``prefix`` "") or the gateway ("stage-") takes them."""
        pairs = [("ca", self.stage_tls_ca), ("cert", self.stage_tls_cert), ("key", self.stage_tls_key)]
        args = [a for name, path in pairs if path for a in (f"--{prefix}tls-{name}", path)]
        return args + (["--mesh-token-file", self.mesh_token_file] if self.mesh_token_file else [])


class Mesh:
    """Invariant: ``procs`` holds every process started and not yet reaped; ``replicas`` holds
    every stage's address once `start` found it, and a stage started again keeps that address."""

    def __init__(self, spec: MeshSpec, log_dir: str | Path) -> None:
        self.spec = spec
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.replicas: list[list[str]] = []
        self.url = f"{'https' if spec.tls_cert else 'http'}://{spec.host}:{spec.port}"
        self.stage_metrics_urls: dict[tuple[int, int], str] = {}
        self.dp_group = f"{spec.host}:{free_port()}" if spec.dp_attention else ""
        self._spawned: set[str] = set()

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        # a process started again appends: the log keeps why its last run ended
        mode = "ab" if name in self._spawned else "wb"
        self._spawned.add(name)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        with open(self.log_dir / f"{name}.log", mode) as log:
            p = subprocess.Popen([sys.executable, "-m", "stagemesh.cli.main", *args], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append((name, p))
        return p

    def ready_file(self, replica: int, index: int) -> Path:
        """Where stage ``index`` of ``replica`` writes its ``host:port`` once it serves."""
        return self.log_dir / f"stage-r{replica}-s{index}.address"

    def stage_ready(self, replica: int, index: int) -> bool:
        ready = self.ready_file(replica, index)
        return ready.is_file() and ready.read_text().endswith("\n")  # written whole

    def restart_stage(self, replica: int, index: int) -> subprocess.Popen:
        """Start a stage of the started mesh again on its port (the gateway's --replica lists name
        it); `stage_ready` says when it serves."""
        port = int(self.replicas[replica][index].rsplit(":", 1)[1])
        self.ready_file(replica, index).unlink(missing_ok=True)
        return self.start_stage(replica, index, port, ready_file=self.ready_file(replica, index))

    def reap(self, name: str, proc: subprocess.Popen) -> None:
        """Forget an exited process, killing what is left of its process group (TP workers)."""
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=5)
        self.procs.remove((name, proc))

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def start_stage(self, replica: int, index: int, port: int, ready_file: Path | None = None) -> subprocess.Popen:
        """Start stage ``index`` of ``replica`` on ``port`` (0: one the stage binds itself and
        writes to ``ready_file``)."""
        s = self.spec
        a, b = s.layer_splits[index]
        return self._spawn(f"stage-r{replica}-s{index}", [
            "stage", "--model", s.model, "--layers", f"{a}:{b}", "--tp", str(s.tp), "--host", s.host,
            "--port", str(port), "--dtype", s.dtype, "--threads", str(s.threads),
            *(["--ready-file", str(ready_file)] if ready_file is not None else []),
            "--kv-cache-memory", s.kv_cache_memory, "--no-progress", *s.extra_stage_args,
            *(["--transport", s.transport] if s.transport else []),
            *self._metrics_args(replica, index), *self.dp_args(replica), *s.stage_security_args(""),
        ])

    def dp_args(self, replica: int) -> list[str]:
        """A stage's place in the mesh's DP-attention group (none without one)."""
        if not self.dp_group:
            return []
        return ["--dp-size", str(self.spec.dp), "--dp-rank", str(replica), "--dp-group", self.dp_group,
                "--collective-timeout", str(self.spec.collective_timeout)]

    def _metrics_args(self, replica: int, index: int) -> list[str]:
        if not self.spec.stage_metrics:
            return []
        url = self.stage_metrics_urls.get((replica, index))  # a restarted stage keeps its metrics port
        port = int(url.rsplit(":", 1)[1].split("/")[0]) if url else free_port()
        self.stage_metrics_urls[(replica, index)] = f"http://{self.spec.host}:{port}/metrics"
        return ["--metrics-port", str(port)]

    def start(self, timeout_s: float = 180.0) -> None:
        s = self.spec
        deadline = time.monotonic() + timeout_s
        # stages bind port 0 and write what they bound: a port picked here and bound later by the
        # stage could be taken meanwhile (by another stage's TP rendezvous or gloo connections)
        files = [[self.ready_file(r, i) for i in range(len(s.layer_splits))] for r in range(s.dp)]
        for r, row in enumerate(files):
            for i, ready in enumerate(row):
                ready.unlink(missing_ok=True)
                self.start_stage(r, i, 0, ready_file=ready)
        self.replicas = [[self.wait_address(ready, deadline) for ready in row] for row in files]
        for addr in [a for rep in self.replicas for a in rep]:
            self.wait_stage(addr, deadline)
        if s.gateway:
            args = ["gateway", "--host", s.host, "--port", str(s.port), *s.extra_gateway_args,
                    *s.stage_security_args("stage-")]
            if s.tls_cert and s.tls_key:
                args += ["--tls-cert", s.tls_cert, "--tls-key", s.tls_key]
            flags = {"prefill": "--prefill-replica", "decode": "--decode-replica"}
            for r, rep in enumerate(self.replicas):
                role = s.roles[r] if s.roles else "both"
                args += [flags.get(role, "--replica"), ",".join(rep)]
            self._spawn("gateway", args, s.gateway_env)
            self.wait_http(f"{self.url}/health", deadline)

    def _check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{self.log_tail(name)}")

    def wait_address(self, ready_file: Path, deadline: float) -> str:
        """The ``host:port`` a stage started on port 0 wrote once it served."""
        while True:
            self._check_alive()
            text = ready_file.read_text() if ready_file.is_file() else ""
            if text.endswith("\n"):   # written whole
                return text.strip()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no address in {ready_file} in time")
            time.sleep(0.1)

    def wait_stage(self, addr: str, deadline: float) -> None:
        s = self.spec
        creds = MeshCredentials.from_files(ca=s.stage_tls_ca, cert=s.stage_tls_cert, key=s.stage_tls_key)
        while True:
            self._check_alive()
            try:
                with stage_channel_sync(addr, creds) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage {addr} not healthy in time")
            time.sleep(0.2)

    def wait_http(self, url: str, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2, context=_PROBE_TLS) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy in time")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=5)
            _signal_group(p, signal.SIGKILL)  # stragglers of the group (TP workers)
        self.procs.clear()


# readiness of a gateway this launcher started itself: whether its certificate is trusted is
# the clients' business, not this probe's
_PROBE_TLS = ssl.create_default_context()
_PROBE_TLS.check_hostname = False
_PROBE_TLS.verify_mode = ssl.CERT_NONE


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_mesh(spec: MeshSpec, log_prefix: str, timeout_s: float = 600.0) -> Mesh:
    """A started mesh logging into a fresh temp dir named ``log_prefix...``; stopped again
    (no process left behind) if it does not come up."""
    import tempfile

    mesh = Mesh(spec, tempfile.mkdtemp(prefix=log_prefix))
    try:
        mesh.start(timeout_s=timeout_s)
    except BaseException:
        mesh.stop()
        raise
    return mesh
