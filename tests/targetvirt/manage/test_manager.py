"""The Manager facade over a real catalog and a fake LIO: operations, refusals, exports."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt import controller as controller_module
from targetvirt.clock import FakeClock
from targetvirt.controller import Controller
from targetvirt.errors import AlreadyExists, InUse, InvalidArgument, NotFound, TargetvirtError
from targetvirt.manage.jobs import Job
from targetvirt.manage.manager import Manager, NotAvailable
from tests.fuzzing import fuzz_settings, one_line
from tests.targetvirt.manage.conftest import MIB, open_manager
from tests.targetvirt.manage.fakes import FakeLio

IQN_WEB = "iqn.2003-01.org.targetvirt:host1.web"


def finish(m: Manager, job: Job) -> Any:
    m.jobs.wait(job.id, 30)
    assert job.state == "done", job.error
    return job.result


def fill(m: Manager, name: str, nbytes: int, byte: int = 0xAB) -> None:
    v = m.catalog.vdisk(name)
    v.write(0, bytes([byte]) * nbytes)
    m.catalog.commit()


def test_pool_vdisk_snapshot_clone_flow(manager: Manager, tmp_path: Path) -> None:
    r = manager.create_pool("p1", path=str(tmp_path / "p.img"), size=64 * MIB)
    assert r["message"] == f"Created pool p1: 63MiB in {tmp_path}/p.img (1MiB segments)"
    r = manager.create_vdisk("db", "p1", 16 * MIB, cow="copy")
    assert r["message"] == "Created vdisk db: 16MiB in pool p1 (thin, copy on write, 1MiB segments)"
    fill(manager, "db", 4 * MIB)
    assert manager.snapshot("db", "s1")["message"] == "Created snapshot db@s1"
    assert manager.clone("db", "c1", snapshot="s1")["message"] == "Created clone c1 of db@s1"
    r = manager.group_snapshot(["db", "c1"], "g")
    assert r["names"] == ["db@g", "c1@g"]
    info = manager.info("vdisk", "db")
    assert info["snapshots"] == ["db@s1", "db@g"] and info["allocated_bytes"] == 4 * MIB
    assert info["exclusive_bytes"] == 0 and info["cow"] == "copy" and info["state"] == "normal"
    assert manager.info("vdisk", "db@s1")["clones"] == ["c1"]
    assert manager.info("vdisk", "c1")["parent"] == "db@s1"
    r = finish(manager, manager.flatten("c1"))
    assert r["message"] == "Flattened c1: 4 shared segments copied"
    r = manager.resize("db", 32 * MIB)
    assert r["message"] == "Resized db from 16MiB to 32MiB"
    assert finish(manager, manager.rollback("db", "s1"))["message"] == "Rolled db back to db@s1"
    assert manager.catalog.vdisk("db").size == 16 * MIB
    job = manager.delete_vdisk("db", recursive=True)
    assert finish(manager, job)["message"] == "Deleted vdisk db and 2 snapshots"
    assert sorted(manager.catalog.vdisks) == ["c1", "c1@g"]
    report = finish(manager, manager.check())
    assert report["clean"] is True and report["lines"][-1] == "clean"


def test_containers_and_evacuation(manager: Manager, tmp_path: Path) -> None:
    manager.create_pool("p1", path=str(tmp_path / "a.img"), size=16 * MIB)
    manager.create_vdisk("db", "p1", 8 * MIB)
    fill(manager, "db", 6 * MIB)
    r = manager.add_container("p1", path=str(tmp_path / "b.img"), size=32 * MIB)
    assert r["cid"] == 1
    job = manager.evacuate("p1", 0)
    result = finish(manager, job)
    assert result["moved"] == 6 and (job.done, job.total) == (6, 6)
    assert manager.remove_container("p1", 0)["message"] == "Removed container 0 from pool p1"
    assert manager.catalog.vdisk("db").read(0, 6 * MIB) == b"\xab" * (6 * MIB)
    with pytest.raises(InUse, match=r"^pool p1 still holds vdisks: db$"):
        manager.delete_pool("p1")


def test_flatten_is_cancellable_and_resumes(
    manager: Manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "FLATTEN_BATCH", 1)  # progress at every segment
    manager.create_pool("p1", path=str(tmp_path / "a.img"), size=64 * MIB)
    manager.create_vdisk("db", "p1", 16 * MIB)
    fill(manager, "db", 12 * MIB)
    manager.snapshot("db", "s1")
    gate, stepped = threading.Event(), threading.Event()
    real = manager.ops.flatten

    def slow_flatten(name: str, progress: Any) -> int:
        def step(done: int, total: int) -> None:
            if done == 3:
                stepped.set()
                gate.wait(10)
            progress(done, total)

        return real(name, step)

    manager.ops.flatten = slow_flatten  # type: ignore[method-assign]
    job = manager.flatten("db")
    assert stepped.wait(10)
    with pytest.raises(InUse, match=r"^db is busy: job 1 \(flatten db\) is running$"):
        manager.resize("db", 32 * MIB)
    manager.cancel_job(job.id)
    gate.set()
    manager.jobs.wait(job.id, 10)
    assert job.state == "cancelled"
    assert job.error == "flatten of db cancelled after 3 of 12 segments; run it again to resume"
    manager.ops.flatten = real  # type: ignore[method-assign]
    again = finish(manager, manager.flatten("db"))
    assert again["copied"] == 9  # the first three stayed done
    with pytest.raises(InvalidArgument, match=r"^job 1 \(flatten db\) is not running"):
        manager.cancel_job(job.id)


def test_refusals(world: Manager) -> None:
    m = world
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: m.create_vdisk("db", "p1", MIB), AlreadyExists, "a vdisk named 'db' already exists"),  # noqa: E501
        (lambda: m.create_vdisk("x", "nope", MIB), NotFound, "no pool named 'nope'"),
        (lambda: m.create_vdisk("x", "p1", 1000), InvalidArgument,
         "size 1000 is not a multiple of 512 bytes (the LUN block size)"),
        (lambda: m.create_vdisk("x", "p1", MIB, segment_size=2 * MIB), InvalidArgument,
         "pool p1 has 1MiB segments, not 2MiB: the segment size is chosen per pool "
         "(targetvirt /pools create ... segment=SIZE)"),
        (lambda: m.create_vdisk("x", "p1", MIB, cow="zz"), InvalidArgument,
         "COW mode 'zz' is not one of redirect, copy"),
        (lambda: m.delete_vdisk("db"), InUse,
         "db has snapshots (db@s1); delete them first or give recursive=true"),
        (lambda: m.delete_vdisk("web"), InUse,
         f"web is exported as LUN 0 of {IQN_WEB}; unexport it before you delete it "
         "(targetvirt /exports delete vdisk=web)"),
        (lambda: m.snapshot("db@s1", "x"), InvalidArgument,
         "db@s1 is a snapshot; snapshot the vdisk itself, or clone the snapshot"),
        (lambda: m.snapshot("db", "s1"), AlreadyExists, "db already has a snapshot named 's1'"),
        (lambda: m.snapshot("db", "s1", mode="paused"), InvalidArgument,
         "freeze mode 'paused' is not one of nowrite, invalid"),
        (lambda: m.clone("db", "x", snapshot="nope"), NotFound, "no snapshot named 'db@nope'"),
        (lambda: m.clone("db", "web"), AlreadyExists, "a vdisk named 'web' already exists"),
        (lambda: m.rollback("db", "web@w1"), InvalidArgument, "web@w1 is not a snapshot of db"),
        (lambda: m.flatten("db@s1"), TargetvirtError,
         "db@s1 is a snapshot; clone it and flatten the clone"),
        (lambda: m.resize("web", MIB), InUse,
         f"web is exported as LUN 0 of {IQN_WEB}; shrinking it under the initiator would cut "
         "off its data: unexport it first"),
        (lambda: m.resize("db@s1", 32 * MIB), TargetvirtError,
         "db@s1 is a snapshot and cannot be resized"),
        (lambda: m.freeze("db@s1"), InvalidArgument,
         "db@s1 is a snapshot; snapshots take no writes to hold"),
        (lambda: m.freeze("db", mode="cold"), InvalidArgument,
         "freeze mode 'cold' is not one of nowrite, invalid"),
        (lambda: m.freeze("db", timeout=0), InvalidArgument, "timeout must be positive, got 0"),
        (lambda: m.thaw("db"), InvalidArgument, "db is not frozen"),
        (lambda: m.delay("db", 0), InvalidArgument, "timeout must be positive, got 0"),
        # D-Bus callers can send what the shell refuses: NaN or inf held I/O for ever
        (lambda: m.delay("db", math.nan), InvalidArgument,
         "timeout must be at most 31536000 seconds, got nan"),
        (lambda: m.freeze("db", timeout=math.inf), InvalidArgument,
         "timeout must be at most 31536000 seconds, got inf"),
        (lambda: m.resume("db"), InvalidArgument, "db is not delayed"),
        (lambda: m.group_snapshot(["db", "nope"], "g"), NotFound, "no vdisk named 'nope'"),
        (lambda: m.group_snapshot(["db", "db@s1"], "g"), InvalidArgument,
         "db@s1 is a snapshot; a group lists vdisks"),
        (lambda: m.group_snapshot(["db", "web"], "s1"), AlreadyExists, "db@s1 already exists"),
        (lambda: m.group_snapshot([], "g"), InvalidArgument,
         "a consistency group needs at least one vdisk"),
        (lambda: m.evacuate("p1", 0), InUse, "pool p1 has no other container to evacuate 0 to"),
        (lambda: m.evacuate("p1", 5), NotFound, "pool p1 has no container 5"),
        (lambda: m.remove_container("p1", 0), InUse,
         "container 0 is the last of pool p1; delete the pool"),
        (lambda: m.create_pool("p2", path="rel.img", size=MIB), InvalidArgument,
         "'rel.img' is not an absolute path"),
        (lambda: m.create_pool("p2", path="/nonexistent/x.img", size=64 * MIB), NotFound,
         "folder /nonexistent does not exist"),
        (lambda: m.create_pool("p2", device="/dev/null"), InvalidArgument,
         "/dev/null is not a block device"),
        (lambda: m.create_pool("p2"), InvalidArgument,
         "give path=FILE size=SIZE (a file), device=BLOCKDEV, or rados=CEPHPOOL size=SIZE "
         "(a Ceph pool)"),
        (lambda: m.create_pool("p 2", path="/x", size=MIB), InvalidArgument,
         "pool name 'p 2' is invalid: use 1-64 letters, digits, '_', '.', '-', starting with a "
         "letter or digit"),
        (lambda: m.info("vdisk", "nope"), NotFound, "no vdisk named 'nope'"),
        (lambda: m.info("job", "x"), InvalidArgument, "a job is named by its number, not 'x'"),
        (lambda: m.cancel_job(42), NotFound, "no job 42"),
    ]  # fmt: skip
    for call, kind, message in cases:
        with pytest.raises(kind) as e:
            call()
        assert str(e.value) == message


def test_rados_refusals_before_any_cluster_is_reached(
    world: Manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad rados= input is refused at once, in one line, without contacting Ceph."""
    m = world
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: m.create_pool("p2", rados="tv", conf="ceph.conf", size=MIB), InvalidArgument,
         "Ceph config file 'ceph.conf' is not an absolute path"),
        (lambda: m.add_container("p1", rados="tv", conf=str(conf), keyring="k", size=MIB),
         InvalidArgument, "keyring 'k' is not an absolute path"),
        (lambda: m.add_container("p1", rados="tv", size=None), InvalidArgument,
         "a RADOS container needs size=SIZE (for rados=tv)"),
        (lambda: m.add_container("p1", path=str(tmp_path / "x"), size=MIB, client_id="u"),
         InvalidArgument, "id= is for RADOS containers (rados=CEPHPOOL)"),
        (lambda: m.create_pool("p1", rados="tv", conf=str(conf), size=MIB), AlreadyExists,
         "a pool named 'p1' already exists"),
        (lambda: m.add_container("nope", rados="tv", conf=str(conf), size=MIB), NotFound,
         "no pool named 'nope'"),
    ]  # fmt: skip
    for call, kind, message in cases:
        with pytest.raises(kind) as e:
            call()
        assert str(e.value) == message
    # no conf= and nothing where librados looks for one
    monkeypatch.setattr("targetvirt.manage.manager._default_ceph_confs", lambda: [])
    with pytest.raises(NotFound) as e:
        m.create_pool("p2", rados="tv", size=MIB)
    assert str(e.value) == (
        "no Ceph config file: give conf=FILE (/etc/ceph/ceph.conf does not exist)"
    )
    # python3-rados missing (None in sys.modules makes its import fail)
    monkeypatch.setitem(sys.modules, "rados", None)
    with pytest.raises(InvalidArgument) as e:
        m.create_pool("p2", rados="tv", conf=str(conf), size=MIB)
    assert str(e.value) == "Ceph RADOS support needs python3-rados (apt install python3-rados)"
    assert sorted(m.catalog.pools) == ["p1"] and len(m.catalog.pool("p1").containers) == 1


