"""Start a stage: load the shard on every TP rank, then serve gRPC until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.stage.kv_blocks import KvBlocks
from services.stage.kv_port import KvPort
from services.stage.node import StageNode
from services.stage.servicer import StageServicer
from stagekit.engine.dp_member import DpMember
from stagekit.engine.stage_runtime import StageRuntime, start_executor
from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.startup_heap import freeze_startup_heap
from stagekit.parallel.dp_rendezvous import RendezvousCancelled
from stagekit.rpc.decode_guard import MalformedRequestGuard
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.mesh_token import MeshTokenGuard
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.transport.factory import make_transport

log = logging.getLogger("stagemesh.stage")

GRPC_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


async def serve(spec: StageSpec, host: str, port: int, ready_file: str | None = None,
                transport_name: str | None = None, metrics_port: int | None = None,
                creds: MeshCredentials = PLAINTEXT) -> int:
    """Serves until SIGTERM/SIGINT (exit code 0) or until a TP worker dies (WORKER_LOST_EXIT)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
    loop = asyncio.get_running_loop()
    dp = DpMember(spec) if spec.dp_size > 1 else None   # a DP group's host starts its rendezvous here
    executor = await loop.run_in_executor(pool, start_executor, spec, dp)
    runtime = StageRuntime(executor, dp)
    if dp is not None:
        dp.on_failure = lambda: pool.submit(_rejoin, runtime)
        dp.start_watch()
    transport = make_transport(transport_name, creds)
    log.info("data plane: %s", getattr(transport, "description", transport.name))
    if creds.tls and transport.name != "grpc":
        log.warning("the %s data plane is not covered by TLS: frames and KV blocks between stages travel "
                    "unencrypted (use --transport grpc to encrypt them)", transport.name)
    node = StageNode(runtime, transport, pool, creds)
    kv = KvPort(KvBlocks(runtime, pool), transport, node.engine, creds)   # KV export, import and landing

    # the token check comes first: a caller without it learns nothing, not even that its bytes were bad
    guards = ([MeshTokenGuard(creds.token, STAGE_SERVICE)] if creds.token else []) + [MalformedRequestGuard()]
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=guards)
    stage_pb2_grpc.add_StageServicer_to_server(StageServicer(node, kv, transport.name), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [STAGE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    server_creds = creds.server_credentials()
    if server_creds is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", server_creds)
    if bound == 0:
        raise SystemExit(f"could not bind {host}:{port}")
    await server.start()
    node.start()
    for svc in ("", STAGE_SERVICE):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    layout = runtime.layout
    log.info("stage layers %d:%d of %s (tp=%d) serving on %s:%d (%s%s)",
             layout.start_layer, layout.end_layer, runtime.cfg.name, layout.tp_size, host, bound,
             _security(creds), ", mesh token required" if creds.token else "")
    freeze_startup_heap()
    print(f"STAGE READY {host}:{bound}", flush=True)
    stop_metrics = None
    if metrics_port is not None:
        from services.stage.metrics import start_metrics_server

        metrics_bound, stop_metrics = start_metrics_server(node, host, metrics_port)
        print(f"STAGE METRICS {host}:{metrics_bound}", flush=True)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{host}:{bound}\n")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_workers(runtime, stop))
    await stop.wait()
    worker_lost = watch.done() and watch.result()
    watch.cancel()
    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    await kv.close()
    await node.stop()
    await server.stop(grace=2)
    if stop_metrics is not None:
        stop_metrics()
    return WORKER_LOST_EXIT if worker_lost else 0


# the exit code of a stage that stops because one of its TP workers died: its supervisor
# (stagemesh up, compose's or Kubernetes' restart policy) starts the whole stage again
WORKER_LOST_EXIT = 3
_WATCH_S = 0.5


async def _watch_workers(runtime: StageRuntime, stop: asyncio.Event) -> bool:
    """Stops the stage once a TP worker process has exited. Rank 0 alone cannot step (the
    worker's weight shards and KV went with it), and a stage that kept serving would fail every
    step while its health said SERVING; stopping lets the supervisor restart it and the gateway
    re-wire and migrate its requests, as for a stage that died whole. True when it stopped it."""
    while not stop.is_set():
        await asyncio.sleep(_WATCH_S)
        dead = runtime.executor.dead_workers()
        if dead:
            rank, pid, code = dead[0]
            log.error("TP rank %d (pid %s) exited with code %s: this stage cannot run steps without it; "
                      "stopping with exit code %d so that its supervisor restarts the stage", rank, pid, code,
                      WORKER_LOST_EXIT)
            stop.set()
            return True
    return False


def _security(creds: MeshCredentials) -> str:
    if creds.cert is None:
        return "plaintext"
    return "mutual TLS" if creds.ca is not None else "TLS"


def _rejoin(runtime: StageRuntime) -> None:
    try:
        runtime.rejoin()
    except RendezvousCancelled:
        pass   # the stage is stopping
    except Exception:  # logged here: nobody waits on this future
        log.exception("could not rejoin the DP group")


def run(spec: StageSpec, host: str, port: int, ready_file: str | None = None,
        transport_name: str | None = None, metrics_port: int | None = None,
        creds: MeshCredentials = PLAINTEXT) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = asyncio.run(serve(spec, host, port, ready_file, transport_name, metrics_port, creds))
    if code:
        raise SystemExit(code)
