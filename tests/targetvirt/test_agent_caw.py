"""COMPARE AND WRITE across agents (VMFS's ATS through every gateway at once): the
controller's Exclusive hold, its ends (done, miscompare, fenced holder, lapsed hold), the
Solo fast path of an agent alone on a vdisk, and a newcomer arriving mid-CAW."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.agent import AgentVDisk
from targetvirt.container import FileContainer
from targetvirt.errors import ControllerUnreachable
from tests.targetvirt.cluster import Background, Cluster, drive, read, write
from tests.targetvirt.engine_model import SEG
from tests.targetvirt.test_agent import CountingCalls

MARK = b"CAW!"  # a COMPARE AND WRITE's data starts with it: the pause below catches it


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three agents serving ``v`` (files: the pause patches FileContainer.writev)."""
    c = Cluster(str(tmp_path), vdisks={"v": 4 * SEG}, containers=2)  # (2: room to migrate)
    for i in range(4):
        write(c.vd(0), i * SEG, bytes([48 + i]) * SEG)  # allocated: no faults below
    yield c
    c.close()


class Pause:
    """Holds the first container write whose data starts with MARK until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        real = FileContainer.writev

        def writev(c: FileContainer, bufs: Sequence[memoryview | bytes], offset: int) -> None:
            if bytes(bufs[0][:4]) == MARK and not self.reached.is_set():
                self.reached.set()
                assert self.release.wait(10)
            real(c, bufs, offset)

        monkeypatch.setattr(FileContainer, "writev", writev)


def caw(vd: AgentVDisk, offset: int, verify: bytes, data: bytes) -> int | None:
    return vd.compare_and_write(offset, memoryview(verify), memoryview(data))


def test_a_caw_holds_other_agents_writes_to_its_segment_only(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause = Pause(monkeypatch)
    swap = Background(lambda: caw(cluster.vd(0), 100, b"0" * 512, MARK + b"a" * 508))
    assert pause.reached.wait(10)  # compared, about to write
    assert cluster.vd(1).entry(0) & t.NOWRITE_BIT and cluster.vd(2).entry(0) & t.NOWRITE_BIT
    assert not cluster.vd(0).entry(0) & t.NOWRITE_BIT
    same = Background(lambda: write(cluster.vd(1), 300, b"late"))
    assert same.still_running()  # held: the CAW's compare and write stay one
    write(cluster.vd(2), SEG + 5, b"other")  # another segment goes through
    write(cluster.vd(1), 2 * SEG - 4, b"edge")  # ...even right before it
    assert read(cluster.vd(0), SEG + 5, 5) == b"other"
    pause.release.set()
    assert swap.result() is None
    same.result()
    assert read(cluster.vd(2), 100, 512) == MARK + b"a" * 196 + b"late" + b"a" * 308
    for i in range(3):
        assert not cluster.vd(i).entry(0) & t.NOWRITE_BIT  # the hold is over everywhere


def test_a_miscompare_leaves_the_data_and_ends_the_hold(cluster: Cluster) -> None:
    calls = CountingCalls(cluster, 0)
    verify = bytearray(b"1" * 64)
    verify[40] = 0
    assert caw(cluster.vd(0), SEG + 1000, bytes(verify), b"x" * 64) == 40
    assert calls["Exclusive"] == 1 and calls["EndExclusive"] == 1
    assert read(cluster.vd(1), SEG + 1000, 64) == b"1" * 64
    assert not any(cluster.vd(i).entry(1) & t.NOWRITE_BIT for i in range(3))
    write(cluster.vd(1), SEG + 1000, b"free")  # not held: goes through at once
    assert read(cluster.vd(0), SEG + 1000, 4) == b"free"


def test_two_agents_caws_on_one_block_take_turns(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like VMFS's ATS: each swaps the free lock word for its own; one wins."""
    pause = Pause(monkeypatch)
    free = b"0" * 8
    first = Background(lambda: caw(cluster.vd(0), 0, free, MARK + b"gw0."))
    assert pause.reached.wait(10)
    second = Background(lambda: caw(cluster.vd(1), 0, free, b"gw1.gw1."))
    assert second.still_running()  # its hold waits for the first one's at the controller
    pause.release.set()
    assert first.result() is None
    assert second.result() == 0  # it compared after the first wrote: the lock is taken
    assert read(cluster.vd(2), 0, 8) == MARK + b"gw0."


