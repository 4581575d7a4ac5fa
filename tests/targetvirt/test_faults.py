"""Faults at the host level, through the real layers: CDB bytes into the SCSI emulation,
whose backend is the engine's vdisk or an agent's vdisk beside a controller.

Failing container: a container file whose chosen ranges fail with EIO (fault injection at
the descriptor level, so every layer meets the error as it would meet a bad disk).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from targetvirt import table as t
from targetvirt.errors import ContainerWriteError, InvalidArgument
from tests.targetvirt.engine_model import SEG, check_refcounts, open_catalog
from tests.targetvirt.faults import (
    GOOD,
    MEDIUM_READ,
    MEDIUM_WRITE,
    READ,
    SOFT_THRESHOLD,
    SPACE_ALLOCATION_FAILED,
    STACKS,
    SYNC,
    WRITE,
    FaultyFiles,
    ScsiLun,
    Stack,
    outcome,
)

MakeStack = Callable[..., Stack]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> FaultyFiles:
    return FaultyFiles(monkeypatch)


@pytest.fixture(params=sorted(STACKS))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStack]:
    made: list[Stack] = []

    def build(vdisks: dict[str, int], **kw: int) -> Stack:
        stack = STACKS[request.param](str(tmp_path), vdisks, **kw)
        made.append(stack)
        return stack

    yield build
    for stack in made:
        stack.close()


def pattern(i: int, n: int = SEG) -> bytes:
    return bytes([i % 251 + 1]) * n


def attention(*luns: ScsiLun) -> None:
    """Each LUN reports the soft threshold to its next command, once."""
    for lun in luns:
        assert outcome(lun.run(bytes(6))) == SOFT_THRESHOLD
        assert outcome(lun.run(bytes(6))) is GOOD


# --- failing container ---------------------------------------------------------------


def test_a_read_error_fails_only_the_commands_that_meet_it(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 8 * SEG, "w": 4 * SEG}, containers=2)
    v, w = (s.lun(n, soft_threshold=False) for n in "vw")
    for i in range(4):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    assert outcome(w.write(0, pattern(9))) is GOOD
    c, pseg = s.container_of("v", 1)
    faults.fail_segment(c, pseg, ops=[READ], part=4096)  # a few bad sectors

    assert outcome(v.read(SEG, 512)) == MEDIUM_READ
    assert outcome(v.read(SEG - 512, 1024)) == MEDIUM_READ  # straddles into the bad range
    # the rest of that segment, the other segments, the other vdisk: unaffected
    r = v.read(SEG + 4096, 4096)
    assert (outcome(r), r.data) == (GOOD, pattern(1, 4096))
    for i in (0, 2, 3):
        r = v.read(i * SEG, SEG)
        assert (outcome(r), r.data) == (GOOD, pattern(i))
    assert outcome(v.write(SEG, pattern(7, 512))) is GOOD  # writes in place still work
    r = w.read(0, SEG)
    assert (outcome(r), r.data) == (GOOD, pattern(9))
    assert outcome(v.sync()) is GOOD

    # the pool reports the container failed (an agent told the controller)
    state = {u.cid: u.state for u in s.pool.usage()}
    assert state == {c.cid: "failed", 1 - c.cid: "online"}
    assert "read at" in s.pool.containers[c.cid].failure
    # and new segments avoid it, though it has the most free space
    for i in range(4, 8):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
        assert s.container_of("v", i)[0].cid != c.cid
    check_refcounts(s.catalog)


def test_a_write_error_fails_only_the_writes_that_meet_it(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG})
    v = s.lun("v", soft_threshold=False)
    for i in range(3):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    c, pseg = s.container_of("v", 2)
    faults.fail_segment(c, pseg, ops=[WRITE])
    assert outcome(v.write(2 * SEG, pattern(5, 4096))) == MEDIUM_WRITE
    assert outcome(v.write(SEG, pattern(6, 2 * SEG))) == MEDIUM_WRITE  # spans into it
    r = v.read(2 * SEG, SEG)
    assert (outcome(r), r.data) == (GOOD, pattern(2))  # the old data reads back
    assert outcome(v.write(0, pattern(8))) is GOOD
    assert v.read(0, SEG).data == pattern(8)
    assert s.pool.usage()[0].state == "failed"
    assert "write at" in c.failure or "write at" in s.pool.containers[c.cid].failure
    # the only container failed: a write that needs a new segment finds no place
    r = v.write(3 * SEG, pattern(3))
    assert outcome(r) == SPACE_ALLOCATION_FAILED


def test_the_failed_mark_is_durable_until_an_operator_clears_it(
    make: MakeStack, faults: FaultyFiles, tmp_path: Path
) -> None:
    s = make({"v": 4 * SEG}, containers=2)
    v = s.lun("v", soft_threshold=False)
    assert outcome(v.write(0, pattern(0))) is GOOD
    c, pseg = s.container_of("v", 0)
    faults.fail_segment(c, pseg, ops=[READ])
    assert outcome(v.read(0, 512)) == MEDIUM_READ
    assert outcome(v.sync()) is GOOD  # the mark is committed with the next flush
    faults.heal()
    s.close()
    catalog = open_catalog(str(tmp_path / "meta.db"))
    try:
        pool = catalog.pool("p")
        assert pool.containers[c.cid].failed
        assert [u.state for u in pool.usage()][c.cid] == "failed"
        assert catalog.clear_failure("p", c.cid) is True
        assert catalog.clear_failure("p", c.cid) is False
    finally:
        catalog.close()
    catalog = open_catalog(str(tmp_path / "meta.db"))
    try:
        assert [u.state for u in catalog.pool("p").usage()] == ["online", "online"]
    finally:
        catalog.close()


def test_a_new_segment_whose_container_fails_while_zeroed_goes_to_another(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG}, containers=2)
    v = s.lun("v", soft_threshold=False)
    c0 = s.pool.containers[0]
    faults.fail(c0.path, ops=[WRITE])  # container 0, the first choice, fails every write
    assert outcome(v.write(0, pattern(1))) is GOOD
    assert s.container_of("v", 0)[0].cid == 1
    assert c0.failed and "zeroing" in c0.failure
    check_refcounts(s.catalog)  # the segment taken in container 0 went back


def test_copy_on_write_of_an_unreadable_segment_fails_and_leaks_nothing(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG})
    v = s.lun("v", soft_threshold=False)
    assert outcome(v.write(0, pattern(1))) is GOOD
    s.snapshot("v", "s")
    c, pseg = s.container_of("v", 0)
    free = s.pool.free_segments()
    faults.fail_segment(c, pseg, ops=[READ])
    assert outcome(v.write(0, pattern(2, 512))) == MEDIUM_READ  # the copy could not read
    assert s.pool.free_segments() == free
    check_refcounts(s.catalog)
    faults.heal()
    assert s.catalog.vdisk("v@s").read(0, SEG) == pattern(1)
    assert v.read(0, SEG).data == pattern(1)


def test_a_failed_flush_fails_only_the_flushes_of_vdisks_with_data_there(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG, "w": 4 * SEG}, containers=2)
    v, w = (s.lun(n, soft_threshold=False) for n in "vw")
    assert outcome(v.write(0, pattern(1))) is GOOD  # container 0 (most free, lowest id)
    assert outcome(w.write(0, pattern(2))) is GOOD  # container 1 (more free now)
    assert (s.container_of("v", 0)[0].cid, s.container_of("w", 0)[0].cid) == (0, 1)
    faults.fail(s.pool.containers[0].path, ops=[SYNC])
    assert outcome(w.write(0, pattern(3))) is GOOD
    assert outcome(w.sync()) is GOOD  # w has nothing in container 0
    s.snapshot("w", "s")  # metadata commits go on
    assert outcome(v.sync()) == MEDIUM_WRITE
    assert outcome(v.write(0, pattern(4, 512), fua=True)) == MEDIUM_WRITE
    assert outcome(v.read(0, 512)) is GOOD
    faults.heal()
    assert outcome(v.sync()) is GOOD
    assert outcome(w.sync()) is GOOD


def test_a_flush_syncs_data_written_in_place(
    make: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SYNCHRONIZE CACHE after overwrites that change no mapping still fdatasyncs the
    containers (the engine's commit used to skip everything when no metadata changed)."""
    s = make({"v": 4 * SEG})
    v = s.lun("v", soft_threshold=False)
    assert outcome(v.write(0, pattern(1))) is GOOD
    assert outcome(v.sync()) is GOOD
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert outcome(v.write(0, pattern(2))) is GOOD  # in place: no mapping changes
    assert outcome(v.sync()) is GOOD
    ino = os.stat(s.pool.containers[0].path).st_ino
    assert ino in synced
    synced.clear()
    assert outcome(v.write(0, pattern(3))) is GOOD
    s.catalog.commit()  # a metadata commit alone syncs nothing when nothing changed
    assert synced == []
    s.catalog.flush()  # the daemon's periodic flush
    assert ino in synced


