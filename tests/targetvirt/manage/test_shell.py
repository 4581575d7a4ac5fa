"""The shell against a daemon-side Manager on a private bus: every one-shot form of issue 6,
bad input for every command with the exact error, and never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.manage.api import _dump
from targetvirt.manage.common import AGENT_FILE, BUS_FILE
from targetvirt.manage.manager import Manager
from targetvirt.manage.shell import ProgressBar, TvShell, main, render, wait_job
from tests.fuzzing import fuzz_settings
from tests.targetvirt.manage.conftest import MIB, Shell, open_manager
from tests.targetvirt.manage.fakes import FakeLio

IQN_WEB = "iqn.2003-01.org.targetvirt:host1.web"
CLIENT = "iqn.2020-01.org.example:client"


def ok(tv: Shell, *argv: str) -> str:
    r = tv(*argv)
    assert (r.rc, r.err) == (0, ""), (argv, r)
    return r.out


def test_issue_one_shot_forms(tv: Shell, tmp_path: Path, lio: FakeLio, manager: Manager) -> None:
    """Every exact form listed in issue 6 (freeze/delay answer that they need the controller)."""
    p1, p2 = tmp_path / "p1.img", tmp_path / "p2.img"
    assert ok(tv, "/pools", "create", "name=P", f"path={p1}", "size=64M") == (
        f"Created pool P: 63MiB in {p1} (1MiB segments)\n"
    )
    assert ok(tv, "/pools/P", "add", f"path={p2}", "size=32M") == (
        f"Added container 1 to pool P: 31MiB in {p2}\n"
    )
    assert ok(tv, "/vdisks", "create", "name=V", "size=16M", "pool=P", "segment=1M",
              "cow=copy").startswith("Created vdisk V: 16MiB in pool P")  # fmt: skip
    ok(tv, "/vdisks", "create", "name=V2", "size=8M", "pool=P")
    manager.catalog.vdisk("V").write(0, b"x" * (3 * MIB))
    assert ok(tv, "/pools/P", "evacuate", "container=0") == (
        "Evacuated container 0 of pool P: 3 segments moved; remove it with: "
        "targetvirt /pools/P remove container=0\n"
    )
    assert ok(tv, "/vdisks/V", "snapshot", "name=S") == "Created snapshot V@S\n"
    assert ok(tv, "/vdisks/V", "clone", "name=C") == "Created clone C of V\n"
    assert ok(tv, "/vdisks/V", "clone", "name=C2", "snapshot=S") == "Created clone C2 of V@S\n"
    assert ok(tv, "/vdisks/V", "rollback", "snapshot=S") == "Rolled V back to V@S\n"
    assert ok(tv, "/vdisks/C", "flatten") == "Flattened C: 3 shared segments copied\n"
    assert ok(tv, "/vdisks/V", "resize", "size=32M") == "Resized V from 16MiB to 32MiB\n"
    assert ok(tv, "/vdisks/V", "freeze", "mode=invalid", "timeout=60") == (
        "Froze V (invalid) for at most 60 s\n"
    )
    assert "state: frozen" in ok(tv, "/vdisks/V", "info")
    assert ok(tv, "/vdisks/V", "thaw") == "Thawed V\n"
    assert tv("/vdisks/V", "thaw").err == "targetvirt: V is not frozen\n"
    assert ok(tv, "/vdisks/V", "delay", "timeout=60") == "Holding I/O to V for at most 60 s\n"
    assert ok(tv, "/vdisks/V", "resume") == "Resumed I/O to V\n"
    assert tv("/vdisks/V", "resume").err == "targetvirt: V is not delayed\n"
    assert ok(tv, "/vdisks", "group_snapshot", "name=G", "vdisks=V,V2") == (
        "Created snapshots V@G, V2@G at one instant\n"
    )
    out = ok(tv, "/exports", "create", "vdisk=V", "iqn=iqn.2020-01.org.example:v",
             "portal=127.0.0.1:3260", f"acl={CLIENT},iqn.2020-01.org.example:other",
             "userid=u", "password=secret123456")  # fmt: skip
    assert out == "Exported V as LUN 0 of iqn.2020-01.org.example:v on 127.0.0.1:3260\n"
    assert lio.targets["iqn.2020-01.org.example:v"]["auth"] == "CHAP"
    assert ok(tv, "/exports", "create", "vdisk=V@S") == (
        "Exported V@S as LUN 0 of iqn.2003-01.org.targetvirt:host1.v.at.s on 0.0.0.0:3260 "
        "(read-only); no initiator may log in yet: give acl=IQN, or demo=true\n"
    )
    assert "V:" not in ok(tv, "/vdisks/V", "info").splitlines()[0]
    assert "name: V@S" in ok(tv, "/vdisks/V@S", "info")  # the snapshot node, /vdisks/V/S
    assert "o- V " in ok(tv, "ls") and "o- S " in ok(tv, "ls", "/vdisks/V")
    assert ok(tv, "/exports", "delete", "vdisk=V@S").startswith("Unexported V@S (LUN 0 of")
    assert ok(tv, "/exports", "delete", "vdisk=V").startswith("Unexported V (LUN 0 of")
    assert ok(tv, "/vdisks", "delete", "name=C2") == "Deleted vdisk C2\n"
    assert ok(tv, "/vdisks", "delete", "name=V", "recursive=true") == (
        "Deleted vdisk V and 2 snapshots\n"
    )
    assert ok(tv, "check") == "checked 3 vdisks, 3 mapped entries\nclean\n"
    assert ok(tv, "check", "repair=true").endswith("clean\n")
    assert ok(tv, "/pools/P", "remove", "container=0") == "Removed container 0 from pool P\n"
    r = tv("/pools", "create", "name=D", "device=/dev/null")
    assert r.err == "targetvirt: /dev/null is not a block device\n"


@pytest.fixture
def w(world: Manager, tv: Shell) -> Shell:
    """The shell, against the world of conftest.world (pools p1, vdisks db c1 web...)."""
    return tv


BAD_SIZE = "is not a size: use a number of bytes with an optional K, M, G or T suffix (e.g. 10G)"
BAD_IQN = ("is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] "
           "(e.g. iqn.2003-01.org.example:disk1), eui.<16 hex> or naa.<hex>")  # fmt: skip
BAD_NAME = "is invalid: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"

NO_SOURCE = (
    "give path=FILE size=SIZE (a file), device=BLOCKDEV, or rados=CEPHPOOL size=SIZE (a Ceph pool)"
)
BAD_INPUT: list[tuple[str, str]] = [
    # /pools
    ("/pools create name=p2", NO_SOURCE),
    ("/pools create name=p2 path=/tmp/x.img", "a file container needs size=SIZE (for /tmp/x.img)"),
    ("/pools create name=p2 path=/nonexistent/x.img size=1G", "folder /nonexistent does not exist"),
    ("/pools create name=p2 path=/etc/hostname size=1G",
     "/etc/hostname already exists; refusing to overwrite it"),
    ("/pools create name=p2 path=/tmp/x.img device=/dev/null",
     "give one of path= (a file), device= (a block device) or rados= (a Ceph pool), "
     "not path= and device="),
    ("/pools create name=p2 device=/dev/nope", "device /dev/nope does not exist"),
    ("/pools create name=p2 path=/tmp/x.img size=0", "size must be positive, got '0'"),
    ("/pools create name=p2 path=/tmp/x.img size=lots", f"size 'lots' {BAD_SIZE}"),
    ("/pools create name=p2 path=/tmp/x.img size=1G segment=3M",
     "segment size 3145728 must be a power of two from 64 KiB to 64 MiB"),
    ("/pools create name=p2 path=/tmp/x.img size=1G preallocate=maybe",
     "preallocate='maybe' is not a boolean: use true or false"),
    ("/pools create name=p1 path=/tmp/x.img size=1G", "a pool named 'p1' already exists"),
    ("/pools create name=-p path=/tmp/x.img size=1G", f"pool name '-p' {BAD_NAME}"),
    ("/pools create path=/tmp/x.img size=1G", "Missing required parameter name"),
    ("/pools create name=p2 rados=tv", "a RADOS container needs size=SIZE (for rados=tv)"),
    ("/pools create name=p2 rados=tv path=/tmp/x.img size=1G",
     "give one of path= (a file), device= (a block device) or rados= (a Ceph pool), "
     "not path= and rados="),
    ("/pools create name=p2 path=/tmp/x.img size=1G conf=/etc/hostname",
     "conf= is for RADOS containers (rados=CEPHPOOL)"),
    ("/pools create name=p2 device=/dev/null id=tv keyring=/etc/hostname",
     "id= and keyring= are for RADOS containers (rados=CEPHPOOL)"),
    ("/pools create name=p2 rados=tv size=1G conf=/nonexistent/ceph.conf",
     "Ceph config file /nonexistent/ceph.conf does not exist"),
    ("/pools create name=p2 rados=tv size=1G conf=/etc/hostname keyring=/nonexistent/k",
     "keyring /nonexistent/k does not exist"),
    ("/pools create name=p2 rados=tv size=1G conf=/etc/hostname id=client.admin",
     "give the cephx user without its prefix: id=admin"),
    ("/pools create name=p2 rados=tv?x size=1G conf=/etc/hostname",
     "Ceph pool name 'tv?x' is empty or holds / ? &"),
    ("/pools create name=p2 rados=/ns size=1G conf=/etc/hostname",
     "Ceph pool name '' is empty or holds / ? &"),
    ("/pools create name=p2 rados=tv size=1G conf=/etc/hostname preallocate=true",
     "preallocate= is for files; RADOS objects are made when written"),
    ("/pools/p1 add rados=tv size=0 conf=/etc/hostname", "size must be positive, got '0'"),
    ("/pools/p1 add rados=tv/a/b size=1G conf=/etc/hostname",
     "RADOS namespace 'a/b' holds / ? &"),
    ("/pools delete name=nope", "no pool named 'nope'"),
    ("/pools delete name=p1", "pool p1 still holds vdisks: c1, db, db@s1, web, web@w1"),
    ("/pools/p1 add", NO_SOURCE),
    ("/pools/p1 add path=/tmp/y.img size=-1", f"size '-1' {BAD_SIZE}"),
    ("/pools/p1 evacuate container=0", "pool p1 has no other container to evacuate 0 to"),
    ("/pools/p1 evacuate container=9", "pool p1 has no container 9"),
    ("/pools/p1 evacuate container=x", "container must be a whole number, got 'x'"),
    ("/pools/p1 evacuate", "Missing required parameter container"),
    ("/pools/p1 remove container=0", "container 0 is the last of pool p1; delete the pool"),
    ("/pools/nope add path=/tmp/y.img size=1G", "No such path /pools/nope"),
    ("/pools create name=p2 path=/tmp/x.img size=1G threshold=101",
     "threshold must be from 1 to 100, got 101"),
    ("/pools create name=p2 path=/tmp/x.img size=1G threshold=high",
     "threshold 'high' is not a percentage: use a whole number from 1 to 100 (e.g. 80)"),
    ("/pools/p1 set", "give threshold=PERCENT: the pool's soft threshold"),
    ("/pools/p1 set threshold=0", "threshold must be from 1 to 100, got 0"),
    ("/pools/p1 set threshold=8.5",
     "threshold '8.5' is not a percentage: use a whole number from 1 to 100 (e.g. 80)"),
    ("/pools/p1 set color=red", "a pool has no setting color= (settings: threshold=PERCENT)"),
    ("/pools/p1 set threshold=50 threshold=60", "parameter threshold= is given twice"),
    ("/pools/p1 set nope threshold=50", "Unknown configuration group: nope"),
    ("/pools/p1 clear container=0", "container 0 of pool p1 is not failed"),
    ("/pools/p1 clear container=7", "pool p1 has no container 7"),
    ("/pools/p1 clear", "Missing required parameter container"),
    ("/pools/p1/0 clear", "container 0 of pool p1 is not failed"),
    # /vdisks
    ("/vdisks create name=db size=1G pool=p1", "a vdisk named 'db' already exists"),
    ("/vdisks create name=x size=1G pool=nope", "no pool named 'nope'"),
    ("/vdisks create name=x size=0 pool=p1", "size must be positive, got '0'"),
    ("/vdisks create name=x size=1000 pool=p1",
     "size 1000 is not a multiple of 512 bytes (the LUN block size)"),
    ("/vdisks create name=x size=1E pool=p1",
     "size 1EiB is too large for pool p1: at most 128TiB (134217728 segments of 1MiB)"),
    ("/vdisks/db resize size=200T",
     "size 200TiB is too large for pool p1: at most 128TiB (134217728 segments of 1MiB)"),
    ("/vdisks create name=x size=1G pool=p1 cow=maybe", "COW mode 'maybe' is not one of redirect, copy"),  # noqa: E501
    ("/vdisks create name=x size=1G pool=p1 segment=4M",
     "pool p1 has 1MiB segments, not 4MiB: the segment size is chosen per pool "
     "(targetvirt /pools create ... segment=SIZE)"),
    ("/vdisks create name=a.b! size=1G pool=p1", f"vdisk name 'a.b!' {BAD_NAME}"),
    ("/vdisks create name=x size=1G", "Missing required parameter pool"),
    ("/vdisks delete name=nope", "no vdisk named 'nope'"),
    ("/vdisks delete name=db", "db has snapshots (db@s1); delete them first or give recursive=true"),  # noqa: E501
    ("/vdisks delete name=web recursive=true",
     f"web is exported as LUN 0 of {IQN_WEB}; unexport it before you delete it "
     "(targetvirt /exports delete vdisk=web)"),
    ("/vdisks delete name=db recursive=sure", "recursive='sure' is not a boolean: use true or false"),  # noqa: E501
    ("/vdisks group_snapshot name=g vdisks=db,db", "vdisks names 'db' twice"),
    ("/vdisks group_snapshot name=g vdisks=db,,web", "vdisks 'db,,web' has an empty item: use A,B,C"),  # noqa: E501
    ("/vdisks group_snapshot name=g vdisks=db,nope", "no vdisk named 'nope'"),
    ("/vdisks group_snapshot name=s1 vdisks=db,web", "db@s1 already exists"),
    ("/vdisks group_snapshot name=g vdisks=db@s1", "db@s1 is a snapshot; a group lists vdisks"),
    ("/vdisks group_snapshot name=g vdisks=db mode=soft",
     "freeze mode 'soft' is not one of nowrite, invalid"),
    ("/vdisks/db snapshot name=s1", "db already has a snapshot named 's1'"),
    ("/vdisks/db snapshot name=a@b", f"snapshot name 'a@b' {BAD_NAME}"),
    ("/vdisks/db snapshot", "Missing required parameter name"),
    ("/vdisks/db clone name=web", "a vdisk named 'web' already exists"),
    ("/vdisks/db clone name=x snapshot=nope", "no snapshot named 'db@nope'"),
    ("/vdisks/db rollback snapshot=nope", "no snapshot named 'db@nope'"),
    ("/vdisks/db resize size=0", "size must be positive, got '0'"),
    ("/vdisks/db resize size=100", "size 100 is not a multiple of 512 bytes (the LUN block size)"),
    ("/vdisks/web resize size=1M",
     f"web is exported as LUN 0 of {IQN_WEB}; shrinking it under the initiator would cut off its "
     "data: unexport it first"),
    ("/vdisks/db freeze mode=soft", "freeze mode 'soft' is not one of nowrite, invalid"),
    ("/vdisks/db freeze timeout=0", "timeout must be positive, got '0'"),
    ("/vdisks/db freeze timeout=soon",
     "timeout 'soon' is not a duration: use seconds, optionally with ms, s, m or h (e.g. 30 or 5m)"),  # noqa: E501
    ("/vdisks/db thaw", "db is not frozen"),
    ("/vdisks/db delay", "Missing required parameter timeout"),
    ("/vdisks/db delay timeout=-3",
     "timeout '-3' is not a duration: use seconds, optionally with ms, s, m or h (e.g. 30 or 5m)"),
    ("/vdisks/db resume", "db is not delayed"),
    ("/vdisks/db@s1 rollback snapshot=s1", "Command not found rollback"),
    ("/vdisks/nope info", "No such path /vdisks/nope"),
    # /exports
    ("/exports create vdisk=nope", "no vdisk named 'nope'"),
    ("/exports create vdisk=db@nope", "no snapshot named 'db@nope'"),
    ("/exports create vdisk=web", f"web is already exported as LUN 0 of {IQN_WEB}"),
    ("/exports create vdisk=db iqn=disk1", f"iqn 'disk1' {BAD_IQN}"),
    ("/exports create vdisk=db acl=client1", f"initiator name 'client1' {BAD_IQN}"),
    ("/exports create vdisk=db portal=server:3260",
     "portal 'server:3260' does not start with an IP address: use ADDR:PORT "
     "(e.g. 0.0.0.0:3260 or [::]:3260)"),
    ("/exports create vdisk=db portal=10.0.0.1:70000",
     "portal '10.0.0.1:70000' port must be from 1 to 65535, got 70000"),
    ("/exports create vdisk=db userid=admin", "CHAP needs both userid= and password="),
    ("/exports create vdisk=db mutual_userid=m mutual_password=p",
     "mutual CHAP needs one-way CHAP too (userid= and password=)"),
    ("/exports create vdisk=db lun=300", "lun must be from 0 to 255, got 300"),
    ("/exports create vdisk=db demo=perhaps", "demo='perhaps' is not a boolean: use true or false"),
    (f"/exports create vdisk=db iqn={IQN_WEB} acl={CLIENT}",
     f"target {IQN_WEB} exists: its acl settings are made already (give only vdisk=, iqn= and lun=)"),  # noqa: E501
    ("/exports create", "Missing required parameter vdisk"),
    ("/exports delete vdisk=db", "db is not exported"),
    ("/exports delete vdisk=nope", "no vdisk named 'nope'"),
    # jobs, root, the command line itself
    ("/jobs cancel id=99", "no job 99"),
    ("/jobs cancel id=x", "id must be a whole number, got 'x'"),
    ("check repair=maybe", "repair='maybe' is not a boolean: use true or false"),
    ("/vdisks frobnicate", "Command not found frobnicate"),
    ("/nope", "No such path /nope"),
    ("cd", "cd needs a PATH here; without one it browses the tree, which needs the interactive "
           "shell on a terminal"),  # found by the fuzzer: a traceback from urwid
    ("/vdisks create name=x size=1G pool=p1 color=red", "Unexpected keyword parameter 'color'."),
]  # fmt: skip


@pytest.mark.parametrize(("cmd", "message"), BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_bad_input(w: Shell, cmd: str, message: str) -> None:
    r = w(*cmd.split())
    assert (r.rc, r.out, r.err) == (1, "", f"targetvirt: {message}\n")


def test_pool_settings_and_failed_containers(w: Shell, world: Manager, tmp_path: Path) -> None:
    assert "soft_threshold_percent: 80" in ok(w, "/pools/p1", "info")
    assert ok(w, "/pools/p1", "set", "threshold=90%") == (
        "Set the soft threshold of pool p1 to 90% (it is 0% used)\n"
    )
    info = ok(w, "/pools/p1", "info")
    assert "soft_threshold_percent: 90" in info and "usage_percent: 0" in info
    assert world.catalog.pool("p1").threshold == 90
    p2 = tmp_path / "p2.img"
    ok(w, "/pools", "create", "name=p2", f"path={p2}", "size=16M", "threshold=50")
    assert world.catalog.pool("p2").threshold == 50
    # a container failed at its first medium error: shown, then cleared by the operator
    world.catalog.mark_failed("p1", 0, "read at 1048576: Input/output error")
    tree = ok(w, "ls", "/pools")
    assert "1MiB segments, 1 failed]" in tree and "63MiB, 0% used, failed]" in tree
    info = ok(w, "/pools/p1", "info")
    assert "state: failed" in info and "failure: read at 1048576: Input/output error" in info
    assert "available_bytes: 0B (0 bytes)" in info and "usage_percent: 100" in info
    assert ok(w, "/pools/p1/0", "clear") == (
        "Container 0 of pool p1 is online again: new segments may go to it (if its medium "
        "fails again, it is marked failed again)\n"
    )
    assert "state: online" in ok(w, "/pools/p1", "info")
    assert not world.catalog.pool("p1").containers[0].failed
    assert "Changes the pool's settings: threshold=PERCENT" in ok(w, "/pools/p1", "help", "set")


def test_ls_info_and_summaries(w: Shell) -> None:
    tree = ok(w, "ls")
    for needle in ("o- pools", "o- p1 ", "[63MiB, 0% used, 1 containers, 1MiB segments]",
                   "o- db ", "o- s1 ", "o- c1 ", "clone of db@s1", f"o- {IQN_WEB}",
                   "LUNs 0:web; 0.0.0.0:3260; 1 ACLs; auth none", "o- agents", "o- jobs"):  # fmt: skip  # noqa: E501
        assert needle in tree, needle
    info = ok(w, "/vdisks/web", "info")
    assert f"  iqn: {IQN_WEB}" in info and "size: 8MiB (8388608 bytes)" in info
    assert "state: normal" in info and "snapshots: web@w1" in info
    assert "containers:\n  - allocated" not in ok(w, "/pools/p1", "info")
    assert "  - bytes: 63MiB (66060288 bytes)" in ok(w, "/pools/p1", "info")
    export = ok(w, f"/exports/{IQN_WEB}", "info")
    assert f"acls: {CLIENT}" in export and "present: yes" in export
    assert "controller: in-process, 0 agents" in ok(w, "info")
    assert ok(w, "version").startswith("targetvirt 0.1.0; daemon 0.1.0")
    assert "AVAILABLE COMMANDS" in ok(w, "/vdisks/db", "help")
    assert "thin vdisk of size=SIZE" in ok(w, "/vdisks", "help", "create")


def test_background_jobs_and_their_nodes(w: Shell, world: Manager) -> None:
    world.catalog.vdisk("c1").write(0, b"y" * MIB)
    out = ok(w, "/vdisks/db", "flatten", "background=true")
    assert out == ("Started job 1: flatten db (progress: targetvirt /jobs/1 info; stop: "
                   "targetvirt /jobs cancel id=1)\n")  # fmt: skip
    world.jobs.wait(1, 10)
    assert "state: done" in ok(w, "/jobs/1", "info")
    assert "[flatten db: done]" in ok(w, "ls", "/jobs")
    assert w("/jobs/1", "cancel").err == "targetvirt: job 1 (flatten db) is not running (done)\n"


class FakeClient:
    """A client whose job polls run a script (for progress and Ctrl-C)."""

    def __init__(self, states: list[Any]) -> None:
        self.states = states
        self.cancelled: list[int] = []

    def job(self, jid: int) -> dict[str, Any]:
        state = self.states.pop(0)
        if isinstance(state, BaseException):
            raise state
        return dict(state)

    def cancel_job(self, jid: int) -> dict[str, Any]:
        self.cancelled.append(jid)
        return {"message": "ok"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


JOB = {"id": 4, "kind": "flatten", "target": "db", "unit": "segments", "state": "running",
       "done": 0, "total": 10, "cancellable": True, "started": 0.0}  # fmt: skip


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("targetvirt.manage.shell.POLL", 0)
    states = [{**JOB, "done": 5}, {**JOB, "state": "done", "done": 10,
                                   "result": {"message": "Flattened db"}}]  # fmt: skip
    err = Tty()
    assert wait_job(FakeClient(states), dict(JOB), err) == {"message": "Flattened db"}
    text = err.getvalue()
    assert "flatten db: [...............................]" not in text
    assert "\rflatten db: [###############...............]  50% 5/10 segments" in text
    assert text.endswith("\r\x1b[K")
    plain = io.StringIO()
    wait_job(FakeClient([{**JOB, "state": "done", "result": {"message": "x"}}]), dict(JOB), plain)
    assert plain.getvalue() == ""  # no bar when not on a terminal
    bar = ProgressBar(Tty())
    bar.show({**JOB, "total": 0, "started": 0.0})
    assert "flatten db: |" in bar.stream.getvalue()  # type: ignore[attr-defined]


def test_ctrl_c_cancels_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("targetvirt.manage.shell.POLL", 0)
    client = FakeClient([KeyboardInterrupt(), {**JOB, "state": "cancelled", "error_name":
                         "Cancelled", "error": "flatten of db cancelled after 5 of 10 segments; "
                         "run it again to resume"}])  # fmt: skip
    err = io.StringIO()
    with pytest.raises(Exception, match=r"^flatten of db cancelled after 5 of 10 segments; run"):
        wait_job(client, dict(JOB), err)
    assert client.cancelled == [4]
    assert err.getvalue() == "stopping job 4 at its next step (Ctrl-C again to leave it running)\n"
    rollback = {**JOB, "kind": "rollback", "cancellable": False}
    with pytest.raises(
        Exception, match=r"cannot be stopped half-way; it goes on in the background"
    ):
        wait_job(FakeClient([KeyboardInterrupt()]), rollback, io.StringIO())


def test_render() -> None:
    assert render({"size": 1 << 20, "flag": True, "empty": [], "d": {"a": 1}, "l": [{"x": 1}]}) == [
        "size: 1MiB (1048576 bytes)", "flag: yes", "empty: -", "d:", "  a: 1", "l:", "  - x: 1"]  # fmt: skip  # noqa: E501


def test_daemon_found_through_the_run_dir(daemon: Any, bus: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / BUS_FILE).write_text(bus + "\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--run-dir", str(run), "ls", "/pools"], out=out, err=err) == 0, err.getvalue()
    assert "o- pools" in out.getvalue()


def test_state_dir_must_match_the_daemons(tv: Shell, state: Path, tmp_path: Path) -> None:
    assert tv("--state-dir", str(state), "ls").rc == 0
    r = tv("--state-dir", str(tmp_path / "other"), "ls")
    assert r.err == (f"targetvirt: the targetvirt-handler on this bus keeps its state in {state}, "
                     f"not {tmp_path / 'other'}\n")  # fmt: skip


def test_no_daemon(bus: str, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["--bus-address", bus, "ls"], out=out, err=err) == 1
    assert err.getvalue() == (
        f"targetvirt: targetvirt-handler is not running: nobody serves org.targetvirt.Manager1 on "
        f"the bus at {bus} (start it: systemctl start targetvirt-handler)\n")  # fmt: skip
    err = io.StringIO()
    nowhere = f"unix:path={tmp_path}/none.sock"
    assert main(["--bus-address", nowhere, "ls"], out=out, err=err) == 1
    assert err.getvalue().startswith(f"targetvirt: cannot connect to the bus at {nowhere}: ")
    assert err.getvalue().count("\n") == 1


def test_interactive_session(tv: Shell, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                             bus: str) -> None:  # fmt: skip
    lines = iter([f"/pools create name=p1 path={tmp_path}/p.img size=16M", "cd /vdisks",
                  "create name=db size=4M pool=p1", "create name=db size=4M pool=p1",
                  "cd db", "snapshot name=s1", "ls", "exit"])  # fmt: skip

    def fake_input(prompt: str = "") -> str:
        return next(lines)

    monkeypatch.setattr("six.moves.input", fake_input)
    monkeypatch.setenv("TARGETVIRT_HOME", str(tmp_path / "home"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["--bus-address", bus], out=out, err=err) == 0
    text = out.getvalue()
    assert "Created vdisk db" in text and "Created snapshot db@s1" in text
    assert "o- s1 " in text  # the tree was re-read after the snapshot
    assert err.getvalue() == "targetvirt: a vdisk named 'db' already exists\n"


GARBAGE = [
    ["/vdisks", "create", "name=a", "size=1G", "pool=p", "name=b"],
    ["/vdisks", "create", "=", "==", "size"],
    ["'/vdisks", 'create"'],
    ["cd", "/nowhere"],
    ["/vdisks", "create", "name=\x01", "size=1G", "pool=p1"],
    ["/vdisks", "create", "name=a", "size=1G", "pool=p1", "}"],
    ["@nobookmark"],
    ["/pools", "create", "name=p", "path=/dev/null/x", "size=1G"],
    ["*", "frob"],
    ["--state-dir"],
    ["/jobs", "cancel", "id=99999999999999999999999"],
    ["/vdisks", "create", "name=x", "size=99999999999999999999T", "pool=p1"],
]


@pytest.mark.parametrize("argv", GARBAGE, ids=[" ".join(a) for a in GARBAGE])
def test_never_a_traceback(daemon: Any, bus: str, argv: list[str]) -> None:
    """The real program, in a subprocess: one line on stderr, a non-zero exit."""
    env = {**os.environ, "TARGETVIRT_BUS_ADDRESS": bus, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "targetvirt.manage.shell", *argv],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("targetvirt: "), proc.stderr


# --- fuzz: arbitrary one-shot command lines -------------------------------------------------


class StubClient:
    """Answers reads from a real Manager (its world does not change) and every other call
    with a finished job, after checking it would go over D-Bus (no None, plain types)."""

    READS = ("status", "listing", "info", "job")

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.calls: list[str] = []

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **opts: Any) -> Any:
            for value in [*args, *opts.values()]:
                assert isinstance(value, (str, int, float, list, tuple, type(None))), (
                    method, value)  # fmt: skip
                if isinstance(value, (list, tuple)):
                    assert all(isinstance(v, str) for v in value), (method, value)
            assert None not in args, (method, args)
            self.calls.append(method)
            if method in self.READS and method != "job":
                return json.loads(_dump(getattr(self.manager, method)(*args)))
            return {"message": f"{method} done", "id": 1, "state": "done", "kind": method,
                    "target": "t", "result": {"message": f"{method} done"}}  # fmt: skip

        return call

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def still_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    """The world of conftest.world, shared by every example (the stub never changes it)."""
    tmp = tmp_path_factory.mktemp("shellfuzz")
    state = tmp / "state"
    state.mkdir()
    manager = open_manager(state, FakeLio())
    manager.create_pool("p1", path=str(tmp / "p1.img"), size=64 * MIB)
    manager.create_vdisk("db", "p1", 16 * MIB)
    manager.snapshot("db", "s1")
    manager.clone("db", "c1", snapshot="s1")
    manager.export("db", acls=[CLIENT])
    yield manager
    manager.stop()
    manager.catalog.close()


PATHS = ["/", "/pools", "/pools/p1", "/pools/p1/0", "/vdisks", "/vdisks/db", "/vdisks/db@s1",
         "/vdisks/db/s1", "/vdisks/c1", "/exports", f"/exports/{IQN_WEB}", "/jobs", "/agents",
         "..", ".", "/nope", "pools", "@bm", "*"]  # fmt: skip
COMMANDS = ["ls", "info", "help", "cd", "pwd", "create", "delete", "add", "remove", "evacuate",
            "snapshot", "clone", "rollback", "flatten", "resize", "freeze", "thaw", "delay",
            "resume", "export", "unexport", "group_snapshot", "check", "cancel", "restore",
            "version", "refresh", "get", "set", "bookmarks", "exit", "status"]  # fmt: skip
KEYS = ["name", "size", "pool", "path", "device", "segment", "cow", "preallocate", "container",
        "snapshot", "mode", "timeout", "recursive", "background", "vdisk", "vdisks", "iqn",
        "portal", "acl", "userid", "password", "mutual_userid", "mutual_password", "demo",
        "readonly", "lun", "repair", "id", "global", "color_mode", "add", "go"]  # fmt: skip
VALUES = ["p1", "db", "db@s1", "s1", "x", "1G", "0", "-1", "64K", "1E", "true", "no", "maybe",
          "copy", "nowrite", "invalid", "5", "1.5h", "/tmp/fuzz.img", "/dev/null", "a,b", "a,,b",
          CLIENT, IQN_WEB, "0.0.0.0:3260", "[::1]:3260", "", "=", "'", '"', "\\", "\n",
          "../../etc", "a/b", "a\0b", "x" * 300]  # fmt: skip

words = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=8),
              st.sampled_from(VALUES) | st.text(max_size=12)),
    st.sampled_from(COMMANDS + PATHS + VALUES),
    st.text(max_size=12),
)  # fmt: skip
command_lines = st.one_of(
    st.builds(
        lambda p, c, rest: [*p, c, *rest],
        st.lists(st.sampled_from(PATHS), max_size=1),
        st.sampled_from(COMMANDS),
        st.lists(words, max_size=5),
    ),
    st.lists(words, min_size=1, max_size=6),
).filter(lambda argv: not argv[0].startswith("-"))  # options are argparse's (tested above)


@fuzz_settings(150)
@given(argv=command_lines)
def test_arbitrary_command_lines_one_line_errors(still_world: Manager, argv: list[str]) -> None:
    """Fuzz target: any one-shot command line prints a result (exit 0) or exactly one line
    ``targetvirt: ...`` on stderr (exit 1); never a traceback nor an internal error."""
    out, err = io.StringIO(), io.StringIO()
    client = StubClient(still_world)
    rc = main(["--bus-address", "unix:path=/nonexistent", *argv], out=out, err=err,
              client_factory=lambda _address: client)  # fmt: skip
    text = err.getvalue()
    assert "Traceback" not in out.getvalue() + text
    if rc == 0:
        assert text == "", text
    else:
        assert rc == 1, (rc, text)
        assert text.startswith("targetvirt: ") and text.count("\n") == 1, text
        assert "internal error" not in text, text


def test_on_an_agent_host_the_shell_says_where_management_is(tmp_path: Path) -> None:
    """An agent-only handler serves no management API; it records its controller in the
    run folder, and the shell names it instead of 'not running'."""
    from targetvirt.manage.client import DaemonUnreachable  # noqa: PLC0415

    def unreachable(_address: str | None) -> Any:
        raise DaemonUnreachable("targetvirt-handler is not running: nobody serves ...")

    run = tmp_path / "run"
    run.mkdir()
    out, err = io.StringIO(), io.StringIO()
    argv = ["--run-dir", str(run), "/vdisks", "ls"]
    assert main(argv, out=out, err=err, client_factory=unreachable) == 1
    assert "is not running" in err.getvalue()  # no agent here: the usual message
    (run / AGENT_FILE).write_text("unix:/run/targetvirt/ctl.sock\n")
    err = io.StringIO()
    assert main(argv, out=out, err=err, client_factory=unreachable) == 1
    assert err.getvalue() == (
        "targetvirt: targetvirt-handler on this host is an agent of the controller at "
        "unix:/run/targetvirt/ctl.sock: manage targetvirt where the controller runs\n"
    )


def test_one_shot_does_not_walk_the_stack_for_debug_lines(
    tv: Shell, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """configshell's debug lines cost an ``inspect.stack()`` each (seconds a command in a
    slow guest); a one-shot, which shows none, must not pay for them."""
    import configshell_fb.log  # noqa: PLC0415

    walks: list[int] = []
    real = configshell_fb.log.inspect.stack

    def stack(*a: Any) -> Any:
        walks.append(1)
        return real(*a)

    monkeypatch.setattr(configshell_fb.log.inspect, "stack", stack)
    run = tv("/pools", "create", "name=p9", f"path={tmp_path / 'p9.img'}", "size=8M")
    assert run.rc == 0, run.err
    assert tv("ls").rc == 0
    assert walks == []
    # with a log file at debug level (an interactive shell's default) they are written
    shell = TvShell(None, str(tmp_path / "prefs"), io.StringIO(), io.StringIO())
    shell.log.debug("kept")
    assert walks == [1]
    assert "kept" in (tmp_path / "prefs" / "log.txt").read_text()


def test_interactive_preferences_are_json_and_never_unpickled(
    tv: Shell, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bus: str
) -> None:
    """``set global`` survives the session in prefs.json; a pickle planted where configshell
    would read one is never loaded; a damaged prefs.json costs one warning, not the file."""
    import pickle  # noqa: PLC0415

    home = tmp_path / "home"
    home.mkdir()
    planted = tmp_path / "ran"
    (home / "prefs.bin").write_bytes(
        pickle.dumps(type("Boom", (), {"__reduce__": lambda s: (open, (str(planted), "w"))})())
    )

    def session(*lines: str) -> tuple[str, str]:
        feed = iter([*lines, "exit"])
        monkeypatch.setattr("six.moves.input", lambda prompt="": next(feed))
        out, err = io.StringIO(), io.StringIO()
        assert main(["--bus-address", bus], out=out, err=err) == 0
        return out.getvalue(), err.getvalue()

    monkeypatch.setenv("TARGETVIRT_HOME", str(home))
    session("set global tree_max_depth=1")
    assert not planted.exists()
    saved = json.loads((home / "prefs.json").read_text())
    assert saved["tree_max_depth"] == 1
    assert (home / "prefs.json").stat().st_mode & 0o077 == 0
    out, _ = session("get global tree_max_depth")
    assert "tree_max_depth=1" in out
    # a one-shot in the same process starts from the defaults, and writes nothing
    before = (home / "prefs.json").read_text()
    assert tv("/pools", "create", "name=p9", f"path={tmp_path / 'p9.img'}", "size=8M").rc == 0
    assert "o- p9 " in tv("ls").out  # the whole tree, not tree_max_depth=1
    assert (home / "prefs.json").read_text() == before

    (home / "prefs.json").write_text("{not json")
    out, err = session("get global tree_max_depth")
    assert err.startswith(f"targetvirt: ignoring the shell preferences in {home}/prefs.json")
    assert err.count("\n") == 1 and "tree_max_depth=0" in out
    assert (home / "prefs.json").read_text() == "{not json"
    (home / "prefs.json").write_text('{"tree_max_depth": "deep", "color_mode": 1}')
    out, err = session("ls")
    assert err == (f"targetvirt: ignoring the shell preferences in {home}/prefs.json (wrong "
                   "type for color_mode, tree_max_depth); fix or remove the file to keep "
                   "settings between sessions\n")  # fmt: skip
    assert "o- p9 " in out and "Traceback" not in out
