"""The real stack, driven through the shell's one-shot form: targetvirt-handler in the
guest on the system bus (with targetvirt's D-Bus policy installed), LIO exports made by
the handler with rtslib-fb, the Linux initiator logged in over iSCSI on 127.0.0.1.

Each test starts its own handler (state in /run/ram/tv) and stops it at the end.  The
test bodies are plain functions of a :class:`Stack`, so they can also be run by hand
against a guest started with ``tools/vm start`` (see ``main`` at the bottom).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guest import CHECKOUT, Guest, Result
from tests.vm.stack import iscsi_login

pytestmark = pytest.mark.vm

WORK = "/run/ram/tv"
STATE, RUN = f"{WORK}/state", f"{WORK}/run"
MNT = "/run/ram/mnt"
INITIATOR = "iqn.2026-11.org.example:guest-initiator"  # set by tests/vm/guest-setup.sh
PORTAL = "portal=127.0.0.1:3260"
ACL = f"acl={INITIATOR}"
MIB = 1 << 20
RELOAD = "org.freedesktop.DBus.ReloadConfig"
SLOW = 900.0  # seconds: a TCG guest on a loaded 2-core host is slow


class Stack:
    """targetvirt-handler running in the guest, and the shell to talk to it."""

    def __init__(self, guest: Guest, log: Path, *, lun_timeout: int = 600) -> None:
        self.guest = guest
        self.log = log
        self.lun_timeout = lun_timeout
        self.pid: int | None = None
        self.daemons = 0

    # --- the handler ----------------------------------------------------------------------

    def install_policy(self) -> None:
        g = self.guest
        g.run(["install", "-D", "-m", "0644", str(CHECKOUT / "packaging/dbus/targetvirt.conf"),
               "/etc/dbus-1/system.d/targetvirt.conf"])  # fmt: skip
        g.run(["dbus-send", "--system", "--type=method_call", "--print-reply",
               "--dest=org.freedesktop.DBus", "/", RELOAD])  # fmt: skip

    def start(self, *extra: str) -> float:
        """Start the handler; returns the seconds until its API answered."""
        self.guest.run(["mkdir", "-p", STATE, RUN])
        self.daemons += 1
        t0 = time.monotonic()
        self.pid = self.guest.spawn(
            [str(self.guest.python_path), "-m", "targetvirt.manage.daemon", "--state-dir", STATE,
             "--run-dir", RUN, "--lun-timeout", str(self.lun_timeout), *extra],
            log=self.log.with_name(f"{self.log.stem}-{self.daemons}.log"),
            cwd=CHECKOUT, env={"PYTHONPATH": str(CHECKOUT)}, warm=True,
        )  # fmt: skip
        deadline = t0 + SLOW
        while time.monotonic() < deadline:
            if self.tv("info", check=False).ok:
                return time.monotonic() - t0
            if not self.guest.run(["kill", "-0", str(self.pid)], check=False).ok:
                raise AssertionError(f"targetvirt-handler exited; see {self.log.parent}")
            time.sleep(1)
        raise AssertionError("targetvirt-handler did not answer")

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; wait until it is gone."""
        if self.pid is None:
            return
        self.guest.run(["kill", str(self.pid)], check=False)
        deadline = time.monotonic() + SLOW
        while time.monotonic() < deadline:
            if not self.guest.run(["kill", "-0", str(self.pid)], check=False).ok:
                break
            time.sleep(0.5)
        else:
            self.guest.run(["kill", "-9", str(self.pid)], check=False)
        self.pid = None

    # --- the shell --------------------------------------------------------------------------

    def tv(self, *words: str, check: bool = True) -> Result:
        """``targetvirt WORDS...`` in the guest (one-shot form, system bus)."""
        return self.guest.module("targetvirt.manage.shell", *words, timeout=SLOW, check=check)

    def fails(self, *words: str) -> str:
        res = self.tv(*words, check=False)
        assert res.rc == 1 and res.stdout == "", res.describe()
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        return res.stderr.strip()

    def iqn_of(self, vdisk: str) -> str:
        info = self.tv(f"/vdisks/{vdisk.replace('@', '/')}", "info").stdout
        m = re.search(r"^  iqn: (\S+)$", info, re.M)
        assert m, info
        return m.group(1)

    def sh(self, script: str, timeout: float = SLOW) -> str:
        return self.guest.sh(script, timeout=timeout).stdout

    def cleanup(self) -> None:
        """Leave the guest as the harness wants it: no sessions, no LIO objects."""
        g = self.guest
        g.sh(f"umount -l {MNT}/* 2>/dev/null || true; umount -l {MNT} 2>/dev/null || true",
             check=False)  # fmt: skip
        g.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False, timeout=SLOW)
        g.run(["iscsiadm", "-m", "node", "-o", "delete"], check=False)
        if self.pid is not None:
            g.lio("clear", timeout=SLOW)  # while the handler still answers REMOVED events
        self.stop()