def test_a_full_file_system_under_a_sparse_container_is_a_full_pool(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG})
    v = s.lun("v", soft_threshold=False)
    assert outcome(v.write(0, pattern(1))) is GOOD
    c, pseg = s.container_of("v", 0)
    faults.fail_segment(c, pseg, ops=[WRITE]).errno = errno.ENOSPC
    assert outcome(v.write(0, pattern(2, 4096))) == SPACE_ALLOCATION_FAILED
    assert not s.pool.containers[c.cid].failed  # no medium error
    assert v.read(0, SEG).data == pattern(1)


def test_engine_vdisk_flush_names_the_container(tmp_path: Path, faults: FaultyFiles) -> None:
    s = STACKS["engine"](str(tmp_path), {"v": 2 * SEG})
    try:
        vd = s.catalog.vdisk("v")
        vd.write(0, pattern(1))
        faults.fail(s.pool.containers[0].path, ops=[SYNC])
        with pytest.raises(ContainerWriteError, match=r"v: flushing container 0 \(.*c0\)"):
            vd.flush()
        assert s.pool.containers[0].failed
        faults.heal()
        vd.flush()
        assert vd.table[0] & t.MAPPED
    finally:
        s.close()


# --- pool full -------------------------------------------------------------------------


def test_a_full_pool_fails_exactly_the_writes_that_need_a_segment(
    make: MakeStack, tmp_path: Path
) -> None:
    s = make({"v": 16 * SEG, "w": 4 * SEG}, segments=8)
    s.catalog.set_threshold("p", 100)
    v, w = s.lun("v"), s.lun("w")
    for i in range(8):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    assert s.pool.free_segments() == 0
    attention(v, w)  # full is 100 %
    assert outcome(v.write(8 * SEG, pattern(8))) == SPACE_ALLOCATION_FAILED
    assert outcome(v.write(9 * SEG + 512, pattern(9, 512))) == SPACE_ALLOCATION_FAILED
    assert outcome(w.write(0, pattern(1, 4096))) == SPACE_ALLOCATION_FAILED
    # one that spans an allocated segment and a new one writes nothing at all
    assert outcome(v.write(7 * SEG, pattern(70, 2 * SEG))) == SPACE_ALLOCATION_FAILED
    assert v.read(7 * SEG, SEG).data == pattern(7)
    # allocated data stays readable and writable in place; unallocated reads zeros
    assert outcome(v.write(3 * SEG + 4096, pattern(33, 4096))) is GOOD
    r = v.read(3 * SEG, 8192)
    assert (outcome(r), r.data) == (GOOD, pattern(3, 4096) + pattern(33, 4096))
    assert v.read(8 * SEG, SEG).data == bytes(SEG)
    assert outcome(v.sync()) is GOOD
    # UNMAP gives a segment back: the next write that needs one gets it
    assert outcome(v.unmap(0, SEG)) is GOOD
    assert outcome(v.write(8 * SEG, pattern(8))) is GOOD
    attention(v, w)  # below (the freed segment settled), then full again
    assert outcome(w.write(0, pattern(1, 4096))) == SPACE_ALLOCATION_FAILED
    # a new container lets writes go on
    s.add_container(str(tmp_path), 4)
    assert outcome(w.write(0, pattern(1, 4096))) is GOOD
    assert outcome(v.write(9 * SEG, pattern(9))) is GOOD
    expect = {i: pattern(i) for i in range(1, 10)}
    expect[3] = pattern(3, 4096) + pattern(33, 4096) + pattern(3, SEG - 8192)
    assert {i: v.read(i * SEG, SEG).data for i in range(1, 10)} == expect
    assert v.read(0, SEG).data == bytes(SEG)
    check_refcounts(s.catalog)


