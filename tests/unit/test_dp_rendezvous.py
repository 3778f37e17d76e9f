"""The data-parallel rendezvous over a real TCPStore: 2 replicas x 2 stages (layers 0:3 | 3:5) x tp 1 form with
ranks ordered by (start_layer, dp_rank, tp_rank) and a gloo world of 4 processes reduces over the formation's
store; the group re-forms (restarted members, stale knocks of dead members), waits on and explains inconsistent
splits until fixed, survives a host restart, and stops waiting on cancel. Members are threads with DpRendezvous
objects of their own (each has its own connections) except where a torch.distributed world needs processes."""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagekit.errors import ConfigError
from stagekit.parallel.dp_group import Knock, KnockBook
from stagekit.parallel.dp_rendezvous import (
    DpRendezvous,
    Formation,
    Member,
    RendezvousCancelled,
    RendezvousLost,
    machine_id,
)
from stagekit.ports import free_port

SPLIT = ((0, 3), (3, 5))
ORDER = [(0, 0), (1, 0), (0, 3), (1, 3)]  # (dp_rank, start_layer) by global rank


def _member(dp: int, start: int, end: int, pid: int = 1) -> Member:
    return Member(dp, start, end, 5, 0, 1, "m", pid)


def _world(index: int, address: str) -> None:
    torch.set_num_threads(1)
    dp, (start, end) = index // 2, SPLIT[index % 2]
    rdzv = DpRendezvous(address, Member(dp, start, end, 5, 0, 1, machine_id(), os.getpid()), 2)
    stop = threading.Event()
    deadline = threading.Timer(15, stop.set)  # fail, not hang, should the group never form
    deadline.start()
    f = rdzv.form(stop)
    deadline.cancel()
    assert f.epoch == 1 and [(m.dp_rank, m.start_layer) for m in f.members] == ORDER
    assert f.members[f.rank].pid == os.getpid() and f.stages() == SPLIT
    assert f.ranks_of(3) == (2, 3) and f.tp_ranks(1, 3) == (3,) and f.head_ranks() == (0, 1)
    dist.init_process_group("gloo", store=f.store, rank=f.rank, world_size=f.world_size,
                            timeout=datetime.timedelta(seconds=15))
    x = torch.tensor([float(f.rank + 1)])
    dist.all_reduce(x)
    assert x.item() == 10.0
    dist.barrier()
    dist.destroy_process_group()
    rdzv.close()


def test_four_processes_form_and_reduce_over_the_formation_store() -> None:
    mp.spawn(_world, args=(f"127.0.0.1:{free_port()}",), nprocs=4, join=True)