def test_the_hold_of_a_caw_agent_that_dies_ends_with_its_lease(cluster: Cluster) -> None:
    dead = cluster.vd(0)

    def die(*_: object) -> int | None:  # granted the hold, then the process is gone
        cluster.links[0].crash()
        raise ControllerUnreachable("gone")

    dead._caw_locally = die  # type: ignore[method-assign]
    with pytest.raises(ControllerUnreachable):
        caw(dead, 0, b"0" * 8, b"gw0.gw0.")
    for i in (1, 2):
        cluster.agents[i].start()  # their leases go on
    held = Background(lambda: write(cluster.vd(1), 0, b"after"))
    assert held.still_running()
    cluster.controller.start()  # the timer fences gw0 when its lease lapses
    drive(cluster.clock, held, step=0.5)
    assert cluster.controller.fenced == ["gw0"]
    assert cluster.clock.now() >= 1000.0 + cluster.lease  # not before its lease ran out
    assert read(cluster.vd(2), 0, 8) == b"after000"


def test_a_hold_whose_end_is_lost_runs_out_by_itself(cluster: Cluster) -> None:
    inner = cluster.links[0].call

    def call(request: p.Request) -> p.Reply:
        if isinstance(request, p.EndExclusive):
            raise ControllerUnreachable("lost on the way")
        return inner(request)

    cluster.links[0].call = call  # type: ignore[method-assign]
    assert caw(cluster.vd(0), 0, b"0" * 8, b"gw0.gw0.") is None  # the CAW itself is done
    for a in cluster.agents:
        a.start()
    held = Background(lambda: write(cluster.vd(2), 0, b"after"))
    assert held.still_running()
    cluster.controller.start()
    drive(cluster.clock, held, step=0.5)
    assert cluster.controller.fenced == []  # gw0 is well: only its hold ended
    assert cluster.clock.now() >= 1000.0 + cluster.lease
    assert read(cluster.vd(0), 0, 8) == b"afterw0."


def test_an_agent_alone_on_a_vdisk_makes_no_round_trip(cluster: Cluster) -> None:
    cluster.controller.clone("v", "k")
    alone = cluster.agents[2].serve("k")
    write(alone, 0, b"k" * 16)  # the COW fault: private from now on
    calls = CountingCalls(cluster, 2)
    assert caw(alone, 0, b"k" * 16, b"K" * 16) is None
    assert calls.counts == {}
    cluster.agents[1].serve("k")  # not alone any more
    assert caw(alone, 0, b"K" * 16, b"L" * 16) is None
    assert calls["Exclusive"] == 1 and calls["EndExclusive"] == 1
    cluster.agents[1].release("k")  # alone again
    assert caw(alone, 0, b"L" * 16, b"M" * 16) is None
    assert calls["Exclusive"] == 1
    assert cluster.catalog.vdisk("k").read(0, 16) == b"M" * 16