@pytest.fixture
def stack(guest: Guest, results_dir: Path) -> Iterator[Stack]:
    s = Stack(guest, results_dir / "handler.log")
    s.install_policy()
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def login(s: Stack, vdisk: str) -> tuple[str, str]:
    iqn = s.iqn_of(vdisk)
    dev = iscsi_login(s.guest, iqn, timeout=SLOW)
    return iqn, dev


def logout(s: Stack, iqn: str) -> None:
    s.guest.run(["iscsiadm", "-m", "node", "-T", iqn, "--logout"], timeout=SLOW)
    s.guest.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", iqn], timeout=SLOW)


# --- Must show 1: the lifecycle through the shell -------------------------------------------


def lifecycle(s: Stack) -> None:
    g = s.guest
    s.tv("/pools", "create", "name=p1", f"path={WORK}/p1.img", "size=2G")
    s.tv("/vdisks", "create", "name=db", "size=256M", "pool=p1")
    out = s.tv("/exports", "create", "vdisk=db", PORTAL, ACL).stdout
    assert out.startswith("Exported db as LUN 0 of iqn.2003-01.org.targetvirt:"), out
    iqn_db, dev = login(s, "db")
    assert g.run(["lsblk", "-dn", "-o", "TRAN,SIZE", dev]).stdout.split() == ["iscsi", "256M"]

    # a filesystem, and a file whose content the snapshot and the clone must show
    g.run(["mkfs.ext4", "-q", "-F", dev], timeout=SLOW)
    s.sh(f"mkdir -p {MNT}/db && mount {dev} {MNT}/db && "
         f"dd if=/dev/urandom of={MNT}/db/keep bs=1M count=8 status=none && "
         f"cp {MNT}/db/keep {WORK}/keep.ref && sync")  # fmt: skip

    # snapshot and clone while fio writes
    fio = g.spawn(["fio", "--name=bg", f"--filename={MNT}/db/fio.dat", "--size=32M",
                   "--rw=randwrite", "--bs=4k", "--direct=1", "--time_based", "--runtime=600",
                   "--ioengine=psync"], log=f"{WORK}/fio.log")  # fmt: skip
    s.sh(f"for i in $(seq 300); do [ -s {MNT}/db/fio.dat ] && break; sleep 1; done")
    assert s.tv("/vdisks/db", "snapshot", "name=s1").stdout == "Created snapshot db@s1\n"
    assert s.tv("/vdisks/db", "clone", "name=c1").stdout == "Created clone c1 of db\n"
    assert g.run(["kill", "-0", str(fio)], check=False).ok, "fio died during the snapshot"
    g.run(["kill", str(fio)])
    s.sh(f"while kill -0 {fio} 2>/dev/null; do sleep 0.5; done")
    s.sh(f"umount {MNT}/db")

    # the snapshot read-only, the clone read-write, each on its own target
    assert s.tv("/exports", "create", "vdisk=db@s1", PORTAL, ACL).stdout.endswith(
        "(read-only)\n")  # fmt: skip
    s.tv("/exports", "create", "vdisk=c1", PORTAL, ACL)
    iqn_s1, dev_s1 = login(s, "db@s1")
    iqn_c1, dev_c1 = login(s, "c1")
    # the snapshot: the file is there; the device refuses writes (DATA PROTECT)
    s.sh(f"mkdir -p {MNT}/s1 && mount -o ro,noload {dev_s1} {MNT}/s1 && "
         f"cmp {MNT}/s1/keep {WORK}/keep.ref && umount {MNT}/s1")  # fmt: skip
    wp = g.run(["dd", "if=/dev/zero", f"of={dev_s1}", "bs=4k", "count=1", "oflag=direct"],
               check=False)  # fmt: skip
    assert not wp.ok, "a write to the read-only snapshot LUN succeeded"
    # the clone: the file is there, and it takes writes of its own
    s.sh(f"mkdir -p {MNT}/c1 && mount {dev_c1} {MNT}/c1 && cmp {MNT}/c1/keep {WORK}/keep.ref && "
         f"echo clone-only > {MNT}/c1/new && sync && umount {MNT}/c1")  # fmt: skip
    g.run(["fsck.ext4", "-n", "-f", dev_c1], timeout=SLOW)
    s.sh(f"mount {dev} {MNT}/db && test ! -e {MNT}/db/new && cmp {MNT}/db/keep {WORK}/keep.ref "
         f"&& umount {MNT}/db")  # fmt: skip

    # resize online: the initiator gets CAPACITY DATA HAS CHANGED, a rescan shows the size
    assert s.tv("/vdisks/db", "resize", "size=512M").stdout == (
        "Resized db from 256MiB to 512MiB (the initiator is told)\n")  # fmt: skip
    g.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], check=False)
    g.run(["iscsiadm", "-m", "node", "-T", iqn_db, "-R"], timeout=SLOW)
    s.sh(f"for i in $(seq 120); do [ $(blockdev --getsize64 {dev}) = {512 * MIB} ] && exit 0; "
         f"sleep 1; done; exit 1")  # fmt: skip
    assert "Capacity data has changed" in g.run(["dmesg"]).stdout

    # the tree shows it all
    tree = s.tv("ls").stdout
    agent = g.run(["hostname"]).stdout.strip()  # the handler's agent is named after its host
    for needle in ("o- p1 ", "o- db ", "o- s1 ", "o- c1 ", iqn_db, iqn_s1, iqn_c1,
                   f"served by {agent}"):  # fmt: skip
        assert needle in tree, (needle, tree)

    # refusals on the live objects
    assert s.fails("/vdisks", "delete", "name=c1") == (
        f"targetvirt: c1 is exported as LUN 0 of {iqn_c1}; unexport it before you delete it "
        "(targetvirt /exports delete vdisk=c1)")  # fmt: skip
    assert s.fails("/vdisks/db", "resize", "size=128M").startswith(
        "targetvirt: db is exported as LUN 0")  # fmt: skip

    # unexport, delete
    for iqn in (iqn_s1, iqn_c1, iqn_db):
        logout(s, iqn)
    for vdisk in ("db@s1", "c1", "db"):
        assert s.tv("/exports", "delete", f"vdisk={vdisk}").stdout.startswith(f"Unexported {vdisk}")
    assert s.tv("ls", "/exports").stdout.startswith("o- exports ")
    assert g.lio("state") == {"storage_objects": [], "targets": []}
    s.tv("/vdisks", "delete", "name=c1")
    s.tv("/vdisks", "delete", "name=db", "recursive=true")
    s.tv("/pools", "delete", "name=p1")
    assert s.tv("check").stdout.endswith("clean\n")