def test_export_unexport_and_persistence(world: Manager, lio: FakeLio, state: Path) -> None:
    m = world
    assert lio.targets[IQN_WEB]["luns"] == {0: "web"}
    assert lio.storage_objects["web"]["config"] == "targetvirt/web"
    assert lio.storage_objects["web"]["serial"] == m.catalog.vdisk("web").uuid
    r = m.export("web@w1", iqn=IQN_WEB)
    assert r["message"] == f"Exported web@w1 as LUN 1 of {IQN_WEB} on 0.0.0.0:3260 (read-only)"
    assert lio.storage_objects["web@w1"]["config"] == "targetvirt/web@w1"
    r = m.export("db", portals=["10.0.0.1", "[::]:3261"], userid="u", password="secret12345",
                 demo=True, readonly=True)  # fmt: skip
    assert r["iqn"] == "iqn.2003-01.org.targetvirt:host1.db" and r["portals"] == [
        "10.0.0.1:3260", "[::]:3261"]  # fmt: skip
    assert lio.storage_objects["db"]["config"] == "targetvirt/db;ro=1"
    r = m.export("c1")
    assert r["message"].endswith("; no initiator may log in yet: give acl=IQN, or demo=true")
    saved = json.loads((state / "exports.json").read_text())
    assert [t["iqn"] for t in saved["targets"]] == [IQN_WEB, r["iqn"].replace("c1", "db"), r["iqn"]]
    assert stat.S_IMODE(os.stat(state / "exports.json").st_mode) == 0o600
    info = m.info("export", "db")
    assert info["password"] == "***" and info["auth"] == "CHAP" and info["lio"]["present"]

    # a reboot: LIO forgets everything, the restore brings every LUN back
    lio.clear()
    again = Manager(m.catalog, state, exporter=lio, hostname="host1")  # reads exports.json
    r = again.restore_exports()
    assert r == {"restored": 4, "errors": [], "message": "Restored 4 LUNs of 3 targets"}
    assert lio.targets[IQN_WEB]["luns"] == {0: "web", 1: "web@w1"}
    assert set(lio.storage_objects) == {"web", "web@w1", "db", "c1"}

    r = m.unexport("web@w1")
    assert r["message"] == f"Unexported web@w1 (LUN 1 of {IQN_WEB})"
    assert lio.targets[IQN_WEB]["luns"] == {0: "web"} and "web@w1" not in lio.storage_objects
    r = m.unexport("web")
    assert r["message"] == f"Unexported web (LUN 0 of {IQN_WEB}); target {IQN_WEB} removed"
    assert IQN_WEB not in lio.targets and IQN_WEB not in m.exports.targets


