"""Each controller command and agent state, in one process on a fake clock:
no-write and invalid freezes, block with drain, delays, freeze timeouts, leases,
fencing of a crashed agent, controller restart, and the live table operations."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from targetvirt import agent as agent_mod
from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.container import FileContainer
from targetvirt.errors import (
    ControllerUnreachable,
    FrozenTimeout,
    InvalidArgument,
    LeaseExpired,
    NotFound,
    SessionLost,
    StoreError,
)
from targetvirt.vdisk import VDisk
from tests.conftest import Layout
from tests.targetvirt.cluster import Background, Cluster, drive, read, write
from tests.targetvirt.engine_model import SEG, check_refcounts


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), vdisks={"v": 8 * SEG, "w": 4 * SEG})
    yield c
    c.close()


def fill(cluster: Cluster, name: str = "v", segments: int = 4) -> None:
    for i in range(segments):
        write(cluster.vd(i % len(cluster.agents), name), i * SEG, bytes([65 + i]) * SEG)


# --- freeze: no-write and invalid --------------------------------------------------------


def test_nowrite_freeze_holds_writes_and_lets_reads_go(cluster: Cluster) -> None:
    fill(cluster)
    cluster.controller.freeze(["v"])
    assert all(cluster.vd(i).entry(0) & t.NOWRITE_BIT for i in range(3))
    assert read(cluster.vd(1), 0, 4) == b"AAAA"  # reads proceed
    held = Background(lambda: write(cluster.vd(0), 10, b"late"))
    assert held.still_running()
    assert cluster.catalog.vdisk("v").read(10, 4) == b"AAAA"
    cluster.controller.thaw(["v"])
    held.result()
    assert read(cluster.vd(2), 10, 4) == b"late"


def test_a_frozen_write_fails_after_its_bound(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), frozen_timeout=5.0, agents=1)
    try:
        write(c.vd(0), 0, b"x")
        c.controller.freeze(["v"])
        held = Background(lambda: write(c.vd(0), 0, b"y"))
        with pytest.raises(FrozenTimeout, match="waited 5 s"):
            drive(c.clock, held, step=1.0)
    finally:
        c.close()


def test_invalid_freeze_makes_agents_fetch(cluster: Cluster) -> None:
    fill(cluster)
    fetches: list[p.Fetch] = []
    inner = cluster.links[1].call

    def call(request: p.Request) -> p.Reply:
        if isinstance(request, p.Fetch):
            fetches.append(request)
        return inner(request)

    cluster.links[1].call = call  # type: ignore[method-assign]
    cluster.controller.freeze(["v"], mode="invalid")
    assert all(cluster.vd(i).entry(3) & t.INVALID_BIT for i in range(3))
    assert read(cluster.vd(1), 3 * SEG, 4) == b"DDDD"  # fetched: the entry comes NOWRITE
    assert fetches and not cluster.vd(1).entry(3) & t.INVALID_BIT
    assert cluster.vd(1).entry(3) & t.NOWRITE_BIT
    held = Background(lambda: write(cluster.vd(1), 3 * SEG, b"held"))
    assert held.still_running()
    cluster.controller.thaw(["v"])
    held.result()
    assert read(cluster.vd(0), 3 * SEG, 4) == b"held"


def test_freeze_with_timeout_thaws_by_itself(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"x")
    cluster.controller.freeze(["v"], timeout=5.0)
    held = Background(lambda: write(cluster.vd(0), 0, b"y"))
    cluster.clock.advance(4.0)
    cluster.controller.tick()
    assert cluster.controller.frozen("v") and held.still_running()
    cluster.controller.start()  # the timer thread does the next tick
    drive(cluster.clock, held, step=0.5)
    assert not cluster.controller.frozen("v")
    assert read(cluster.vd(2), 0, 1) == b"y"


def test_freeze_modes_are_checked(cluster: Cluster) -> None:
    with pytest.raises(InvalidArgument, match="freeze mode"):
        cluster.controller.freeze(["v"], mode="sideways")


# --- block, delay ----------------------------------------------------------------------


def test_block_drains_in_flight_io_and_queues_new_io(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(cluster.vd(0), 0, b"a" * 4096)
    in_write, release = threading.Event(), threading.Event()
    real = agent_mod._pwritev

    def slow_pwritev(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
        if bytes(bufs[0][:4]) == b"slow":
            in_write.set()
            assert release.wait(10)
        return real(fd, bufs, offset)

    monkeypatch.setattr(agent_mod, "_pwritev", slow_pwritev)
    writer = Background(lambda: write(cluster.vd(0), 0, b"slow" * 1024))
    assert in_write.wait(10) and cluster.vd(0).in_flight == 1
    blocker = Background(lambda: cluster.controller.block(["v"]))
    assert blocker.still_running()  # the ack waits for the drain
    release.set()
    writer.result()
    blocker.result()
    assert all(cluster.vd(i).blocked for i in range(3))
    queued = Background(lambda: read(cluster.vd(0), 0, 4))
    assert queued.still_running()  # new I/O queues, reads included
    cluster.controller.unblock(["v"])
    assert queued.result() == b"slow"


def test_delay_expires_by_itself(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"d" * 10)
    cluster.controller.delay("v", 5.0)
    reader = Background(lambda: read(cluster.vd(1), 0, 1))
    writer = Background(lambda: write(cluster.vd(2), 0, b"e"))
    assert reader.still_running() and writer.still_running()
    cluster.clock.advance(4.0)
    assert reader.still_running()
    cluster.clock.advance(2.0)
    assert reader.result() in (b"d", b"e")
    writer.result()
    assert not cluster.vd(1).delayed


def test_delay_cancelled_releases_at_once(cluster: Cluster) -> None:
    cluster.controller.delay("v", 3600.0)
    writer = Background(lambda: write(cluster.vd(0), SEG, b"c"))
    assert writer.still_running()
    cluster.controller.cancel_delay("v")
    writer.result()
    assert read(cluster.vd(1), SEG, 1) == b"c"


def test_a_flush_queued_behind_writes_completes_after_them(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(cluster.vd(0), 0, b"x" * 4096)
    order: list[str] = []
    real_writev, real_flush = FileContainer.writev, agent_mod.Agent.flush

    def writev(self: FileContainer, bufs: Sequence[memoryview], offset: int) -> None:
        real_writev(self, bufs, offset)
        order.append("write")

    def flush(self: agent_mod.Agent) -> None:
        order.append("flush")
        real_flush(self)

    monkeypatch.setattr(FileContainer, "writev", writev)  # the kind the agent opens
    monkeypatch.setattr(agent_mod.Agent, "flush", flush)
    cluster.controller.delay("v", 60.0)
    vd = cluster.vd(0)
    writers = [Background(lambda i=i: write(vd, i * 4096, b"w" * 4096)) for i in range(4)]
    for w in writers:
        assert w.still_running()
    flusher = Background(vd.flush)
    assert flusher.still_running()
    cluster.clock.advance(61.0)
    flusher.result()
    for w in writers:
        w.result()
    assert order == ["write"] * 4 + ["flush"]


# --- leases, fencing, restart ------------------------------------------------------------


def test_lease_expiry_stops_a_partitioned_agents_writes(cluster: Cluster) -> None:
    vd = cluster.vd(0)
    write(vd, 0, b"p" * 4096)
    cluster.links[0].partition()
    cluster.clock.advance(cluster.lease + 0.1)
    with pytest.raises(LeaseExpired):
        write(vd, 0, b"q")
    with pytest.raises(LeaseExpired):
        vd.write_zeroes(0, SEG, True)
    assert read(vd, 0, 4) == b"pppp"  # reads of normal entries go on
    cluster.links[0].partition(False)
    write(vd, 0, b"r")  # the lease comes back with the link
    assert read(cluster.vd(1), 0, 2) == b"rp"


def test_a_partitioned_agent_holds_writes_until_the_controller_is_back(
    cluster: Cluster,
) -> None:
    """With a controller wait, a write past the lease waits (unacknowledged, unapplied)
    instead of failing; it goes through once the controller answers again."""
    vd = cluster.vd(0)
    cluster.agents[0].controller_wait = 20.0
    write(vd, 0, b"p" * 4096)
    cluster.links[0].partition()
    cluster.clock.advance(cluster.lease + 0.1)
    held = Background(lambda: write(vd, 0, b"q"))
    fault = Background(lambda: write(vd, 3 * SEG, b"f"))  # needs the controller itself
    assert held.still_running() and fault.still_running()
    assert read(vd, 0, 4) == b"pppp"  # reads of mapped entries go on; nothing written
    cluster.clock.advance(15.0)  # within the wait
    assert held.still_running() and fault.still_running()
    assert read(cluster.vd(1), 0, 2) == b"pp"
    cluster.links[0].partition(False)
    held.result()
    fault.result()
    assert read(cluster.vd(1), 0, 2) == b"qp"
    assert read(cluster.vd(2), 3 * SEG, 1) == b"f"


def test_a_write_held_for_the_controller_fails_at_the_bound(cluster: Cluster) -> None:
    vd = cluster.vd(0)
    cluster.agents[0].controller_wait = 20.0
    write(vd, 0, b"p" * 4096)
    cluster.links[0].partition()
    cluster.clock.advance(cluster.lease + 0.1)
    held = Background(lambda: write(vd, 0, b"q"))
    flush = Background(vd.flush)
    assert held.still_running() and flush.still_running()
    cluster.clock.advance(20.1)
    with pytest.raises(LeaseExpired):
        held.result()
    with pytest.raises(LeaseExpired):  # ControllerUnreachable: NOT READY as well
        flush.result()
    assert read(vd, 0, 4) == b"pppp"


def test_describe_tells_the_uuid_without_serving(cluster: Cluster) -> None:
    cluster.catalog.create_vdisk("fresh", "p", SEG)
    info = cluster.agents[0].describe("fresh")
    assert info.uuid == cluster.catalog.vdisk("fresh").uuid != ""
    assert cluster.controller.servers("fresh") == []
    assert cluster.vd(1).uuid == cluster.catalog.vdisk("v").uuid
    with pytest.raises(NotFound):
        cluster.agents[0].describe("nothing")


def test_a_crashed_agent_is_fenced_and_the_controller_goes_on(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"z" * 10)
    dead = cluster.agents[2]
    session = dead.session
    cluster.links[2].crash()
    snap = Background(lambda: cluster.controller.snapshot("v", "s"))
    drive(cluster.clock, snap, step=0.5)
    assert cluster.controller.fenced == ["gw2"]
    # it waited until the dead agent's lease surely ran out
    assert cluster.clock.now() >= 1000.0 + cluster.lease + 0.5
    assert cluster.controller.servers("v") == ["gw0", "gw1"]
    renew = cluster.controller.handle(p.LeaseRenew("gw2", session))
    assert isinstance(renew, p.Refused) and p.ERRORS[renew.code] is SessionLost
    write(cluster.vd(1), 0, b"after")  # the others were thawed
    assert cluster.catalog.vdisk("v@s").read(0, 5) == b"zzzzz"
    assert read(cluster.vd(0), 0, 5) == b"after"


def test_closing_the_controller_abandons_an_operation_waiting_for_a_lease(
    cluster: Cluster,
) -> None:
    """A snapshot waiting for a fenced agent's lease to run out is refused when the
    controller stops, and close() does not hang behind it (it did, on a fake clock that
    nobody advanced: a test teardown after a controller restart stuck for good)."""
    write(cluster.vd(0), 0, b"z" * 10)
    cluster.links[2].crash()
    snap = Background(lambda: cluster.controller.snapshot("v", "s"))
    assert snap.still_running()  # waits for gw2's ack
    cluster.clock.advance(cluster.controller.ack_timeout + 0.5)
    for _ in range(200):
        if cluster.controller.fenced:
            break
        snap.still_running(0.05)
    assert cluster.controller.fenced == ["gw2"]
    assert snap.still_running()  # now for gw2's lease, which the clock never reaches
    Background(cluster.controller.close).result(timeout=10)
    with pytest.raises(ControllerUnreachable, match="stopped"):
        snap.result()


def test_an_agent_that_crashes_while_draining_is_fenced(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(cluster.vd(0), 0, b"a" * 4096)
    in_write, release = threading.Event(), threading.Event()
    real = agent_mod._pwritev

    def stuck_pwritev(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
        if bytes(bufs[0][:5]) == b"stuck":
            in_write.set()
            assert release.wait(10)
        return real(fd, bufs, offset)

    monkeypatch.setattr(agent_mod, "_pwritev", stuck_pwritev)
    writer = Background(lambda: write(cluster.vd(0), 0, b"stuck"))
    assert in_write.wait(10)
    snap = Background(lambda: cluster.controller.snapshot("v", "s"))
    assert snap.still_running()  # gw0 is draining the freeze: it waits for its write
    cluster.links[0].crash()  # ...and dies in the middle of the command
    release.set()
    drive(cluster.clock, snap, step=0.5)
    assert cluster.controller.fenced == ["gw0"]
    writer.result()
    write(cluster.vd(1), 4096, b"others go on")
    assert read(cluster.vd(2), 4096, 12) == b"others go on"


def test_a_fenced_agent_registers_again_and_rebuilds(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"1" * 10)
    cluster.links[1].partition()
    snap = Background(lambda: cluster.controller.snapshot("v", "s"))
    drive(cluster.clock, snap, step=0.5)
    assert cluster.controller.fenced == ["gw1"]
    write(cluster.vd(0), 0, b"2" * 10)  # COW the fenced agent never heard of
    cluster.links[1].partition(False)
    vd = cluster.vd(1)
    before = cluster.agents[1].registrations
    write(vd, 4, b"3")  # lease expired -> renewal refused -> registers again, rebuilds
    assert cluster.agents[1].registrations == before + 1
    assert read(vd, 0, 10) == b"22223" + b"2" * 5
    assert cluster.controller.servers("v") == ["gw0", "gw1", "gw2"]


def test_controller_restart_agents_reconnect_and_rebuild(cluster: Cluster) -> None:
    fill(cluster, segments=3)
    cluster.vd(0).flush()
    ctl = cluster.restart_controller()
    assert not ctl.ready  # three agents of the predecessor may hold leases
    # private entries need no controller: I/O goes on under the old lease
    write(cluster.vd(1), 10, b"old-lease")
    for i, agent in enumerate(cluster.agents):
        agent.renew_lease()  # the session is gone: each registers again and reloads
        assert agent.registrations == 2
        assert read(cluster.vd(i), 0, 4) == b"AAAA"
    assert ctl.ready
    write(cluster.vd(2), 5 * SEG, b"new")  # allocation is allowed again
    assert read(cluster.vd(0), 5 * SEG, 3) == b"new"
    assert read(cluster.vd(0), 10, 9) == b"old-lease"


def test_restarted_controller_waits_out_absent_agents_leases(cluster: Cluster) -> None:
    fill(cluster, segments=1)
    cluster.vd(0).flush()
    cluster.links[2].crash()
    ctl = cluster.restart_controller()
    cluster.agents[0].renew_lease()
    cluster.agents[1].renew_lease()
    assert not ctl.ready  # gw2 has not come back
    fault = Background(lambda: write(cluster.vd(0), 6 * SEG, b"wait"))
    assert fault.still_running()  # the restart hold, then the fault, wait for gw2's lease
    for i in (0, 1):
        cluster.agents[i].start()  # their leases go on meanwhile
    ctl.start()  # the timer ends the restart hold at the end of the grace
    drive(cluster.clock, fault, step=1.0)
    assert ctl.ready
    assert cluster.catalog.vdisk("v").read(6 * SEG, 4) == b"wait"


# --- user freezes across a controller restart -------------------------------------------


def rejoin(cluster: Cluster) -> None:
    """Every agent finds its session gone and registers with the new controller."""
    for agent in cluster.agents:
        agent.renew_lease()


def stored_freeze(cluster: Cluster, name: str) -> object:
    """The freeze in the vdisk's record as the store holds it (None: not frozen)."""
    vid = cluster.catalog.vdisk(name).vid
    return cluster.catalog.store.load().records["vdisk"][vid].get("freeze")