@pytest.mark.vm
def test_lifecycle_through_the_shell(stack: Stack) -> None:
    lifecycle(stack)


# --- Must show 1, continued: freeze and delay (through the controller) -------------------


def freeze_and_delay(s: Stack) -> None:
    g = s.guest
    s.tv("/pools", "create", "name=p1", f"path={WORK}/p1.img", "size=1G")
    s.tv("/vdisks", "create", "name=db", "size=64M", "pool=p1")
    s.tv("/exports", "create", "vdisk=db", PORTAL, ACL)
    _, dev = login(s, "db")
    g.run(["sh", "-c", f"echo {int(SLOW)} > /sys/block/{Path(dev).name}/device/timeout"])
    write = ["dd", "if=/dev/urandom", f"of={dev}", "bs=4k", "count=1", "oflag=direct"]
    # freeze: writes stall until thaw, then proceed
    assert s.tv("/vdisks/db", "freeze").stdout == "Froze db (nowrite) until thawed\n"
    assert "state: frozen" in s.tv("/vdisks/db", "info").stdout
    writer = g.spawn(write, log=f"{WORK}/w1.log")
    time.sleep(5)
    assert g.run(["kill", "-0", str(writer)], check=False).ok, "a write went through a freeze"
    g.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"])  # reads go
    s.tv("/vdisks/db", "thaw")
    s.sh(f"while kill -0 {writer} 2>/dev/null; do sleep 0.2; done")
    # freeze with a timeout thaws by itself
    s.tv("/vdisks/db", "freeze", "mode=invalid", "timeout=10")
    t0 = time.monotonic()
    g.run(write, timeout=SLOW)
    assert time.monotonic() - t0 >= 5
    assert "state: normal" in s.tv("/vdisks/db", "info").stdout
    # delay holds all I/O for at most the timeout; resume releases it at once
    s.tv("/vdisks/db", "delay", "timeout=600")
    reader = g.spawn(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                     log=f"{WORK}/r1.log")  # fmt: skip
    time.sleep(5)
    assert g.run(["kill", "-0", str(reader)], check=False).ok, "a read went through a delay"
    s.tv("/vdisks/db", "resume")
    s.sh(f"while kill -0 {reader} 2>/dev/null; do sleep 0.2; done")
    assert s.fails("/vdisks/db", "resume") == "targetvirt: db is not delayed"