@pytest.mark.parametrize("cow", ["redirect", "copy"])
def test_copy_on_write_in_a_full_pool_fails_without_damaging_the_sharers(
    make: MakeStack, tmp_path: Path, cow: str
) -> None:
    s = make({"v": 8 * SEG, "w": 8 * SEG}, segments=6, cow=cow)
    s.catalog.set_threshold("p", 100)
    v, w = s.lun("v"), s.lun("w")
    for i in range(3):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    s.snapshot("v", "s")
    for i in range(3):
        assert outcome(w.write(i * SEG, pattern(10 + i))) is GOOD
    assert s.pool.free_segments() == 0
    attention(v, w)
    for covering in (False, True):
        data = pattern(50, SEG if covering else 512)
        assert outcome(v.write(SEG, data)) == SPACE_ALLOCATION_FAILED
    snap = s.catalog.vdisk("v@s")
    for i in range(3):
        assert v.read(i * SEG, SEG).data == pattern(i)
        assert snap.read(i * SEG, SEG) == pattern(i)
    check_refcounts(s.catalog)
    s.add_container(str(tmp_path), 2)
    assert outcome(v.write(SEG, pattern(50, 512))) is GOOD
    assert v.read(SEG, 1024).data == pattern(50, 512) + pattern(1, 512)
    assert snap.read(SEG, SEG) == pattern(1)
    check_refcounts(s.catalog)