def test_export_refusals(world: Manager, lio: FakeLio) -> None:
    m = world
    lio.foreign.add("iqn.2020-01.org.example:theirs")
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: m.export("nope"), NotFound, "no vdisk named 'nope'"),
        (lambda: m.export("db@nope"), NotFound, "no snapshot named 'db@nope'"),
        (lambda: m.export("web"), AlreadyExists, f"web is already exported as LUN 0 of {IQN_WEB}"),
        (lambda: m.export("db", iqn="disk"), InvalidArgument,
         "iqn 'disk' is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] "
         "(e.g. iqn.2003-01.org.example:disk1), eui.<16 hex> or naa.<hex>"),
        (lambda: m.export("db", iqn="iqn.2020-01.org.example:theirs"), AlreadyExists,
         "LIO already has a target iqn.2020-01.org.example:theirs that targetvirt does not "
         "manage; choose another iqn="),
        (lambda: m.export("db", iqn=IQN_WEB, acls=["iqn.2020-01.org.example:x"]), InvalidArgument,
         f"target {IQN_WEB} exists: its acl settings are made already (give only vdisk=, iqn= "
         "and lun=)"),
        (lambda: m.export("db", iqn=IQN_WEB, lun=0), AlreadyExists,
         f"target {IQN_WEB} already has a LUN 0"),
        (lambda: m.export("db", lun=256), InvalidArgument, "lun must be from 0 to 255, got 256"),
        (lambda: m.export("db", portals=[]), InvalidArgument, "give at least one portal"),
        (lambda: m.export("db", portals=["1.2.3.4", "1.2.3.4:3260"]), InvalidArgument,
         "a portal is given twice"),
        (lambda: m.export("db", acls=["bad"]), InvalidArgument,
         "initiator name 'bad' is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] "
         "(e.g. iqn.2003-01.org.example:disk1), eui.<16 hex> or naa.<hex>"),
        (lambda: m.export("db", userid="u"), InvalidArgument, "CHAP needs both userid= and password="),  # noqa: E501
        (lambda: m.export("db", mutual_userid="m", mutual_password="p"), InvalidArgument,
         "mutual CHAP needs one-way CHAP too (userid= and password=)"),
        (lambda: m.export("db", userid="u", password="same", mutual_userid="m",
                          mutual_password="same"), InvalidArgument,
         "mutual_password must differ from password"),
        (lambda: m.unexport("db"), NotFound, "db is not exported"),
        (lambda: m.unexport("nope"), NotFound, "no vdisk named 'nope'"),
    ]  # fmt: skip
    for call, kind, message in cases:
        with pytest.raises(kind) as e:
            call()
        assert str(e.value) == message
    lio.why_unavailable = "/sys/kernel/config/target does not exist"
    with pytest.raises(NotAvailable) as e:
        m.export("db")
    assert str(e.value) == "LIO is not available: /sys/kernel/config/target does not exist"