@pytest.mark.parametrize("mode", ["nowrite", "invalid"])
def test_a_freeze_survives_a_controller_restart(cluster: Cluster, mode: str) -> None:
    fill(cluster)
    cluster.controller.freeze(["v"], mode=mode)
    ctl = cluster.restart_controller(down=2.0)
    assert ctl.frozen("v") and not ctl.frozen("w")
    rejoin(cluster)
    assert all(a.registrations == 2 for a in cluster.agents)
    assert all(cluster.vd(i).entry(0) & t.NOWRITE_BIT for i in range(3))
    assert read(cluster.vd(1), 0, 4) == b"AAAA"  # reads go on
    held = Background(lambda: write(cluster.vd(0), 10, b"late"))
    assert held.still_running()  # the re-registered agent still holds the write
    assert cluster.catalog.vdisk("v").read(10, 4) == b"AAAA"
    write(cluster.vd(2, "w"), 0, b"free")  # the other vdisk was never frozen
    ctl.thaw(["v"])
    held.result()
    assert read(cluster.vd(1), 10, 4) == b"late"
    assert stored_freeze(cluster, "v") is None


def test_a_freeze_timeout_is_counted_across_a_restart(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"x")
    cluster.controller.freeze(["v"], timeout=10.0)
    assert stored_freeze(cluster, "v") == {"mode": "nowrite", "until": cluster.wallclock() + 10}
    held = Background(lambda: write(cluster.vd(0), 0, b"y"))
    cluster.clock.advance(4.0)
    # 3 s down: 7 s of the 10 gone.  The new controller's clock reads from another
    # origin (cluster.ShiftedClock): only the wall-clock deadline can carry over.
    ctl = cluster.restart_controller(down=3.0)
    rejoin(cluster)
    cluster.clock.advance(2.5)
    ctl.tick()
    assert ctl.frozen("v") and held.still_running()
    cluster.clock.advance(1.0)  # 10.5 s
    ctl.tick()
    assert not ctl.frozen("v")
    held.result()
    assert read(cluster.vd(2), 0, 1) == b"y"
    assert stored_freeze(cluster, "v") is None  # the timeout's thaw is durable too


