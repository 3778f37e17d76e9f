"""Running a real gateway (uvicorn on a free loopback port) in a background thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.tokenizing import TokenizerFactory


class GatewayThread:
    """The gateway app served by uvicorn in a thread; ``url`` is its base URL once started."""

    def __init__(
        self,
        replicas: Sequence[Sequence[str]],
        *,
        api_key: str | None = None,
        health_interval_s: float = 0.2,
        startup_timeout_s: float = 10.0,
        tokenizer_factory: TokenizerFactory | None = None,
        **config: Any,
    ) -> None:
        """``config`` holds further `GatewayConfig` fields (routing, grpc_port, admission, ...)."""
        config.setdefault("rpc_timeout_s", 1.0)
        self.config = GatewayConfig(
            replicas=tuple(tuple(r) for r in replicas),
            api_keys=(api_key,) if api_key else config.pop("api_keys", ()),
            health_interval_s=health_interval_s,
            startup_timeout_s=startup_timeout_s,
            **config,
        )
        self.app = create_app(self.config, tokenizer_factory=tokenizer_factory)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every response waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        uv_config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(uv_config)
        self.startup_failed = False
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except SystemExit:  # uvicorn's answer to a failed lifespan startup
            self.startup_failed = True

    def start(self, wait: bool = True, timeout_s: float = 15.0) -> GatewayThread:
        self._thread.start()
        if wait:
            self.wait_started(timeout_s)
        return self

    def wait_started(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not start")
            time.sleep(0.02)

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC Generation API (when started with ``grpc_port``)."""
        return f"127.0.0.1:{self.app.state.grpc_port}"

    @property
    def state(self) -> Any:
        """The running app's `GatewayState` (pool, metrics, ...)."""
        return self.app.state.gateway

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        assert not self._thread.is_alive(), "the gateway thread did not stop"

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0, interval_s: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(interval_s)