def test_failed_export_leaves_nothing_behind(world: Manager, lio: FakeLio, state: Path) -> None:
    lio.fail["apply_target"] = "LIO refused to set up target x: boom"
    before = (state / "exports.json").read_text()
    with pytest.raises(TargetvirtError, match=r"^LIO refused to set up target x: boom$"):
        world.export("db")
    assert "db" not in lio.storage_objects
    assert "iqn.2003-01.org.targetvirt:host1.db" not in lio.targets
    assert (state / "exports.json").read_text() == before


def test_export_waits_for_the_handler(state: Path, lio: FakeLio, tmp_path: Path) -> None:
    states = {"db": iter(["absent", "absent", "served"]), "bad": iter(["refused: no vdisk"])}
    m = open_manager(state, lio, device_state=lambda name: next(states[name]),
                     sleep=lambda s: None)  # fmt: skip
    try:
        m.create_pool("p1", path=str(tmp_path / "p.img"), size=16 * MIB)
        m.create_vdisk("db", "p1", MIB)
        m.create_vdisk("bad", "p1", MIB)
        m.export("db", demo=True)
        with pytest.raises(TargetvirtError) as e:
            m.export("bad")
        assert str(e.value) == "targetvirt-handler refused the LUN: no vdisk"
        assert "bad" not in lio.storage_objects
    finally:
        m.catalog.close()