class Kit:
    """Rendezvous objects and form() threads of one test; everything is cancelled and closed at its end."""

    def __init__(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.made: list[DpRendezvous] = []
        self.cancels: list[threading.Event] = []
        self.pool = ThreadPoolExecutor(8)

    def make(self, member: Member, dp_size: int = 2, address: str | None = None) -> DpRendezvous:
        self.made.append(DpRendezvous(address or self.address, member, dp_size))
        return self.made[-1]

    def form(self, rdzv: DpRendezvous) -> tuple[Future[Formation], threading.Event]:
        cancel = threading.Event()
        self.cancels.append(cancel)
        return self.pool.submit(rdzv.form, cancel), cancel

    def form_all(self, rdzvs: list[DpRendezvous], epoch: int) -> list[Formation]:
        formations = [f.result(timeout=10) for f in [self.form(r)[0] for r in rdzvs]]
        assert {f.epoch for f in formations} == {epoch}
        return formations

    def members(self) -> list[DpRendezvous]:
        """Replica 0's stages 0:3 (the host) and 3:5, then replica 1's."""
        return [self.make(_member(i // 2, *SPLIT[i % 2], pid=i + 1)) for i in range(4)]


@pytest.fixture
def kit() -> Iterator[Kit]:
    k = Kit()
    yield k
    for cancel in k.cancels:
        cancel.set()
    k.pool.shutdown(wait=True)
    for r in k.made:
        r.close()


def _wait(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reformation_takes_every_members_newest_knock(kit: Kit) -> None:
    rdzvs = kit.members()
    assert rdzvs[1].current_epoch() is None
    one = kit.form_all(rdzvs, 1)
    assert [(m.dp_rank, m.start_layer) for m in one[0].members] == ORDER and [f.rank for f in one] == [0, 2, 1, 3]

    rdzvs[3].close()  # restarted: a new process knocks for replica 1 stage 3:5
    rdzvs[3] = kit.make(_member(1, 3, 5, pid=40))
    two = kit.form_all(rdzvs, 2)
    assert two[0].members[3].pid == 40 and [r.current_epoch() for r in rdzvs] == [2, 2, 2, 2]

    doomed = kit.make(_member(1, 3, 5, pid=41))  # knocks, then dies before any formation
    _, cancel = kit.form(doomed)
    _wait(lambda: doomed.status.startswith("knocked"))
    cancel.set()
    doomed.close()
    rdzvs[3] = kit.make(_member(1, 3, 5, pid=42))  # its replacement knocks before the group is complete
    replaced = kit.form(rdzvs[3])[0]
    _wait(lambda: rdzvs[3].status.startswith("knocked"))
    three = kit.form_all(rdzvs[:3], 3)
    assert three[0].members[3].pid == 42 and replaced.result(timeout=10).epoch == 3

    # a member dies after its knock made a formation (the world will time out): the next one forms without it
    rdzvs[3] = kit.make(_member(1, 3, 5, pid=43))
    assert kit.form_all(rdzvs, 4)[0].members[3].pid == 43
    rdzvs[3].close()
    rdzvs[3] = kit.make(_member(1, 3, 5, pid=44))
    assert kit.form_all(rdzvs, 5)[0].members[3].pid == 44


def test_inconsistent_splits_wait_until_fixed(kit: Kit) -> None:
    good = [kit.make(_member(0, 0, 3)), kit.make(_member(0, 3, 5))]
    bad = [kit.make(_member(1, 0, 2)), kit.make(_member(1, 2, 5))]
    waiting = [kit.form(r)[0] for r in good]
    bad_forms = [kit.form(r) for r in bad]
    _wait(lambda: "replica 1's stages hold 0:2|2:5 but replica 0's 0:3|3:5" in good[0].status)
    assert not any(f.done() for f in waiting)
    for rdzv, (_, cancel) in zip(bad, bad_forms, strict=True):  # replica 1 restarted with the right splits
        cancel.set()
        rdzv.close()
    fixed = [kit.make(_member(1, 0, 3)), kit.make(_member(1, 3, 5))]
    formations = [f.result(timeout=10) for f in waiting + [kit.form(r)[0] for r in fixed]]
    assert [(m.dp_rank, m.start_layer, m.end_layer) for m in formations[0].members] == [
        (0, 0, 3), (1, 0, 3), (0, 3, 5), (1, 3, 5)]
    assert [f.rank for f in formations] == [0, 2, 1, 3]


def test_host_status_names_what_is_missing_or_wrong() -> None:
    tp2 = [Member(dp, 0, 5, 5, tp, 2, "m", 10 * dp + tp) for dp, tp in ((1, 1), (0, 1), (1, 0), (0, 0))]
    book = KnockBook(tp2[-1], 2, "i")
    for i, m in enumerate(tp2, 1):
        book.add(Knock(m, f"n{i}", "i", 2, i))
    group = book.take_group()
    assert group is not None and [k.member.pid for k in group] == [0, 1, 10, 11]
    assert book.take_group() is None and book.status == "no replica 0 stage holds layers 0:5 yet"  # used up

    host = Member(0, 0, 3, 5, 0, 2, "m", 1)
    book = KnockBook(host, 2, "i")
    for i, m in enumerate([host, Member(1, 0, 3, 5, 0, 2, "m", 2), Member(1, 3, 5, 5, 0, 1, "m", 3)], 1):
        book.add(Knock(m, f"n{i}", "i", 2, i))
    book.add(Knock(Member(0, 3, 5, 5, 0, 1, "m", 4), "old", "another host", 2, 4))
    assert book.take_group() is None
    assert book.status == ("waiting for replica 0 stage 0:3 tp 1, replica 1 stage 0:3 tp 1; "
                           "no replica 0 stage holds layers 3:5 yet")
    book.add(Knock(Member(0, 3, 5, 5, 0, 2, "m", 5), "n5", "i", 2, 5))
    book.add(Knock(Member(1, 0, 3, 6, 1, 2, "m", 6), "n6", "i", 2, 6))
    book.add(Knock(Member(2, 0, 3, 5, 0, 2, "m", 7), "n7", "i", 3, 7))
    assert book.take_group() is None
    assert "replica 1 stage 0:3 tp 1 has num_layers 6 but the host 5" in book.status
    assert "replica 1's stage 3:5 has tp_size 1 but replica 0's 2" in book.status
    assert "replica 2 stage 0:3 tp 0 was started with dp_size 3 but the group has dp_size 2" in book.status

    book = KnockBook(_member(0, 0, 3), 2, "i")  # a process restarted with other layers: its old knock goes
    for i, m in enumerate([_member(1, 2, 5), _member(0, 0, 3), _member(1, 3, 5)], 1):
        book.add(Knock(m, f"n{i}", "i", 2, i))
    assert book.take_group() is None
    assert book.status == ("waiting for replica 1 stage 0:3 tp 0; no replica 0 stage holds layers 3:5 yet; "
                           "ignoring replica 1 stage 2:5 tp 0 of tp_size 1: the newer replica 1 stage 3:5 tp 0 of "
                           "tp_size 1 overlaps it")


def test_host_restart_members_reknock_and_lose_the_host_meanwhile(kit: Kit) -> None:
    rdzvs = kit.members()
    kit.form_all(rdzvs, 1)
    assert rdzvs[1].current_epoch() == 1
    waiting = [kit.form(r)[0] for r in rdzvs[1:]]  # the world failed: members form again
    rdzvs[0].close()
    for _ in range(2):  # once the connection breaks, once refused
        start = time.monotonic()
        with pytest.raises(RendezvousLost):
            rdzvs[1].current_epoch()
        assert time.monotonic() - start < 2.0
    rdzvs[0] = kit.make(_member(0, 0, 3, pid=10))
    with pytest.raises(RendezvousLost, match="restarted"):
        rdzvs[1].current_epoch()
    formations = [f.result(timeout=10) for f in [kit.form(rdzvs[0])[0]] + waiting]
    assert {f.epoch for f in formations} == {1} and formations[1].members[0].pid == 10
    assert [r.current_epoch() for r in rdzvs] == [1, 1, 1, 1]


def test_cancel_stops_a_waiting_form(kit: Kit) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    lone = kit.make(_member(1, 0, 3), address=nowhere)  # no host there
    host = kit.make(_member(0, 0, 3))  # up, but its group is never complete
    host_form, host_cancel = kit.form(host)
    for future, cancel in [kit.form(lone), (host_form, host_cancel)]:
        time.sleep(0.3)
        start = time.monotonic()
        cancel.set()
        with pytest.raises(RendezvousCancelled):
            future.result(timeout=2)
        assert time.monotonic() - start < 1.0
    assert lone.status == f"waiting for the group host at {nowhere}"
    assert "no replica 0 stage holds layers 3:5 yet" in host.status


def test_bad_arguments_are_config_errors(kit: Kit) -> None:
    for address in ("nohost", "h:0", "h:port", ":29500", "h:70000"):
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            DpRendezvous(address, _member(1, 0, 3), 2)
    with pytest.raises(ConfigError, match="dp_size 2"):
        DpRendezvous(kit.address, _member(2, 0, 3), 2)
    kit.make(_member(0, 0, 3))
    other = kit.make(_member(1, 0, 3), dp_size=3)
    with pytest.raises(ConfigError, match="started with dp_size 3 but the group host .* with dp_size 2"):
        other.form()
    assert "dp_size 3" in other.status


def test_a_group_meets_at_a_dns_name(kit: Kit) -> None:
    """--dp-group takes a name (a pod's stable DNS name on Kubernetes): the host listens where it resolves and
    every member resolves it on each dial."""
    kit.address = f"localhost:{free_port()}"
    formations = kit.form_all(kit.members(), epoch=1)
    assert sorted(f.rank for f in formations) == [0, 1, 2, 3]
