"""The process's one UCX context and worker (ucxx keeps one per process), the progress
driver of the running loop, and thin helpers that post tag sends and receives.

UCX reads its environment when ``ucxx`` is imported, so the import happens here, after
``prepare_environment``; nothing else in the package imports ucxx.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib.util
import logging
import os
from typing import Any

from stagekit.processes import process_running
from stagekit.transport.recv_pool import RecvPool
from stagekit.transport.ucx.progress import UcxProgress
from stagekit.transport.ucx.settings import UcxSettings, prepare_environment
from stagekit.transport.ucx.wire import PeerAddress, this_host

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}

# Endpoints that must never be closed (see UcxRuntime.drop_endpoint): kept for the process's life.
KEPT_ENDPOINTS: list[Any] = []


@functools.cache
def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def ucx_importable() -> bool:
    """Whether ucxx imports here (it pulls in libucx; a broken install raises)."""
    if "importable" not in _state:
        ok = importlib.util.find_spec("ucxx") is not None
        if ok:
            try:
                _import_ucxx()
            except Exception as e:  # a wheel without its native libraries, etc.
                log.warning("ucxx is installed but does not import: %s", e)
                ok = False
        _state["importable"] = ok
    return _state["importable"]


def _import_ucxx() -> Any:
    if "ucxx" not in _state:
        prepare_environment(cuda=cuda_present())
        import ucxx

        _state["ucxx"] = ucxx
    return _state["ucxx"]


def ucx_tls(settings: UcxSettings) -> str:
    """UCX_TLS as given by the user, else the settings' (plus CUDA transports when CUDA is here)."""
    if "UCX_TLS" in os.environ:
        return os.environ["UCX_TLS"]
    tls = settings.tls
    if cuda_present() and "cuda" not in tls:
        tls += ",cuda_copy,cuda_ipc"
    return tls


def _skip_endpoint_finalizers_at_exit() -> None:
    """At interpreter exit ucxx's endpoint finalizers close every endpoint still referenced
    with ``close_blocking``, which was seen to spin for minutes on endpoints of a peer that
    had died (a test run hung at exit). The process is ending anyway: an exit hook that runs
    before the finalizers detaches them."""
    import atexit
    import weakref

    from ucxx._lib_async import endpoint as endpoint_mod

    finalizer = getattr(endpoint_mod, "_finalizer", None)
    registry = getattr(weakref.finalize, "_registry", None)
    if finalizer is None or registry is None:
        return

    def detach() -> None:
        for f, info in list(registry.items()):
            if getattr(info, "func", None) is finalizer:
                f.detach()
        # Endpoints kept unclosed would be closed (blocking, for good) by their C++
        # destructors when module globals are cleared; never free them.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(KEPT_ENDPOINTS))

    # weakref.finalize hooks itself into atexit on first use; make sure that happened, so
    # that this hook (registered after it) runs before it
    weakref.finalize(detach, lambda: None)
    atexit.register(detach)


