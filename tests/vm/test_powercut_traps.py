"""The power-cut test's daemon traps (tests/vm/powercut.py) fire where they say, and its
writer's log names only complete lines: checked on the host, with no guest and no reset
(the reset is replaced by an exception)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.store.sqlite import SqliteStore
from tests.targetvirt.cluster import Cluster, write
from tests.targetvirt.engine_model import SEG
from tests.vm import powercut


class Reset(Exception):
    """Stands for the guest reset."""


Arm = Callable[[str], Path]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), containers=2, agents=1)
    try:
        for i in range(4):
            write(c.vd(0), i * SEG, bytes([65 + i]) * SEG)
        yield c
    finally:
        c.close()


@pytest.fixture
def arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Arm:
    """Install a trap (undone after the test); returns its note once armed."""
    monkeypatch.setattr(SqliteStore, "commit", SqliteStore.commit)  # restored afterwards
    monkeypatch.setattr(Catalog, "_repoint", Catalog.__dict__["_repoint"])

    def cut(note: Path, why: str) -> None:
        note.write_text(f"cut: {why}\n")
        raise Reset(why)

    monkeypatch.setattr(powercut, "cut", cut)

    def install(spec: str) -> Path:
        armed, note = tmp_path / "arm", tmp_path / "note"
        powercut.install(powercut.Trap(spec, armed, note))
        armed.touch()
        return note

    return install


def test_copy_before_cuts_before_the_snapshot_is_durable(cluster: Cluster, arm: Arm) -> None:
    note = arm("copy-before:1")
    with pytest.raises(Reset):
        cluster.controller.snapshot("v", "s1")
    assert note.read_text().startswith("cut: copy-before #1: store commit with [('copy',")
    assert "v@s1" not in Catalog.open(SqliteStore(cluster.db, readonly=True)).vdisks


def test_copy_after_cuts_the_second_clone_once_durable(cluster: Cluster, arm: Arm) -> None:
    note = arm("copy-after:2")
    cluster.controller.clone("v", "c1")  # the first one goes through
    with pytest.raises(Reset):
        cluster.controller.clone("v", "c2")
    assert note.read_text().startswith("cut: copy-after #2")
    assert {"c1", "c2"} <= set(Catalog.open(SqliteStore(cluster.db, readonly=True)).vdisks)


def test_repoint_before_cuts_an_evacuation_midway(cluster: Cluster, arm: Arm) -> None:
    note = arm("repoint-before:2")  # of the two segments in container 0
    before = [cluster.catalog.vdisk("v").table[i] for i in range(4)]
    with pytest.raises(Reset):
        cluster.controller.evacuate("p", 0)
    after = [cluster.catalog.vdisk("v").table[i] for i in range(4)]
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1  # the second not yet
    assert note.read_text().startswith("cut: repoint-before #2: entry ")


def test_migrator_moves_segments_until_the_cut(cluster: Cluster, arm: Arm) -> None:
    note = arm("migrate-repoint-after:3")
    cids = [t.cid_of(cluster.catalog.vdisk("v").table[i]) for i in range(4)]

    class Handler:
        catalog, controller = cluster.catalog, cluster.controller

    with pytest.raises(Reset):
        powercut.migrator(Handler(), "v", note.with_name("arm"))
    assert note.read_text().startswith("cut: repoint-after #3")
    moved = [t.cid_of(cluster.catalog.vdisk("v").table[i]) != cids[i] for i in range(4)]
    assert moved == [True, True, True, False]  # each to the other container, in order


def test_the_writer_log_names_fsynced_files_only(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("d/f00000 3 aa\nd/f00001 3 bb\nd/f0000")  # torn after the second line
    assert powercut.recorded(log) == [("d/f00000", 3, "aa"), ("d/f00001", 3, "bb")]
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f00000").write_bytes(b"abc")
    got = powercut.verify(tmp_path, [log])
    assert got["verified"] == 0 and len(got["bad"]) == 2, got  # wrong digest, missing file