def test_a_freeze_whose_timeout_passed_while_down_thaws_at_once(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"x")
    cluster.controller.freeze(["v", "w"], timeout=5.0)
    cluster.controller.freeze(["w"])  # frozen again, now until thawed
    cluster.clock.advance(2.0)
    ctl = cluster.restart_controller(down=4.0)
    assert not ctl.frozen("v") and ctl.frozen("w")  # no tick needed
    assert stored_freeze(cluster, "v") is None
    assert stored_freeze(cluster, "w") == {"mode": "nowrite", "until": None}
    rejoin(cluster)
    write(cluster.vd(1), 0, b"z")
    assert read(cluster.vd(2), 0, 1) == b"z"


def test_a_thaw_is_durable(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"x")
    cluster.controller.freeze(["v", "w"], mode="invalid")
    cluster.controller.thaw(["v"])
    ctl = cluster.restart_controller()
    assert not ctl.frozen("v") and ctl.frozen("w")
    rejoin(cluster)
    write(cluster.vd(1), 0, b"z")  # thawed before the restart: stays thawed
    assert read(cluster.vd(2), 0, 1) == b"z"
    ctl.thaw(["w"])
    assert not cluster.restart_controller().frozen("w")


def test_a_deleted_frozen_vdisk_leaves_no_freeze_behind(cluster: Cluster) -> None:
    ctl = cluster.controller
    ctl.clone("v", "k")
    ctl.snapshot("v", "s")
    ctl.freeze(["k", "v"])
    ctl.snapshot("v", "s2")  # a copy of a frozen vdisk is not frozen itself
    ctl.delete("k")  # the freeze goes with the vdisk record, in the same commit
    cluster.catalog.create_vdisk("k", "p", SEG)  # may even get the old id
    ctl = cluster.restart_controller()
    assert [n for n in cluster.catalog.vdisks if ctl.frozen(n)] == ["v"]