@pytest.mark.vm
def test_freeze_thaw_delay_resume(stack: Stack) -> None:
    freeze_and_delay(stack)


# --- Must show 2: restarts ---------------------------------------------------------------------


def restart_with_initiator(s: Stack) -> None:
    """Stop and start the handler while the initiator is logged in and writing: the writes
    wait, then complete, and everything written reads back."""
    g = s.guest
    s.tv("/pools", "create", "name=p1", f"path={WORK}/p1.img", "size=1G")
    s.tv("/vdisks", "create", "name=db", "size=128M", "pool=p1")
    s.tv("/exports", "create", "vdisk=db", PORTAL, ACL)
    iqn, dev = login(s, "db")
    # the initiator waits for the target rather than failing I/O (what a multipath or
    # long-timeout setup does); LIO holds commands for the handler (--lun-timeout)
    g.run(["sh", "-c", f"echo {int(SLOW)} > /sys/block/{Path(dev).name}/device/timeout"])
    s.sh(f"dd if=/dev/urandom of={WORK}/a bs=1M count=4 status=none && "
         f"dd if=/dev/urandom of={WORK}/b bs=1M count=4 status=none && "
         f"dd if={WORK}/a of={dev} bs=1M oflag=direct conv=fsync status=none")  # fmt: skip
    s.stop()
    writer = g.spawn(["dd", f"if={WORK}/b", f"of={dev}", "bs=1M", "seek=16", "oflag=direct",
                      "conv=fsync"], log=f"{WORK}/writer.log")  # fmt: skip
    time.sleep(2)
    assert g.run(["kill", "-0", str(writer)], check=False).ok, "the write did not wait"
    took = s.start()
    s.sh(f"while kill -0 {writer} 2>/dev/null; do sleep 0.5; done; cat {WORK}/writer.log")
    assert "error" not in s.sh(f"cat {WORK}/writer.log").lower()
    s.sh(f"dd if={dev} of={WORK}/a.back bs=1M count=4 iflag=direct status=none && "
         f"cmp {WORK}/a {WORK}/a.back && "
         f"dd if={dev} of={WORK}/b.back bs=1M skip=16 count=4 iflag=direct status=none && "
         f"cmp {WORK}/b {WORK}/b.back")  # fmt: skip
    assert iqn in g.run(["iscsiadm", "-m", "session"]).stdout
    print(f"handler restarted in {took:.0f} s")


@pytest.mark.vm
def test_restart_with_an_initiator_logged_in(stack: Stack) -> None:
    restart_with_initiator(stack)