def test_a_segment_no_longer_shared_is_written_in_place_in_a_full_pool(
    make: MakeStack,
) -> None:
    """v's clone c moved away from their shared segment (its drop not yet committed);
    with the pool full, v's write goes in place instead of failing for want of a copy."""
    s = make({"v": 4 * SEG}, segments=2)
    v = s.lun("v")
    assert outcome(v.write(0, pattern(1))) is GOOD
    s.clone("v", "c")
    c = s.lun("c")
    assert outcome(c.write(0, pattern(2, 512))) is GOOD  # c gets its own copy: pool full
    assert s.pool.free_segments() == 0
    attention(v, c)
    assert outcome(v.write(0, pattern(3, 512))) is GOOD
    assert v.read(0, 1024).data == pattern(3, 512) + pattern(1, 512)
    assert c.read(0, 1024).data == pattern(2, 512) + pattern(1, 512)
    check_refcounts(s.catalog)


# --- soft threshold (catalog) ----------------------------------------------------------


def test_the_soft_threshold_is_reported_once_per_crossing(
    tmp_path: Path, faults: FaultyFiles
) -> None:
    s = STACKS["engine"](str(tmp_path), {"v": 16 * SEG}, segments=10, containers=1)
    try:
        heard: list[str] = []
        s.catalog.threshold_listeners.append(lambda pool: heard.append(pool.name))
        vd = s.catalog.vdisk("v")
        assert s.pool.threshold == 80
        for i in range(7):
            vd.write(i * SEG, pattern(i))
        assert heard == []
        vd.write(7 * SEG, pattern(7))  # 8 of 10 segments: 80 %
        assert heard == ["p"]
        vd.write(8 * SEG, pattern(8))
        vd.write(9 * SEG, pattern(9))
        assert heard == ["p"]
        vd.unmap(0, 3 * SEG)
        vd.flush()  # the freed segments settle: 70 %, the threshold re-arms
        assert not s.pool.above_threshold
        vd.write(0, pattern(0))  # 80 % again
        assert heard == ["p", "p"]
        vd.write(SEG, pattern(1))
        assert heard == ["p", "p"]
        s.catalog.set_threshold("p", 100)  # raised above usage: re-armed
        s.catalog.set_threshold("p", 50)  # lowered below usage: reached at once
        assert heard == ["p", "p", "p"]
        s.add_container(str(tmp_path), 10)  # 45 %: re-armed
        assert not s.pool.above_threshold
        faults.fail(s.pool.containers[1].path)
        vd.write(12 * SEG, pattern(12))  # goes to container 1, which fails it
        assert s.pool.containers[1].failed
        assert heard == ["p", "p", "p", "p"]  # its free space is out of reach: 95 %
    finally:
        s.close()
    catalog = open_catalog(str(tmp_path / "meta.db"))
    try:
        pool = catalog.pool("p")
        assert pool.threshold == 50 and pool.above_threshold  # found above: no new report
    finally:
        catalog.close()


@pytest.mark.parametrize("bad", [0, 101, -5])
def test_a_soft_threshold_is_a_percentage(tmp_path: Path, bad: int) -> None:
    s = STACKS["engine"](str(tmp_path), {})
    try:
        with pytest.raises(InvalidArgument) as e:
            s.catalog.set_threshold("p", bad)
        assert str(e.value) == f"the soft threshold must be from 1 to 100 percent, got {bad}"
        with pytest.raises(InvalidArgument):
            s.catalog.create_pool("q", str(tmp_path / "q"), 4 << 20, threshold=bad)
        assert s.pool.threshold == 80
    finally:
        s.close()


