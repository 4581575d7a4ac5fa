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
from targetvirt.errors import ContainerWriteError
from tests.targetvirt.engine_model import SEG, check_refcounts, open_catalog
from tests.targetvirt.faults import (
    GOOD,
    MEDIUM_READ,
    MEDIUM_WRITE,
    READ,
    SPACE_ALLOCATION_FAILED,
    STACKS,
    SYNC,
    WRITE,
    FaultyFiles,
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


# --- failing container ---------------------------------------------------------------


def test_a_read_error_fails_only_the_commands_that_meet_it(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 8 * SEG, "w": 4 * SEG}, containers=2)
    v, w = s.lun("v"), s.lun("w")
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
    v = s.lun("v")
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
    v = s.lun("v")
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
    v = s.lun("v")
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
    v = s.lun("v")
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
    v, w = s.lun("v"), s.lun("w")
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
    v = s.lun("v")
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
    assert os.stat(s.pool.containers[0].path).st_ino in synced


def test_a_full_file_system_under_a_sparse_container_is_a_full_pool(
    make: MakeStack, faults: FaultyFiles
) -> None:
    s = make({"v": 4 * SEG})
    v = s.lun("v")
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