def test_resize_of_an_exported_vdisk_reaches_lio(world: Manager, lio: FakeLio) -> None:
    r = world.resize("web", 24 * MIB)
    assert r["message"] == "Resized web from 8MiB to 24MiB (the initiator is told)"
    assert lio.storage_objects["web"]["size"] == 24 * MIB
    lio.fail["set_size"] = "LIO refused to resize storage object web: EINVAL"
    with pytest.raises(TargetvirtError) as e:
        world.resize("web", 32 * MIB)
    assert str(e.value) == (
        "web is now 32MiB but its LUN still has the old size (LIO refused to resize storage "
        "object web: EINVAL); run the resize again"
    )


def test_restore_reports_what_it_cannot_bring_back(world: Manager, lio: FakeLio) -> None:
    world.export("db")
    world.export("db@s1", iqn="iqn.2003-01.org.targetvirt:host1.db")
    lio.clear()
    world.catalog.delete("db", recursive=True)  # behind the manager's back
    r = world.restore_exports()
    assert r["restored"] == 1
    assert r["errors"] == [
        "LUN 0 (db) of iqn.2003-01.org.targetvirt:host1.db: no vdisk named 'db'",
        "LUN 1 (db@s1) of iqn.2003-01.org.targetvirt:host1.db: no snapshot named 'db@s1'",
    ]
    assert list(lio.targets) == [IQN_WEB]


