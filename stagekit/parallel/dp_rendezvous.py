"""The rendezvous of a data-parallel-attention group: its processes find each other over TCP, agree on global
ranks, and form again after a member failed.

Protocol. The host member (dp_rank 0, start_layer 0, tp_rank 0) serves a torch TCPStore at HOST:PORT for its
lifetime and first writes ``rdzv/dp_size``, ``rdzv/epoch`` = 0 and last ``rdzv/instance``, a random id new each
host lifetime (its presence tells members the host is ready). Each ``form()`` knocks anew: the member checks
the dp_size (a mismatch is a ConfigError), notes the epoch E it saw, takes a knock number
``n = add("rdzv/knocks", 1)`` and writes ``rdzv/knock/<n>`` (dp_group.Knock: the member, a fresh nonce, the
instance it saw). The host reads knocks while it is in ``form()`` (dp_group.KnockBook: a number whose knock is
not written yet is looked at again on each poll, so a member that died in between blocks nothing; the newest
knock per identity wins). Once they make a complete, consistent group it writes ``rdzv/formation/<E+1>`` (the
knocks in global rank order) and then sets ``rdzv/epoch``; every member polls that, 10 times a second, and
reads each formation newer than its E until one holds its nonce. A member that sees another instance (the
host restarted) knocks again. World e's torch.distributed keys live under ``epoch/<e>/``, so no two worlds
share a key; a formation's store is a connection of its own (form and current_epoch keep theirs).
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from stagekit.errors import ConfigError, StageUnavailable
from stagekit.parallel.dp_group import Formation, Knock, KnockBook, Member

__all__ = ["DpRendezvous", "Formation", "Member", "RendezvousCancelled", "RendezvousLost", "machine_id"]

_POLL_S = 0.1  # at most 10 store polls a second while waiting
_DIAL_S = 1.0  # a connection attempt to a host that is not there fails within about this
_ANSWER_S = 1.5  # current_epoch's wait for an answer


class RendezvousCancelled(StageUnavailable):
    """``form()`` stopped waiting: its cancel event was set, or the rendezvous was closed."""


class RendezvousLost(StageUnavailable):
    """The group host is unreachable, or it restarted since this member's last formation."""


def machine_id() -> str:
    """This machine: hostname and boot id (processes with the same one can share memory)."""
    try:
        return f"{socket.gethostname()}/{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}"
    except OSError:
        return socket.gethostname()


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:29500
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad data-parallel group address {address!r}: expected HOST:PORT, e.g. 10.0.0.5:29500")
    return host, int(port)


def _check_member(m: Member, dp_size: int) -> None:
    if not (0 <= m.dp_rank < dp_size and 0 <= m.start_layer < m.end_layer <= m.num_layers
            and 0 <= m.tp_rank < m.tp_size):
        raise ConfigError(f"{m.describe()} of tp_size {m.tp_size} cannot be in a group of dp_size {dp_size} over "
                          f"{m.num_layers} layers")