def restore_after_reboot(s: Stack) -> None:
    """Exports with ACLs, one-way and mutual CHAP, several LUNs in one target; LIO cleared
    (as by a reboot) and the restore unit's command brings every one of them back."""
    g = s.guest
    s.tv("/pools", "create", "name=p1", f"path={WORK}/p1.img", "size=1G")
    s.tv("/vdisks", "create", "name=db", "size=64M", "pool=p1")
    s.tv("/vdisks/db", "snapshot", "name=s1")
    s.tv("/vdisks", "create", "name=web", "size=32M", "pool=p1")
    s.tv("/exports", "create", "vdisk=db", "iqn=iqn.2026-11.org.example:tv-db", PORTAL, ACL,
         "userid=dbuser", "password=dbsecret1234")  # fmt: skip
    s.tv("/exports", "create", "vdisk=db@s1", "iqn=iqn.2026-11.org.example:tv-db")
    s.tv("/exports", "create", "vdisk=web", "iqn=iqn.2026-11.org.example:tv-web", PORTAL,
         "demo=true", "userid=webuser", "password=websecret1234", "mutual_userid=tgt",
         "mutual_password=tgtsecret1234")  # fmt: skip
    before = g.lio("state")
    assert before == {
        "storage_objects": ["user/db", "user/db@s1", "user/web"],
        "targets": ["iscsi/iqn.2026-11.org.example:tv-db", "iscsi/iqn.2026-11.org.example:tv-web"],
    }
    so = "/sys/kernel/config/target/core/user_*/db"
    facts = s.sh(f"cat {so}/info {so}/wwn/vpd_unit_serial {so}/attrib/nl_reply_supported "
                 f"{so}/attrib/cmd_time_out")  # fmt: skip
    uuid = re.search(r"^uuid: (\S+)$", s.tv("/vdisks/db", "info").stdout, re.M)
    assert uuid and f"T10 VPD Unit Serial Number: {uuid.group(1)}" in facts, facts
    assert "Config: targetvirt/db " in facts and "\n-1\n" in facts, facts

    # a reboot: the handler goes, configfs is emptied
    s.stop()
    g.lio("clear", timeout=SLOW)
    assert g.lio("state") == {"storage_objects": [], "targets": []}
    # boot: the handler unit (--no-restore), then the restore unit's ExecStart
    s.start("--no-restore")
    assert g.lio("state") == {"storage_objects": [], "targets": []}
    unit = (CHECKOUT / "systemd/targetvirt-restore.service").read_text()
    m = re.search(r"^ExecStart=/usr/bin/targetvirt (.+)$", unit, re.M)
    assert m, unit
    out = s.tv(*shlex.split(m.group(1))).stdout
    assert out == "Restored 3 LUNs of 2 targets\n", out
    assert g.lio("state") == before
    assert facts == s.sh(f"cat {so}/info {so}/wwn/vpd_unit_serial "
                         f"{so}/attrib/nl_reply_supported {so}/attrib/cmd_time_out")  # fmt: skip

    # CHAP: the right secrets let the initiator in, wrong ones do not
    def chap(iqn: str, settings: dict[str, str]) -> Result:
        g.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", "127.0.0.1"], timeout=SLOW)
        for key, value in {"node.session.auth.authmethod": "CHAP", **settings}.items():
            g.run(["iscsiadm", "-m", "node", "-T", iqn, "-o", "update", "-n", key, "-v", value])
        return g.run(["iscsiadm", "-m", "node", "-T", iqn, "--login"], check=False, timeout=SLOW)

    db, web = "iqn.2026-11.org.example:tv-db", "iqn.2026-11.org.example:tv-web"
    bad = chap(db, {"node.session.auth.username": "dbuser",
                    "node.session.auth.password": "wrongsecret1"})  # fmt: skip
    assert not bad.ok
    good = chap(db, {"node.session.auth.username": "dbuser",
                     "node.session.auth.password": "dbsecret1234"})  # fmt: skip
    assert good.ok, good.describe()  # (discovery rewrote the node record: all settings again)
    assert chap(web, {"node.session.auth.username": "webuser",
                      "node.session.auth.password": "websecret1234",
                      "node.session.auth.username_in": "tgt",
                      "node.session.auth.password_in": "tgtsecret1234"}).ok, "mutual"  # fmt: skip
    sessions = g.run(["iscsiadm", "-m", "session"]).stdout
    assert db in sessions and web in sessions
    # two LUNs on tv-db (db and its read-only snapshot), one on tv-web
    disks = s.sh("lsblk -dn -o NAME,TRAN,SIZE,RO | grep iscsi | sort -k3")
    assert sorted(line.split()[2:] for line in disks.splitlines()) == [
        ["32M", "0"], ["64M", "0"], ["64M", "1"]], disks  # fmt: skip
    for iqn in (db, web):
        logout(s, iqn)

    # a handler started without --no-restore restores by itself, too
    s.stop()
    g.lio("clear", timeout=SLOW)
    s.start()
    assert g.lio("state") == before


@pytest.mark.vm
def test_restore_after_a_simulated_reboot(stack: Stack) -> None:
    restore_after_reboot(stack)


# --- Must show 4: the package ------------------------------------------------------------------