def test_listing_and_status(world: Manager) -> None:
    data = world.listing()
    assert [p["name"] for p in data["pools"]] == ["p1"]
    assert [v["name"] for v in data["vdisks"]] == ["c1", "db", "db@s1", "web", "web@w1"]
    web = next(v for v in data["vdisks"] if v["name"] == "web")
    assert web["export"] == {"iqn": IQN_WEB, "lun": 0, "readonly": False}
    assert data["exports"][0]["password"] == ""
    assert data["agents"] == []  # no handler serves anything here
    status = world.status()
    assert status["controller"] == "in-process, 0 agents" and status["lio"] == "available"


def test_freeze_thaw_delay_resume_through_the_controller(
    state: Path, lio: FakeLio, tmp_path: Path
) -> None:
    """Freeze and delay reach the controller: states show in info, a freeze with a timeout
    thaws by itself when the controller's clock passes it, a delay ends the same way."""
    clock = FakeClock()
    m = open_manager(state, lio)
    m.ops = controller = Controller(m.catalog, clock=clock)
    try:
        m.create_pool("p1", path=str(tmp_path / "p.img"), size=16 * MIB)
        m.create_vdisk("db", "p1", 4 * MIB)
        assert m.status()["controller"] == "in-process, 0 agents"
        assert m.freeze("db")["message"] == "Froze db (nowrite) until thawed"
        assert m.info("vdisk", "db")["state"] == "frozen"
        with pytest.raises(InUse, match=r"^db is already frozen$"):
            m.freeze("db")
        with pytest.raises(InUse, match=r"^db is frozen; thaw it before you resize it$"):
            m.resize("db", 8 * MIB)
        assert m.thaw("db")["message"] == "Thawed db"
        assert m.info("vdisk", "db")["state"] == "normal"
        r = m.freeze("db", mode="invalid", timeout=10)
        assert r["message"] == "Froze db (invalid) for at most 10 s"
        clock.advance(9)
        controller.tick()
        assert m.info("vdisk", "db")["state"] == "frozen"
        clock.advance(2)
        controller.tick()
        assert m.info("vdisk", "db")["state"] == "normal"
        assert m.delay("db", 30)["message"] == "Holding I/O to db for at most 30 s"
        assert m.info("vdisk", "db")["state"] == "delayed"
        assert m.resume("db")["message"] == "Resumed I/O to db"
        with pytest.raises(InvalidArgument, match=r"^db is not delayed$"):
            m.resume("db")
        m.delay("db", 30)
        clock.advance(31)
        assert m.info("vdisk", "db")["state"] == "normal"
        assert m.listing()["agents"] == []
    finally:
        m.stop()
        m.catalog.close()