# --- soft threshold (LUNs) -------------------------------------------------------------


def test_the_soft_threshold_unit_attention_fires_once_per_crossing_on_every_lun_of_the_pool(
    make: MakeStack, tmp_path: Path
) -> None:
    s = make({"v": 16 * SEG, "w": 4 * SEG}, segments=10)
    s.catalog.set_threshold("p", 50)
    v, w = s.lun("v"), s.lun("w")
    tur = bytes(6)  # TEST UNIT READY

    def reports(lun: ScsiLun) -> list[tuple[int, int, int] | None]:
        """What the next two commands get: the unit attention once, then GOOD."""
        return [outcome(lun.run(tur)), outcome(lun.run(tur))]

    for i in range(4):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    assert reports(v) == reports(w) == [GOOD, GOOD]
    assert outcome(v.write(4 * SEG, pattern(4))) is GOOD  # 5 of 10 segments: 50 %
    r = v.read(0, 512)  # the next command of any kind reports it
    assert outcome(r) == SOFT_THRESHOLD
    assert reports(v) == [GOOD, GOOD]
    assert reports(w) == [SOFT_THRESHOLD, GOOD]
    assert outcome(w.write(0, pattern(9))) is GOOD  # 60 %: no new crossing
    assert reports(v) == reports(w) == [GOOD, GOOD]
    # below again (UNMAP, then the flush that frees), then across again
    assert outcome(v.unmap(0, 3 * SEG)) is GOOD
    assert outcome(v.sync()) is GOOD
    assert reports(v) == [GOOD, GOOD]
    assert outcome(v.write(0, pattern(0))) is GOOD  # 40 %
    assert outcome(v.write(SEG, pattern(1))) is GOOD  # 50 %
    assert reports(v) == reports(w) == [SOFT_THRESHOLD, GOOD]
    # up to full: writes needing a segment fail, and no new attention
    for i in range(5, 10):
        assert outcome(v.write(i * SEG, pattern(i))) is GOOD
    assert s.pool.free_segments() == 0
    assert outcome(v.write(10 * SEG, pattern(10))) == SPACE_ALLOCATION_FAILED
    assert reports(v) == reports(w) == [GOOD, GOOD]
    # a container added: 10 of 20 segments, at the threshold still (no new crossing)
    s.add_container(str(tmp_path), 10)
    assert outcome(v.write(10 * SEG, pattern(10))) is GOOD
    assert reports(v) == reports(w) == [GOOD, GOOD]


def test_copy_mode_takes_no_segment_when_the_sharer_has_let_go(make: MakeStack) -> None:
    """A copy-mode write to a segment whose only other sharer unmapped it (not yet
    committed) used to copy it out to nobody: a segment leaked until the next restart."""
    s = make({"v": 4 * SEG}, cow="copy")
    v = s.lun("v")
    assert outcome(v.write(0, pattern(1))) is GOOD
    s.clone("v", "c")
    c = s.lun("c")
    assert outcome(c.unmap(0, SEG)) is GOOD
    free = s.pool.free_segments()
    assert outcome(v.write(0, pattern(2, 512))) is GOOD
    assert s.pool.free_segments() == free
    check_refcounts(s.catalog)
    assert v.read(0, 1024).data == pattern(2, 512) + pattern(1, 512)
    assert c.read(0, SEG).data == bytes(SEG)


def test_a_write_that_fails_for_space_leaves_the_old_data_of_segments_it_covers(
    make: MakeStack,
) -> None:
    """The write's first segment is shared and wholly covered, its second needs a segment
    the full pool no longer has: the first fault must copy, not zero (the write fails)."""
    s = make({"v": 4 * SEG, "w": 4 * SEG}, segments=4)
    v, w = s.lun("v"), s.lun("w")
    assert outcome(v.write(0, pattern(1))) is GOOD
    s.snapshot("v", "s")
    assert outcome(w.write(0, pattern(2, 2 * SEG))) is GOOD
    assert s.pool.free_segments() == 1
    assert outcome(v.write(0, pattern(3, SEG + 512))) == SPACE_ALLOCATION_FAILED
    assert outcome(v.run(bytes(6))) == SOFT_THRESHOLD  # the first fault took the last one
    r = v.read(0, 2 * SEG)
    assert (outcome(r), r.data) == (GOOD, pattern(1) + bytes(SEG))
    assert s.catalog.vdisk("v@s").read(0, SEG) == pattern(1)
    check_refcounts(s.catalog)