def test_a_newcomer_cannot_write_while_a_local_caw_runs(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a Solo agent must win: another agent registers for its vdisk mid-CAW."""
    cluster.controller.clone("v", "k")
    alone = cluster.agents[0].serve("k")
    write(alone, 0, b"k" * 16)
    pause = Pause(monkeypatch)
    swap = Background(lambda: caw(alone, 0, b"k" * 16, MARK + b"K" * 12))
    assert pause.reached.wait(10)  # compared alone, about to write
    joining = Background(lambda: cluster.agents[1].serve("k"))
    assert joining.still_running()  # Solo(False) waits for the CAW's drain
    pause.release.set()
    assert swap.result() is None
    newcomer = joining.result()
    write(newcomer, 4, b"new")
    assert read(alone, 0, 16) == MARK + b"new" + b"K" * 9


def test_a_thaw_or_a_migration_during_a_caw_keeps_its_hold(cluster: Cluster) -> None:
    """Between the grant and the compare, a freeze and its thaw (lifted around the hold,
    on the agents' whole-table freeze flag) and a migration of the held segment (its
    updates annotated per agent): the others stay held on that segment only."""
    vd = cluster.vd(0)
    real = vd._caw_locally
    seen: list[Background] = []

    def racing(o: int, v: memoryview, w: memoryview, until: float | None) -> int | None:
        cluster.controller.freeze(["v"])
        cluster.controller.thaw(["v"])
        cluster.controller.migrate("v", 0)
        seen.append(Background(lambda: write(cluster.vd(1), 8, b"late")))
        assert seen[0].still_running()
        write(cluster.vd(2), 2 * SEG, b"thawed")  # the rest of the vdisk is thawed
        return real(o, v, w, until)

    vd._caw_locally = racing  # type: ignore[method-assign]
    assert caw(vd, 0, b"0" * 16, b"W" * 16) is None
    seen[0].result()
    assert read(cluster.vd(2), 0, 16) == b"W" * 8 + b"late" + b"W" * 4
    assert read(cluster.vd(1), 2 * SEG, 6) == b"thawed"


def test_a_controller_restart_mid_caw_holds_the_others_until_the_holder_is_back(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old controller's Exclusive died with it: an agent that registers with the new
    one gets every entry NOWRITE (the restart hold) until the predecessor's agents are all
    back -- the holder drains its COMPARE AND WRITE before it registers -- so nobody
    writes the CAW's blocks between its compare and its write."""
    pause = Pause(monkeypatch)
    swap = Background(lambda: caw(cluster.vd(0), 100, b"0" * 512, MARK + b"a" * 508))
    assert pause.reached.wait(10)  # compared under the old controller's hold
    cluster.restart_controller()
    cluster.agents[1].renew_lease()  # session lost: registers again, tables rebuilt
    assert not cluster.controller.ready
    assert all(cluster.vd(1).entry(i) & t.NOWRITE_BIT for i in range(4))
    same = Background(lambda: write(cluster.vd(1), 300, b"late"))
    other = Background(lambda: write(cluster.vd(1), 2 * SEG, b"other"))
    assert same.still_running() and other.still_running()  # held, whatever the block
    assert read(cluster.vd(1), SEG, 4) == b"1111"  # reads go on
    pause.release.set()
    swap.result()  # its EndExclusive may be lost: the new controller never granted it
    cluster.agents[0].renew_lease()  # the holder comes back (drained)
    assert same.still_running()  # gw2 may still be writing through its old tables
    cluster.agents[2].renew_lease()
    assert cluster.controller.ready
    same.result()
    other.result()
    assert read(cluster.vd(2), 100, 512) == MARK + b"a" * 196 + b"late" + b"a" * 308
    assert read(cluster.vd(0), 2 * SEG, 5) == b"other"
    for i in range(3):
        assert not any(cluster.vd(i).entry(j) & t.NOWRITE_BIT for j in range(4))


def test_a_restart_hold_ends_with_the_grace_when_an_agent_never_comes_back(
    cluster: Cluster,
) -> None:
    cluster.restart_controller()
    cluster.agents[1].renew_lease()
    held = Background(lambda: write(cluster.vd(1), 0, b"after"))
    assert held.still_running()
    cluster.controller.start()  # its timer ends the hold at the end of the grace
    drive(cluster.clock, held, step=0.5)
    assert cluster.clock.now() >= 1000.0 + cluster.lease  # not before gw0/gw2's leases
    assert read(cluster.vd(1), 0, 5) == b"after"


def test_lifting_the_restart_hold_does_not_wait_for_a_session_still_saying_hello(
    cluster: Cluster,
) -> None:
    """A session registered but with its command stream not open yet gets the lift when
    the stream opens (its backlog): the registration that ends the hold does not wait for
    its ack (which would fence it, and hold up that registration for the ack timeout)."""
    cluster.restart_controller()
    ghost = cluster.controller.handle(p.Register("gw0", "test", ("v",)))
    assert isinstance(ghost, p.Registered)  # no stream opened for it
    cluster.agents[1].renew_lease()
    last = Background(cluster.agents[2].renew_lease)  # the last one back
    last.result()  # (the fake clock stands still: waiting for an ack would never end)
    assert cluster.controller.ready and cluster.controller.fenced == []
    write(cluster.vd(1), 0, b"after")
    assert read(cluster.vd(2), 0, 5) == b"after"
    cluster.agents[0].renew_lease()  # gw0's next registration ends that session