def test_a_freeze_shows_after_a_daemon_restart(state: Path, lio: FakeLio, tmp_path: Path) -> None:
    """What the user sees: a vdisk frozen before a restart is still frozen after it (and
    refuses what a frozen vdisk refuses), until thawed; a delay is not kept."""
    m = open_manager(state, lio)
    try:
        m.create_pool("p1", path=str(tmp_path / "p.img"), size=16 * MIB)
        m.create_vdisk("db", "p1", 4 * MIB)
        m.create_vdisk("web", "p1", 4 * MIB)
        m.freeze("db", mode="invalid")
        m.delay("web", 600)
    finally:
        m.stop()
        m.catalog.close()
    m = open_manager(state, lio)
    try:
        assert m.info("vdisk", "db")["state"] == "frozen"
        assert m.info("vdisk", "web")["state"] == "normal"
        with pytest.raises(InUse, match=r"^db is frozen; thaw it before you resize it$"):
            m.resize("db", 8 * MIB)
        assert m.thaw("db")["message"] == "Thawed db"
    finally:
        m.stop()
        m.catalog.close()
    m = open_manager(state, lio)
    try:
        assert m.info("vdisk", "db")["state"] == "normal"
    finally:
        m.stop()
        m.catalog.close()


def test_pool_threshold_and_failed_containers(manager: Manager, tmp_path: Path) -> None:
    manager.create_pool("p1", path=str(tmp_path / "p.img"), size=11 * MIB, threshold=30)
    manager.add_container("p1", path=str(tmp_path / "q.img"), size=11 * MIB)
    manager.create_vdisk("db", "p1", 8 * MIB)
    fill(manager, "db", 4 * MIB)
    info = manager.info("pool", "p1")
    assert (info["soft_threshold_percent"], info["usage_percent"]) == (30, 20)
    assert info["available_bytes"] == 16 * MIB
    assert [c["state"] for c in info["containers"]] == ["online", "online"]
    r = manager.set_pool("p1", threshold=15)
    assert r["message"] == "Set the soft threshold of pool p1 to 15% (it is 20% used)"
    with pytest.raises(InvalidArgument, match="give threshold=PERCENT"):
        manager.set_pool("p1")
    with pytest.raises(InvalidArgument) as e:
        manager.set_pool("p1", threshold=0)
    assert str(e.value) == "the soft threshold must be from 1 to 100 percent, got 0"
    with pytest.raises(NotFound):
        manager.set_pool("nope", threshold=50)
    manager.catalog.mark_failed("p1", 1, "write at 0: Input/output error")
    info = manager.info("pool", "p1")
    assert info["containers"][1]["state"] == "failed"
    assert info["containers"][1]["failure"] == "write at 0: Input/output error"
    assert (info["available_bytes"], info["usage_percent"]) == (8 * MIB, 60)  # 2 + 2 used
    assert manager.clear_container("p1", 1)["message"].startswith(
        "Container 1 of pool p1 is online again"
    )
    with pytest.raises(InvalidArgument) as e:
        manager.clear_container("p1", 1)
    assert str(e.value) == "container 1 of pool p1 is not failed"
    with pytest.raises(NotFound):
        manager.clear_container("p1", 5)