def test_a_freeze_the_store_cannot_record_is_not_applied(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(cluster.vd(0), 0, b"x")

    def broken(txn: object) -> None:
        raise StoreError("the metadata store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(cluster.catalog.store, "commit", broken)
        with pytest.raises(StoreError):
            cluster.controller.freeze(["v"])
        assert not cluster.controller.frozen("v")
        write(cluster.vd(1), 0, b"y")  # no agent heard of it
    cluster.catalog.commit()  # nothing of the failed freeze was left staged
    assert not cluster.restart_controller().frozen("v")


def test_a_thaw_the_store_cannot_record_keeps_the_freeze(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.controller.freeze(["v"])

    def broken(txn: object) -> None:
        raise StoreError("the metadata store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(cluster.catalog.store, "commit", broken)
        with pytest.raises(StoreError):
            cluster.controller.thaw(["v"])
    assert cluster.controller.frozen("v")
    assert cluster.vd(0).entry(0) & t.NOWRITE_BIT
    cluster.catalog.commit()
    assert cluster.restart_controller().frozen("v")


def test_a_timeout_thaws_even_if_the_store_cannot_record_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.controller.freeze(["v"], timeout=5.0)

    def broken(txn: object) -> None:
        raise StoreError("the metadata store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(cluster.catalog.store, "commit", broken)
        cluster.clock.advance(6.0)
        cluster.controller.tick()
    assert not cluster.controller.frozen("v")
    write(cluster.vd(0), 0, b"y")
    # the store still holds the freeze, with a deadline that has passed: thawed at once
    assert stored_freeze(cluster, "v") is not None
    assert not cluster.restart_controller().frozen("v")


def test_a_timeout_thaw_the_store_missed_is_recorded_later(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = cluster.controller
    ctl.freeze(["v", "w"], timeout=5.0)

    def broken(txn: object) -> None:
        raise StoreError("the metadata store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(cluster.catalog.store, "commit", broken)
        cluster.clock.advance(6.0)
        ctl.tick()
        ctl.tick()  # still failing: still to be recorded
    ctl.freeze(["w"])  # frozen again meanwhile: that freeze stands
    assert stored_freeze(cluster, "v") is not None
    ctl.tick()
    assert stored_freeze(cluster, "v") is None
    assert stored_freeze(cluster, "w") == {"mode": "nowrite", "until": None}


# --- live snapshots and table operations -------------------------------------------------


def test_live_snapshot_clone_and_group_record_freeze_windows(cluster: Cluster) -> None:
    fill(cluster)
    write(cluster.vd(1, "w"), 0, b"W" * 100)
    ctl = cluster.controller
    ctl.snapshot("v", "s1", mode="invalid")
    ctl.clone("v", "k1")
    ctl.group_snapshot(["v", "w"], "g1")
    assert [w.vdisks for w in ctl.windows] == [("v",), ("v",), ("v", "w")]
    assert [w.mode for w in ctl.windows] == ["invalid", "nowrite", "nowrite"]
    assert all(w.started <= w.frozen <= w.thawed for w in ctl.windows)
    for name in ("v@s1", "k1", "v@g1"):
        assert cluster.catalog.vdisk(name).read(0, SEG * 4) == cluster.catalog.vdisk("v").read(
            0, SEG * 4
        )
    assert cluster.catalog.vdisk("w@g1").read(0, 100) == b"W" * 100
    write(cluster.vd(2, "w"), 0, b"X")
    assert cluster.catalog.vdisk("w@g1").read(0, 1) == b"W"
    check_refcounts(cluster.catalog)


def test_agents_time_how_long_a_freeze_held_their_writes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What bench.controller reports as a live snapshot's window: per agent, from the
    freeze stopping writes to the thaw admitting them, the durable copy in between."""
    fill(cluster)
    ctl = cluster.controller
    ctl.freeze(["v"])
    cluster.clock.advance(3.0)
    ctl.thaw(["v"])
    real = Catalog.snapshot

    def slow_snapshot(self: Catalog, *a: object, **k: object) -> VDisk:
        cluster.clock.advance(0.5)  # the durable copy, inside the window
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Catalog, "snapshot", slow_snapshot)
    ctl.snapshot("v", "s1")
    ctl.freeze(["w"])  # another vdisk: its own record
    ctl.thaw(["w"])
    assert [list(cluster.vd(i).freezes_held) for i in range(3)] == [[3.0, 0.5]] * 3
    assert [list(cluster.vd(i, "w").freezes_held) for i in range(3)] == [[0.0]] * 3


def test_live_migration_holds_writes_to_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: Layout
) -> None:
    c = Cluster(str(tmp_path), containers=2, location=layout)
    try:
        fill(c, segments=2)
        c.controller.snapshot("v", "s")
        snap_agent = c.agents[0].serve("v@s")
        seen: list[int] = []
        real = Catalog.migrate

        def migrate(self: Catalog, vdisk: VDisk, index: int, *a: object, **k: object) -> int:
            seen.extend(c.vd(i).entry(index) for i in range(3))
            seen.append(snap_agent.entry(index))
            return real(self, vdisk, index, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(Catalog, "migrate", migrate)
        old = c.catalog.vdisk("v").table[1]
        new = c.controller.migrate("v", 1)
        assert t.cid_of(new) != t.cid_of(old)
        assert seen and all(e & t.NOWRITE_BIT for e in seen)  # held everywhere it is mapped
        for i in range(3):
            assert t.location(c.vd(i).entry(1)) == new and not c.vd(i).entry(1) & t.NOWRITE_BIT
        assert t.location(snap_agent.entry(1)) == new  # shared: the snapshot moved too
        assert read(c.vd(2), SEG, 4) == b"BBBB" and read(snap_agent, SEG, 4) == b"BBBB"
        write(c.vd(1), SEG, b"after")
        assert read(snap_agent, SEG, 5) == b"BBBBB"
    finally:
        c.close()


def test_live_evacuation(tmp_path: Path, layout: Layout) -> None:
    c = Cluster(str(tmp_path), containers=2, location=layout)
    try:
        c.catalog.pool("p").draining.add(1)  # fill container 0 first
        fill(c, segments=6)
        c.catalog.pool("p").draining.discard(1)
        moved = c.controller.evacuate("p", 0)
        assert moved == 6
        for i in range(3):
            for s in range(6):
                assert t.cid_of(c.vd(i).entry(s)) == 1
                assert read(c.vd(i), s * SEG, 2) == bytes([65 + s]) * 2
        c.catalog.remove_container("p", 0)
        check_refcounts(c.catalog)
    finally:
        c.close()


def test_live_rollback_resize_flatten_delete(cluster: Cluster) -> None:
    ctl = cluster.controller
    fill(cluster, segments=2)
    ctl.snapshot("v", "s")
    write(cluster.vd(0), 0, b"new")
    ctl.resize("v", 10 * SEG + 512)
    assert all(cluster.vd(i).size == 10 * SEG + 512 for i in range(3))
    write(cluster.vd(1), 10 * SEG, b"tail")
    ctl.rollback("v", "s")
    for i in range(3):
        assert cluster.vd(i).size == 8 * SEG
        assert read(cluster.vd(i), 0, 3) == b"AAA"
    ctl.resize("v", 3 * SEG + 100)
    assert read(cluster.vd(2), SEG, 2) == b"BB" and cluster.vd(2).size == 3 * SEG + 100
    assert ctl.flatten("v") == 2
    assert all(not cluster.vd(i).entry(0) & t.SHARED for i in range(3))
    write(cluster.vd(2), 0, b"flat")  # private: no fault needed, and the snapshot keeps A
    assert cluster.catalog.vdisk("v@s").read(0, 4) == b"AAAA"
    ctl.delete("v", recursive=True)
    assert ctl.servers("v") == [] and "v" not in cluster.agents[0].vdisks
    check_refcounts(cluster.catalog)


def test_a_reply_overtaken_by_a_command_is_not_installed(cluster: Cluster) -> None:
    vd = cluster.vd(0)
    write(vd, 0, b"x")
    with vd._cond:
        epoch = vd._epoch
    cluster.controller.freeze(["v"])  # a command touching entry 0 arrives first
    stale = array("Q", [t.location(vd.entry(0))])  # the older reply: NORMAL, no NOWRITE
    assert not vd._install(0, stale, epoch)
    assert vd.entry(0) & t.NOWRITE_BIT
    cluster.controller.thaw(["v"])
    with vd._cond:
        epoch = vd._epoch
    write(cluster.vd(1), 7 * SEG, b"y")  # an update about another entry does not conflict
    assert vd._install(0, array("Q", [vd.entry(0)]), epoch)


def test_a_live_copy_freezes_and_marks_shared_in_one_command_per_agent(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(cluster)
    seen: list[tuple[str, str]] = []
    real = agent_mod.AgentVDisk.apply

    def apply(self: agent_mod.AgentVDisk, cmd: p.Command) -> None:
        seen.append((cmd.vdisk, type(cmd).__name__))
        real(self, cmd)

    monkeypatch.setattr(agent_mod.AgentVDisk, "apply", apply)
    ctl = cluster.controller
    ctl.freeze(["w"])  # a user freeze stays: that source only gets the marks
    seen.clear()
    ctl.group_snapshot(["v", "w"], "g")
    assert sorted(seen) == sorted(
        [("v", "FreezeShared")] * 3 + [("w", "MarkShared")] * 3 + [("v", "SetState")] * 3
    )
    for i in range(3):
        assert cluster.vd(i).entry(0) & t.SHARED and not cluster.vd(i).entry(0) & t.NOWRITE_BIT
        assert cluster.vd(i, "w").entry(0) & t.NOWRITE_BIT  # still frozen by the user
    write(cluster.vd(1), 0, b"new")  # a copy-on-write: the snapshot keeps its data
    assert cluster.catalog.vdisk("v@g").read(0, 4) == b"AAAA"
    assert read(cluster.vd(2), 0, 4) == b"newA"
    ctl.thaw(["w"])
    check_refcounts(cluster.catalog)