def deb_install(guest: Guest, results: Path) -> None:
    """The .deb built from this tree installs in the guest and works with Debian's own
    python3, rtslib-fb and configshell-fb: a pool, a vdisk, an export, a login."""
    import subprocess  # noqa: PLC0415

    out = subprocess.run([str(CHECKOUT / "packaging/build-deb"), str(results / "deb")],
                         capture_output=True, text=True, check=True, timeout=SLOW)  # fmt: skip
    deb = out.stdout.strip().splitlines()[-1]
    g = guest
    # man-db's trigger re-indexes every manual page through 9p: many minutes under TCG
    g.run(["rm", "-f", "/var/lib/man-db/auto-update"])
    g.run(["dpkg", "-i", deb], timeout=SLOW)
    try:
        listed = g.run(["dpkg", "-L", "targetvirt"]).stdout
        for path in ("/usr/bin/targetvirt", "/usr/bin/targetvirt-handler",
                     "/lib/systemd/system/targetvirt-handler.service",
                     "/lib/systemd/system/targetvirt-restore.service",
                     "/usr/share/dbus-1/system.d/targetvirt.conf",
                     "/usr/share/dbus-1/system-services/org.targetvirt.Manager1.service",
                     "/usr/lib/tmpfiles.d/targetvirt.conf",
                     "/usr/share/man/man8/targetvirt.8.gz"):  # fmt: skip
            assert path in listed, path
        assert g.run(["/usr/bin/targetvirt", "--version"]).stdout == "targetvirt 0.1.0\n"
        assert "--state-dir" in g.run(["/usr/bin/targetvirt-handler", "--help"]).stdout
        g.run(["dbus-send", "--system", "--type=method_call", "--print-reply",
               "--dest=org.freedesktop.DBus", "/", RELOAD])  # fmt: skip
        g.run(["mkdir", "-p", STATE, RUN])
        pid = g.spawn(["/usr/bin/targetvirt-handler", "--state-dir", STATE, "--run-dir", RUN],
                      log=results / "deb-handler.log", cwd="/")  # fmt: skip
        try:
            deadline = time.monotonic() + SLOW
            while not g.run(["/usr/bin/targetvirt", "info"], check=False, cwd="/").ok:
                assert time.monotonic() < deadline, "the packaged handler did not answer"
                time.sleep(1)

            def tv(*words: str) -> str:
                return g.run(["/usr/bin/targetvirt", *words], cwd="/", timeout=SLOW).stdout

            tv("/pools", "create", "name=p1", f"path={WORK}/p1.img", "size=512M")
            tv("/vdisks", "create", "name=pkg", "size=64M", "pool=p1")
            tv("/exports", "create", "vdisk=pkg", PORTAL, ACL)
            iqn = re.search(r"^  iqn: (\S+)$", tv("/vdisks/pkg", "info"), re.M)
            assert iqn
            dev = iscsi_login(g, iqn.group(1), timeout=SLOW)
            g.sh(f"dd if=/dev/urandom of={WORK}/x bs=1M count=2 status=none && "
                 f"dd if={WORK}/x of={dev} bs=1M oflag=direct status=none && "
                 f"dd if={dev} of={WORK}/x.back bs=1M count=2 iflag=direct status=none && "
                 f"cmp {WORK}/x {WORK}/x.back", timeout=SLOW)  # fmt: skip
            logout_all(g)
            tv("/exports", "delete", "vdisk=pkg")
        finally:
            logout_all(g)
            g.run(["kill", str(pid)], check=False)
            g.sh(f"while kill -0 {pid} 2>/dev/null; do sleep 0.5; done", timeout=SLOW)
    finally:
        g.run(["dpkg", "--purge", "targetvirt"], timeout=SLOW, check=False)


def logout_all(g: Guest) -> None:
    g.run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False, timeout=SLOW)
    g.run(["iscsiadm", "-m", "node", "-o", "delete"], check=False)


@pytest.mark.vm
def test_the_deb_builds_installs_and_serves(guest: Guest, results_dir: Path) -> None:
    deb_install(guest, results_dir)


# --- by hand -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``python -m tests.vm.test_shell WORKDIR TEST``: run one body against a guest started
    with ``tools/vm start`` (TEST: lifecycle, restart, restore, deb)."""
    workdir, name = Path(argv[0]), argv[1]
    g = Guest.attach(workdir)
    results = g.results / f"by-hand-{name}"
    results.mkdir(parents=True, exist_ok=True)
    if name == "deb":
        deb_install(g, results)
        return 0
    s = Stack(g, results / "handler.log")
    s.install_policy()
    s.start()
    try:
        {"lifecycle": lifecycle, "restart": restart_with_initiator,
         "restore": restore_after_reboot, "freeze": freeze_and_delay}[name](s)  # fmt: skip
    finally:
        s.cleanup()
        g.lio("reset", timeout=SLOW)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
