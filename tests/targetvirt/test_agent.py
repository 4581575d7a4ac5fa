"""The agent's data path: local resolution, faults and fetches, coherence between agents,
COMPARE AND WRITE, zeroing and unmapping, flush."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetvirt import agent as agent_module
from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.agent import AgentVDisk
from targetvirt.container import Container
from targetvirt.errors import ContainerIOError, InvalidArgument, NotFound, ReadOnly, ScsiError
from tests.conftest import Layout
from tests.targetvirt.cluster import Background, Cluster, read, write
from tests.targetvirt.engine_model import SEG, data_for


class CountingCalls:
    """Counts the requests an agent sends, by type."""

    def __init__(self, cluster: Cluster, agent: int) -> None:
        self.counts: dict[str, int] = {}
        link = cluster.links[agent]
        inner = link.call

        def call(request: p.Request) -> p.Reply:
            name = type(request).__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return inner(request)

        link.call = call  # type: ignore[method-assign]

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)


@pytest.fixture
def cluster(tmp_path: Path, layout: Layout) -> Iterator[Cluster]:
    """Every test runs on files, on RADOS, and on both (agents open RADOS containers from
    the location the controller's ContainerInfo carries)."""
    c = Cluster(str(tmp_path), vdisks={"v": 8 * SEG, "w": 3 * SEG + 1000}, containers=2,
                location=layout)  # fmt: skip
    yield c
    c.close()


def test_agents_open_every_container_kind_themselves(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"k" * (3 * SEG))  # segments in both containers
    pool = cluster.catalog.pool("p")
    assert {t.cid_of(cluster.vd(1).entry(i)) for i in range(3)} == {0, 1}
    for agent in cluster.agents:
        opened = {cid: c for (_, cid), c in agent._containers.items()}
        assert sorted(opened) == [0, 1]
        for cid, c in opened.items():
            mine = pool.containers[cid]
            assert c is not mine and type(c) is type(mine)
            assert (c.kind, c.path, c.uuid) == (mine.kind, mine.path, mine.uuid)
            assert (c.fd == -1) == (c.kind == "rados")  # RADOS: the fd fast path never applies
    assert read(cluster.vd(2), SEG - 2, 4) == b"kkkk"


def test_io_on_private_entries_needs_no_round_trip(cluster: Cluster) -> None:
    vd = cluster.vd(0)
    write(vd, 0, b"a" * 4096)  # allocates through the controller
    calls = CountingCalls(cluster, 0)
    for i in range(SEG // 4096):
        write(vd, i * 4096, bytes([i]) * 4096)
        assert read(vd, i * 4096, 4096) == bytes([i]) * 4096
    assert read(vd, 5 * SEG, 4096) == bytes(4096)  # unallocated reads zeros, locally
    assert calls.counts == {}


def test_the_fast_path_tries_a_syscall_only_on_containers_with_a_file(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RADOS entry is not tried with preadv/pwritev on fd -1 (a failing syscall and an
    exception per command, paid twice when the worker retries): the fast path declines
    at once, and the full path serves it."""
    vd = cluster.vd(0)
    write(vd, 0, b"a" * (3 * SEG))  # segments in both containers
    calls: list[int] = []

    def counted(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, bufs: list[memoryview], offset: int) -> int:
            calls.append(fd)
            return real(fd, bufs, offset)

        return call

    monkeypatch.setattr(agent_module, "_preadv", counted(os.preadv))
    monkeypatch.setattr(agent_module, "_pwritev", counted(os.pwritev))
    for i in range(3):
        fd = vd._containers[t.cid_of(vd.entry(i))].fd
        buf = bytearray(4096)
        calls.clear()
        served = vd.try_read_into(i * SEG, [memoryview(buf)])
        assert served == (fd >= 0) and calls == ([fd] if fd >= 0 else [])
        calls.clear()
        assert vd.try_write_from(i * SEG, [memoryview(b"b" * 4096)]) == (fd >= 0)
        assert calls == ([fd] if fd >= 0 else [])
        calls.clear()
        write(vd, i * SEG, b"c" * 4096)
        assert read(vd, i * SEG, 4096) == b"c" * 4096


class CountedLock:
    """A lock that counts its acquisitions (wraps the vdisk's own)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.acquired = 0

    def acquire(self, *a: Any) -> bool:
        self.acquired += 1
        return bool(self.inner.acquire(*a))

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


transfer = st.tuples(
    st.booleans(),  # write
    st.integers(0, 6 * SEG // 512).map(lambda b: b * 512) | st.integers(-600, 6 * SEG + 600),
    st.sampled_from([4096, 4096, 512, 8192, SEG, 2 * SEG]) | st.integers(1, SEG + 1),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(transfer, max_size=12))
def test_a_batch_does_exactly_the_transfers_the_fast_path_may_do(
    batch: list[tuple[bool, int, int]],
) -> None:
    """``try_batch`` against a byte model: a transfer is done (True, data moved, in batch
    order) exactly when it lies in one mapped segment of the vdisk and, for a write, a
    private one; the others touch nothing.  The whole batch takes the lock twice."""
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(tmp, vdisks={"v": 6 * SEG}, agents=1)
        try:
            vd = c.vd(0)
            model = bytearray(6 * SEG)
            for i in range(4):  # 0, 1 shared with a snapshot; 2, 3 private; 4, 5 unmapped
                if i == 2:
                    c.controller.snapshot("v", "s")
                model[i * SEG : (i + 1) * SEG] = data_for(i, SEG)
                write(vd, i * SEG, data_for(i, SEG))
            items = []
            for n, (is_write, offset, length) in enumerate(batch):
                buf = data_for(100 + n, length) if is_write else b"\xee" * length
                items.append((is_write, offset, memoryview(bytearray(buf))))
            lock = vd._lock = CountedLock(vd._lock)  # type: ignore[assignment]
            ok = vd.try_batch(items)
            want = []
            for is_write, offset, buf in items:
                end, seg = offset + buf.nbytes, offset // SEG
                fast = offset >= 0 and end <= 6 * SEG and (end - 1) // SEG == seg
                fast = fast and seg in ((2, 3) if is_write else (0, 1, 2, 3))
                want.append(fast)
                if is_write and fast:
                    model[offset:end] = buf
                elif not is_write:  # what it read then, or untouched
                    assert bytes(buf) == (model[offset:end] if fast else b"\xee" * buf.nbytes)
            assert ok == want
            assert lock.acquired == (2 if any(want) else 1)
            assert read(vd, 0, 6 * SEG) == bytes(model)
        finally:
            c.close()


def test_io_needing_nothing_from_the_controller_takes_no_grant(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On every container kind: a file's entries go by preadv/pwritev, a RADOS entry's
    by the container's own call (the object path), neither through the grant machinery
    (gate, tickets, extent list) once the segment is mapped and private."""
    vd = cluster.vd(0)
    write(vd, 0, b"a" * (3 * SEG))  # segments in both containers
    admitted: list[int] = []
    real = agent_module.AgentVDisk._admit

    def admit(self: agent_module.AgentVDisk, offset: int, *a: object) -> object:
        admitted.append(offset)
        return real(self, offset, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_module.AgentVDisk, "_admit", admit)
    for i in range(3):
        write(vd, i * SEG + 4096, bytes([i + 1]) * 4096)
        assert read(vd, i * SEG + 4096, 4096) == bytes([i + 1]) * 4096
    assert admitted == []
    write(vd, 0, b"f", fua=True)  # FUA is not the fast path's
    assert admitted == [0]
    # the handler sizes its worker pool by this: RADOS I/O holds a worker a round trip
    kinds = {c.kind for c in vd._containers.values()}
    assert vd.waits_on_network == ("rados" in kinds), kinds


@pytest.fixture
def rados_cluster(tmp_path: Path, rados_location: str) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), vdisks={"v": 4 * SEG}, location=lambda i: rados_location)
    yield c
    c.close()


def written_segment(cluster: Cluster) -> tuple[AgentVDisk, Container]:
    """Agent 0's copy of v with its first segment written (b"a"), and that segment's
    container."""
    vd = cluster.vd(0)
    write(vd, 0, b"a" * 4096)
    return vd, vd._containers[t.cid_of(vd.entry(0))]


@pytest.mark.ceph
def test_a_freeze_waits_for_object_io_in_flight(
    rados_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object path counts its I/O in flight: a freeze acks only once it is done."""
    vd, container = written_segment(rados_cluster)
    entered, may_go = threading.Event(), threading.Event()
    real = container.writev

    def slow_writev(*a: object) -> None:
        entered.set()
        may_go.wait(30.0)
        real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(container, "writev", slow_writev)
    writing = Background(lambda: write(vd, 4096, b"b" * 4096))
    assert entered.wait(10.0)
    freezing = Background(lambda: rados_cluster.controller.freeze(["v"]))
    assert freezing.still_running()  # the agent's drain waits for the write
    may_go.set()
    writing.result()
    freezing.result()
    assert rados_cluster.catalog.vdisk("v").read(4096, 4096) == b"b" * 4096
    rados_cluster.controller.thaw(["v"])


@pytest.mark.ceph
def test_a_failed_object_io_is_done_again_and_named_by_the_slow_path(
    rados_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    vd, container = written_segment(rados_cluster)
    calls: list[int] = []

    def failing_readv(bufs: object, offset: int) -> None:
        calls.append(offset)
        raise ContainerIOError("injected: the OSD is gone")

    monkeypatch.setattr(container, "readv", failing_readv)
    with pytest.raises(ContainerIOError, match="injected"):
        read(vd, 0, 4096)
    assert len(calls) == 2  # the object path, then the slow path that reports it
    assert vd._active == [0, 0]  # nothing left counted in flight
    monkeypatch.undo()
    assert read(vd, 0, 4096) == b"a" * 4096


class Ended:
    """A ``done`` callback for start_io: remembers what it was told, once."""

    def __init__(self) -> None:
        self.oks: list[bool] = []
        self.event = threading.Event()

    def __call__(self, ok: bool) -> None:
        self.oks.append(ok)
        self.event.set()

    def wait(self) -> bool:
        assert self.event.wait(30.0), "start_io never called done"
        (ok,) = self.oks
        return ok


@pytest.mark.ceph
def test_started_object_io_reads_and_writes_without_waiting(rados_cluster: Cluster) -> None:
    """start_io (the ring thread's path on RADOS) does what read/write do, calling
    back from librados's thread; it declines, starting nothing, where the fast path
    does not apply (an unmapped segment, a range across two segments, FUA's caller)."""
    vd, _ = written_segment(rados_cluster)
    data = os.urandom(8192)
    ended = Ended()
    assert vd.start_io(4096, [memoryview(data[:4096]), memoryview(data[4096:])], True, ended)
    assert ended.wait() and read(vd, 4096, 8192) == data
    buf = bytearray(b"?" * 12288)
    ended = Ended()
    assert vd.start_io(0, [memoryview(buf)], False, ended)
    assert ended.wait() and bytes(buf) == b"a" * 4096 + data
    ended = Ended()
    assert not vd.start_io(SEG, [memoryview(bytearray(4096))], False, ended)  # unmapped
    assert not vd.start_io(SEG - 512, [memoryview(bytearray(1024))], False, ended)  # two
    assert ended.oks == [] and vd.in_flight == 0


@pytest.mark.ceph
def test_a_freeze_waits_for_started_object_io(
    rados_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started I/O counts as in flight until librados calls back: a freeze acks after."""
    vd, container = written_segment(rados_cluster)
    landed: list[tuple[Callable[[bool], None], bool]] = []
    arrived = threading.Event()
    real = container.start_io

    def held_back(
        bufs: list[memoryview], offset: int, write: bool, done: Callable[[bool], None]
    ) -> bool:
        def hold(ok: bool) -> None:  # librados is done; the agent is told when the test says
            landed.append((done, ok))
            arrived.set()

        return real(bufs, offset, write, hold)

    monkeypatch.setattr(container, "start_io", held_back)
    ended = Ended()
    assert vd.start_io(4096, [memoryview(b"b" * 4096)], True, ended)
    assert arrived.wait(30.0)
    assert vd.in_flight == 1 and ended.oks == []
    freezing = Background(lambda: rados_cluster.controller.freeze(["v"]))
    assert freezing.still_running()  # the agent's drain waits for the write
    done, ok = landed[0]
    done(ok)
    assert ended.oks == [True]
    freezing.result()
    assert rados_cluster.catalog.vdisk("v").read(4096, 4096) == b"b" * 4096
    rados_cluster.controller.thaw(["v"])


def test_a_write_faults_once_then_goes_straight_through(cluster: Cluster) -> None:
    calls = CountingCalls(cluster, 1)
    vd = cluster.vd(1)
    write(vd, SEG + 10, b"x" * 100)
    write(vd, SEG + 5000, b"y" * 100)
    assert calls["Fault"] == 1
    assert cluster.catalog.vdisk("v").read(SEG + 10, 4) == b"xxxx"


def test_other_agents_see_new_mappings_and_cow_at_once(cluster: Cluster) -> None:
    a, b, c = (cluster.vd(i) for i in range(3))
    write(a, 0, b"1" * SEG)
    assert read(b, 0, 8) == b"1" * 8  # b got the new entry pushed before a's fault returned
    cluster.controller.snapshot("v", "s")
    for vd in (a, b, c):
        assert vd.entry(0) & t.SHARED
    write(b, 100, b"2" * 10)  # COW through the controller
    assert read(a, 95, 20) == b"1" * 5 + b"2" * 10 + b"1" * 5
    assert read(c, 95, 20) == b"1" * 5 + b"2" * 10 + b"1" * 5
    assert cluster.catalog.vdisk("v@s").read(95, 20) == b"1" * 20
    assert not a.entry(0) & t.SHARED


def test_copy_mode_cow_repoints_the_snapshot_for_agents_serving_it(
    tmp_path: Path, layout: Layout
) -> None:
    c = Cluster(str(tmp_path), cow="copy", agents=2, containers=2, location=layout)
    try:
        a = c.vd(0)
        write(a, 0, b"o" * SEG)
        c.controller.snapshot("v", "s")
        snap = c.agents[1].serve("v@s")
        assert read(snap, 0, 4) == b"oooo"
        old = snap.entry(0)
        write(a, 0, b"n" * 4)  # copy mode: the snapshot's entry moves to the copy
        assert t.location(snap.entry(0)) != t.location(old)
        assert read(snap, 0, 8) == b"oooooooo"
        assert read(c.vd(1), 0, 8) == b"nnnnoooo"
    finally:
        c.close()


def test_multi_segment_and_vectored_io(cluster: Cluster) -> None:
    a, b = cluster.vd(0), cluster.vd(1)
    data = data_for(1, 3 * SEG)
    bufs = [memoryview(data)[: SEG // 2], memoryview(data)[SEG // 2 : 2 * SEG + 7]]
    bufs.append(memoryview(data)[2 * SEG + 7 :])
    a.write_from(SEG - 300, bufs, False)
    out = bytearray(3 * SEG)
    view = memoryview(out)
    b.read_into(SEG - 300, [view[:1000], view[1000:]])
    assert out == data


def test_fua_and_flush_make_data_and_mappings_durable(cluster: Cluster) -> None:
    a = cluster.vd(0)
    write(a, 0, b"d" * 4096, fua=True)
    commits = cluster.catalog.commits
    write(a, SEG, b"e" * 4096)
    a.flush()
    assert cluster.catalog.commits == commits + 1
    cluster.restart_controller()
    assert cluster.catalog.vdisk("v").read(0, 4) == b"dddd"
    assert cluster.catalog.vdisk("v").read(SEG, 4) == b"eeee"


def test_write_zeroes_unmaps_whole_segments_and_zeroes_partial_ones(cluster: Cluster) -> None:
    a, b = cluster.vd(0), cluster.vd(1)
    write(a, 0, b"q" * (4 * SEG))
    free = cluster.catalog.pool("p").free_segments()
    a.write_zeroes(SEG // 2, 2 * SEG, True)
    cluster.catalog.commit()
    assert cluster.catalog.pool("p").free_segments() == free + 1
    expect = b"q" * (SEG // 2) + bytes(2 * SEG) + b"q" * (3 * SEG // 2)
    assert read(b, 0, 4 * SEG) == expect  # b's entry for the freed segment was dropped too
    assert b.mapped_ranges(0, 4 * SEG) == [
        (0, SEG, True),
        (SEG, SEG, False),
        (2 * SEG, 2 * SEG, True),
    ]
    a.write_zeroes(5 * SEG, SEG, False)  # WRITE SAME without UNMAP: allocated, zeros
    assert b.mapped_ranges(5 * SEG, SEG) == [(5 * SEG, SEG, True)]
    assert read(b, 5 * SEG, SEG) == bytes(SEG)


def test_unaligned_vdisk_tail(cluster: Cluster) -> None:
    w = cluster.vd(2, "w")
    size = 3 * SEG + 1000
    assert w.size == size
    write(w, size - 1000, b"t" * 1000)
    assert read(cluster.vd(0, "w"), size - 1000, 1000) == b"t" * 1000
    w.write_zeroes(2 * SEG, SEG + 1000, True)  # the short last segment counts as whole
    assert cluster.vd(1, "w").mapped_ranges(2 * SEG, SEG + 1000) == [(2 * SEG, SEG + 1000, False)]
    with pytest.raises(ScsiError):
        write(w, size - 10, b"x" * 11)
    with pytest.raises(ScsiError):
        read(w, -1, 1)


def test_compare_and_write(cluster: Cluster) -> None:
    a, b = cluster.vd(0), cluster.vd(1)
    write(a, 8192, b"abcd" * 128)
    assert a.compare_and_write(8192, memoryview(b"abcd" * 128), memoryview(b"Z" * 512)) is None
    assert read(b, 8192, 512) == b"Z" * 512
    verify = bytearray(b"Z" * 512)
    verify[77] = 0
    assert b.compare_and_write(8192, memoryview(verify), memoryview(b"Q" * 512)) == 77
    assert read(a, 8192, 512) == b"Z" * 512
    with pytest.raises(InvalidArgument):
        a.compare_and_write(0, memoryview(b"a"), memoryview(b"ab"))


def test_snapshots_are_served_read_only(cluster: Cluster) -> None:
    write(cluster.vd(0), 0, b"s" * 10)
    cluster.controller.snapshot("v", "snap")
    snap = cluster.agents[2].serve("v@snap")
    assert snap.readonly and read(snap, 0, 10) == b"s" * 10
    with pytest.raises(ReadOnly):
        write(snap, 0, b"x")
    with pytest.raises(ReadOnly):
        snap.write_zeroes(0, SEG, True)
    with pytest.raises(NotFound):
        cluster.agents[2].serve("nope")


def test_a_released_vdisk_fails_its_io(cluster: Cluster) -> None:
    vd = cluster.vd(0)
    cluster.agents[0].release("v")
    with pytest.raises(NotFound):
        read(vd, 0, 10)
    assert cluster.controller.servers("v") == ["gw1", "gw2"]


@pytest.fixture
def one_container(tmp_path: Path) -> Iterator[Cluster]:
    """One file container of 48 segments (thresholds below count in its segments)."""
    c = Cluster(str(tmp_path), vdisks={"v": 8 * SEG, "w": 3 * SEG + 1000})
    yield c
    c.close()


def test_every_agent_serving_a_vdisk_of_the_pool_hears_of_its_soft_threshold(
    one_container: Cluster,
) -> None:
    cluster = one_container
    heard: list[tuple[int, str]] = []
    for i in range(3):
        for name in ("v", "w"):
            cluster.vd(i, name).soft_threshold_listeners.append(
                lambda i=i, name=name: heard.append((i, name))
            )
    cluster.catalog.set_threshold("p", 10)  # of 48 segments: reached at the 5th
    for i in range(4):
        write(cluster.vd(0), i * SEG, b"x")
    assert heard == []
    write(cluster.vd(1, "w"), 0, b"y")  # the fault that allocates it tells every agent
    assert sorted(heard) == [(i, n) for i in range(3) for n in ("v", "w")]
    write(cluster.vd(2), 5 * SEG, b"z")
    assert len(heard) == 6  # once per crossing
    cluster.catalog.set_threshold("p", 50)
    cluster.catalog.set_threshold("p", 5)  # reached at once: the timer's tick tells them
    assert len(heard) == 6
    cluster.controller.tick()
    assert len(heard) == 12