class UcxRuntime:
    """Invariant: one per process; ``progress`` drives the worker on the loop it was made on,
    ``recv_pool`` lends host memory to received tensors."""

    def __init__(self, ucxx: Any, settings: UcxSettings, loop: asyncio.AbstractEventLoop) -> None:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull

        self.ucxx, self.settings, self.loop = ucxx, settings, loop
        self._Array, self._Tag, self._mask = Array, Tag, TagMaskFull
        self.worker = ucxx.core._get_ctx().worker
        self.progress = UcxProgress(self.worker, loop, settings.spin_s)
        self.recv_pool = RecvPool()
        self.shm_unsafe = ""   # why this process's shared-memory receive queue may be wedged

    @classmethod
    def get(cls, settings: UcxSettings) -> UcxRuntime:
        """The process's runtime, initialising UCX on first use (from inside the running loop)."""
        loop = asyncio.get_running_loop()
        rt: UcxRuntime | None = _state.get("runtime")
        if rt is not None:
            if rt.loop is not loop:
                raise RuntimeError("the UCX data plane is bound to the event loop that started it")
            if rt.settings.runtime_key() != settings.runtime_key():
                log.warning("UCX already initialised with %s; ignoring %s", rt.settings.describe(),
                            settings.describe())
            return rt
        ucxx = _import_ucxx()
        tls = ucx_tls(settings)
        # "blocking" makes ucxx create the worker with wakeup support; UcxProgress then takes its fd over.
        ucxx.init(options={"TLS": tls}, env_takes_precedence=True, progress_mode="blocking")
        rt = cls(ucxx, settings, loop)
        _state["runtime"] = rt
        _skip_endpoint_finalizers_at_exit()
        log.info("UCX %s initialised: UCX_TLS=%s", ucxx.__ucx_version__, tls)
        return rt

    def worker_address(self) -> bytes:
        return bytes(self.ucxx.get_worker_address())

    def mark_shm_unsafe(self, reason: str) -> None:
        """A same-host peer died (or stalled) in the middle of a shared-memory transfer with
        this process. UCX's shared-memory transport has one receive FIFO per worker, shared
        by every sender; a sender killed between reserving a FIFO slot and filling it leaves
        the slot unfinished, and UCX waits on it for good: nothing more arrives over shared
        memory from anyone (a replacement stage's hello went unanswered; 1 in 3 kills of a
        peer streaming 8 MiB frames here). From now on this process reaches same-host peers,
        and asks them to reach it (its published address says so), over endpoints with error
        handling, i.e. TCP, where the profile allows (error handling ``auto``)."""
        if not self.shm_unsafe:
            self.shm_unsafe = reason
            log.error("UCX shared memory may be wedged in this process (%s): same-host links "
                      "opened from now on use TCP with error handling where the profile is auto", reason)

    def link_error_handling(self, settings: UcxSettings, peer: PeerAddress) -> bool:
        """Error handling for an endpoint to ``peer``: the settings' choice, turned on for a
        same-host peer when either side's shared memory may be wedged and the settings leave
        the choice to us (``auto``)."""
        same_host = peer.host == this_host()
        if settings.link_error_handling(same_host):
            return True
        return same_host and settings.error_handling is None and bool(self.shm_unsafe or peer.shm_unsafe)

    async def endpoint(self, worker_address: bytes, error_handling: bool) -> Any:
        addr = self.ucxx.get_ucx_address_from_buffer(worker_address)
        return await self.ucxx.create_endpoint_from_worker_address(addr, endpoint_error_handling=error_handling)

    def drop_endpoint(self, ep: Any, error_handling: bool, settled: bool, peer_pid: int | None = None) -> bool:
        """Close ``ep`` without ever blocking the loop; returns whether it was closed.

        ucxx closes an endpoint synchronously, spinning on the worker until UCX is done: with
        error handling that is a forced close (prompt); without, a flush that waits for every
        operation still outstanding to the peer, which never ends if the peer died or stalled
        (a stage's loop spun for good on a SIGSTOPped, then killed neighbour). So an endpoint
        without error handling is closed only when ``settled`` (every request posted on it has
        completed) and its process, when ``peer_pid`` names one on this host, still runs;
        otherwise it is kept, unclosed, for the life of the process (one per failed link or
        transfer: the peer is gone, so is whatever it shared with us)."""
        if error_handling or (settled and (peer_pid is None or process_running(peer_pid))):
            ep.abort(period=10**8)
            return True
        KEPT_ENDPOINTS.append(ep)
        log.debug("UCX endpoint kept unclosed (peer %s gone or requests outstanding)", peer_pid)
        return False

    def send(self, ep: Any, buf: object, tag: int) -> Any:
        """Post a tag send on an endpoint (ucxx.Endpoint); the request completes later."""
        return ep._ep.tag_send(self._Array(buf), self._Tag(tag))

    def recv(self, ep: Any | None, buf: object, tag: int) -> Any:
        """Post a tag receive. Through ``ep`` it is cancelled when that endpoint fails;
        without one it waits on the worker for any sender."""
        if ep is None:
            return self.worker.tag_recv(self._Array(buf), self._Tag(tag))
        return ep._ep.tag_recv(self._Array(buf), self._Tag(tag), self._mask)