def _text(store: dist.Store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> Future[T]:
    """``fn()`` in a daemon thread of its own. A TCPStore operation on a host that stopped answering (a stopped
    process, a lost network) blocks without limit, whatever the store's timeout: callers wait on the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="dp-rendezvous").start()
    return future


class DpRendezvous:
    """This process's handle on the rendezvous of its data-parallel group at ``address``. Invariant: the host
    member's object serves the group's store from construction to ``close`` (epochs count from 1 in each such
    lifetime); each ``form()`` knocks anew and returns only a formation holding that knock. Every store
    operation runs in a thread of its own on a connection of its own, so ``form`` honours its cancel event and
    ``current_epoch`` answers in time even when the host stalls. ``timeout_s`` is the store timeout of a
    formation's world (how long its rendezvous waits for a member that never comes)."""

    def __init__(self, address: str, member: Member, dp_size: int, timeout_s: float = 30.0) -> None:
        self._host, self._port = parse_address(address)
        _check_member(member, dp_size)
        self.address, self.member, self.dp_size, self.timeout_s = address, member, dp_size, timeout_s
        # the host's own connections go to the loopback when it listens on every interface
        self._dial_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        self._server: dist.TCPStore | None = None  # the host's: serves the group until close
        self._book: KnockBook | None = None
        self._book_lock = threading.Lock()  # a cancelled form's thread may still be publishing
        self._watch: dist.TCPStore | None = None  # current_epoch's connection
        self._watcher: Future[int | None] | None = None
        self._watch_lock = threading.Lock()
        self._formed_instance: str | None = None
        self._beat = time.monotonic()  # when form's thread last finished a poll
        self._closed = False
        self._status = f"waiting for the group host at {address}"
        if member.is_host:
            self._serve()

    def _serve(self) -> None:
        try:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket.create_server((self._host, self._port), family=family, backlog=256)
        except OSError as exc:
            raise ConfigError(f"the data-parallel group host cannot listen at {self.address}: {exc}") from exc
        self._server = dist.TCPStore(self._dial_host, self._port, None, True, datetime.timedelta(seconds=_DIAL_S),
                                     wait_for_workers=False, master_listen_fd=sock.detach())
        instance = uuid.uuid4().hex
        for key, value in (("rdzv/dp_size", str(self.dp_size)), ("rdzv/epoch", "0"), ("rdzv/instance", instance)):
            self._server.set(key, value)
        self._book = KnockBook(self.member, self.dp_size, instance)
        self._status = "waiting for the first knock"

    def _dial(self, timeout_s: float = _DIAL_S) -> dist.TCPStore | None:
        """A new client connection, or None while the host is not there."""
        try:  # a plain connect first: it fails fast and quietly, where TCPStore retries and logs each try
            socket.create_connection((self._dial_host, self._port), timeout=_DIAL_S).close()
            return dist.TCPStore(self._dial_host, self._port, None, False, datetime.timedelta(seconds=timeout_s),
                                 wait_for_workers=False)
        except (OSError, dist.DistError):
            return None

    def form(self, cancel: threading.Event | None = None) -> Formation:
        """Knocks, then waits until the host publishes a formation holding this knock (knocking again whenever
        the host restarted). Raises RendezvousCancelled within 0.1 s of ``cancel`` being set or the rendezvous
        being closed, ConfigError if the host runs another dp_size."""
        stop = threading.Event()
        self._beat = time.monotonic()
        call = _in_thread(lambda: self._attempt(stop))
        while not wait([call], _POLL_S).done:
            if self._closed or (cancel is not None and cancel.is_set()):
                stop.set()  # its thread ends once its store operation returns
                raise RendezvousCancelled(f"stopped waiting for the data-parallel group at {self.address}")
            if time.monotonic() - self._beat > 3 * _DIAL_S:
                self._status = f"the group host at {self.address} does not answer"
        formation, self._formed_instance = call.result()
        return formation

    def _attempt(self, stop: threading.Event) -> tuple[Formation, str]:
        """form's polls, in their own thread: the formation and the host instance that made it."""
        store: dist.TCPStore | None = None
        knock: Knock | None = None
        seen = 0  # the epoch published before the knock: a formation holding it is newer
        while not stop.is_set():
            try:
                store = store or self._dial()
                instance = None if store is None else _text(store, "rdzv/instance")
                if store is not None and instance is not None:
                    if knock is None or knock.instance != instance:
                        knock, seen = self._knock(store, instance)
                    book = self._book
                    if book is not None:
                        with self._book_lock:
                            self._publish(store, book)
                    formation, seen = self._find(store, knock, seen)
                    if formation is not None:
                        return formation, knock.instance
            except dist.DistError as exc:
                store = None
                self._status = f"lost the group host at {self.address} ({str(exc).splitlines()[0]}); reconnecting"
            self._beat = time.monotonic()
            stop.wait(_POLL_S)
        raise RendezvousCancelled("stopped")

    def _knock(self, store: dist.TCPStore, instance: str) -> tuple[Knock, int]:
        host_dp_size = int(store.get("rdzv/dp_size"))
        if host_dp_size != self.dp_size:
            self._status = (f"this member was started with dp_size {self.dp_size} but the group host at "
                            f"{self.address} with dp_size {host_dp_size}")
            raise ConfigError(self._status)
        seen = int(store.get("rdzv/epoch"))
        knock = Knock(self.member, uuid.uuid4().hex, instance, self.dp_size)
        store.set(f"rdzv/knock/{store.add('rdzv/knocks', 1)}", knock.encode())
        self._status = f"knocked as {self.member.describe()}; waiting for the group host at {self.address}"
        return knock, seen

    def _publish(self, store: dist.TCPStore, book: KnockBook) -> None:
        book.read(store)
        group = book.take_group()
        self._status = book.status
        if group is not None:
            epoch = int(store.get("rdzv/epoch")) + 1
            store.set(f"rdzv/formation/{epoch}", json.dumps([k.encode() for k in group]))
            store.set("rdzv/epoch", str(epoch))

    def _find(self, store: dist.TCPStore, knock: Knock, seen: int) -> tuple[Formation | None, int]:
        """The first formation after epoch ``seen`` that holds ``knock``, and the newest epoch looked at."""
        newest = int(store.get("rdzv/epoch"))
        for epoch in range(seen + 1, newest + 1):
            group = [Knock.decode(text, 0) for text in json.loads(store.get(f"rdzv/formation/{epoch}"))]
            nonces = [k.nonce for k in group]
            if knock.nonce in nonces:
                world_store = self._dial(self.timeout_s)
                if world_store is None:  # the host went away meanwhile: its formation is of no use
                    return None, seen
                rank = nonces.index(knock.nonce)
                self._status = f"formed epoch {epoch}: rank {rank} of {len(group)}"
                members = tuple(k.member for k in group)
                return Formation(epoch, rank, members, dist.PrefixStore(f"epoch/{epoch}", world_store)), epoch
        return None, newest

    def current_epoch(self) -> int | None:
        """The newest published epoch, None before the first. Raises RendezvousLost (within about 1.5 s) when the
        host is unreachable, does not answer, or is another instance than the one of this member's last
        formation."""
        with self._watch_lock:
            if self._watcher is None or self._watcher.done():  # else the last query is stuck: wait on it
                self._watcher = _in_thread(self._read_epoch)
            if not wait([self._watcher], _ANSWER_S).done:
                raise RendezvousLost(f"the data-parallel group host at {self.address} does not answer")
            return self._watcher.result()

    def _read_epoch(self) -> int | None:
        try:
            if not self._closed:
                self._watch = self._watch or self._dial()
            if self._watch is None:
                raise RendezvousLost(f"the data-parallel group host at {self.address} is unreachable")
            instance = _text(self._watch, "rdzv/instance")
            if instance is None:
                return None  # the host is starting
            if self._formed_instance not in (None, instance):
                raise RendezvousLost(f"the data-parallel group host at {self.address} restarted since this "
                                     "member's last formation")
            return int(self._watch.get("rdzv/epoch")) or None
        except dist.DistError as exc:
            self._watch = None
            raise RendezvousLost(f"lost the data-parallel group host at {self.address}: "
                                 f"{str(exc).splitlines()[0]}") from exc

    @property
    def status(self) -> str:
        """Where this member stands; on the host while forming, who is missing or what disagrees."""
        return self._status

    def close(self) -> None:
        """Drops this member's connections; on the host, stops serving the group (its members lose it)."""
        self._closed = True
        self._server = self._watch = None
        self._book = None