# --- names and paths given by users -------------------------------------------------------

HOSTILE = ["", ".", "..", "../x", "a/../../b", "a/b", "/etc", "a\0b", "a\nb", "a\rb", "a b",
           " a", "a\t", "x" * 65, "-x", "_x", ".x", "a@b", "é", "a\\b", "a:b", "a,b", "a;b",
           "$(reboot)", "`id`", "a'b", 'a"b', "a*", "\x1b[31mred"]  # fmt: skip


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.name.startswith("targetvirt.db")}


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n) for n in HOSTILE])
def test_hostile_names_are_refused_and_touch_nothing(
    world: Manager, lio: FakeLio, tmp_path: Path, name: str
) -> None:
    """A name with '/', '..', NUL, a line break, spaces, shell syntax, or too long, is
    refused in one line by every operation that creates something under it; no file, no
    LIO object, no record comes of it."""
    m = world
    before, calls, vdisks = files_under(tmp_path), list(lio.calls), m.listing()["vdisks"]
    attempts = [
        lambda: m.create_pool(name, path=str(tmp_path / "new.img"), size=64 * MIB),
        lambda: m.create_vdisk(name, "p1", MIB),
        lambda: m.create_vdisk("x", name, MIB),
        lambda: m.snapshot("db", name),
        lambda: m.clone("db", name),
        lambda: m.clone("db", "x", snapshot=name),
        lambda: m.group_snapshot(["db", "web"], name),
        lambda: m.export(name),
        lambda: m.delete_vdisk(name),
        lambda: m.delete_pool(name),
        lambda: m.add_container(name, path=str(tmp_path / "new.img"), size=64 * MIB),
    ]
    for attempt in attempts:
        with pytest.raises((InvalidArgument, NotFound)) as e:
            attempt()
        assert one_line(str(e.value))
    assert files_under(tmp_path) == before
    assert lio.calls == calls and m.listing()["vdisks"] == vdisks


@pytest.mark.parametrize(
    "path", ["rel.img", "/tmp/a\0b.img", "/tmp/a\nb.img", "/tmp/\x1b[31m.img", "/dev/\0"]
)
def test_hostile_container_paths_are_refused(world: Manager, path: str) -> None:
    """Container paths are absolute and plain (NUL was a ValueError traceback; a line
    break or a terminal escape went into every message naming the container)."""
    for attempt in (
        lambda: world.create_pool("p2", path=path, size=64 * MIB),
        lambda: world.add_container("p1", path=path, size=64 * MIB),
        lambda: world.create_pool("p2", device=path),
    ):
        with pytest.raises(InvalidArgument) as e:
            attempt()
        assert one_line(str(e.value))


NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


@fuzz_settings(300)
@given(name=st.text() | st.sampled_from(HOSTILE) | st.from_regex(NAME, fullmatch=True))
def test_arbitrary_names(vdisks_only: Manager, name: str) -> None:
    """Fuzz target: a vdisk or snapshot name is created only when it is a plain name;
    anything else is a one-line refusal."""
    for create in (lambda: vdisks_only.create_vdisk(name, "p1", MIB),
                   lambda: vdisks_only.snapshot("db", name)):  # fmt: skip
        try:
            create()
        except (InvalidArgument, AlreadyExists) as e:
            assert one_line(str(e))
        else:
            assert re.fullmatch(NAME, name)


@pytest.fixture(scope="module")
def vdisks_only(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("names")
    (tmp / "state").mkdir()
    m = open_manager(tmp / "state", FakeLio())
    m.create_pool("p1", path=str(tmp / "p1.img"), size=64 * MIB)
    m.create_vdisk("db", "p1", MIB)
    yield m
    m.stop()
    m.catalog.close()
