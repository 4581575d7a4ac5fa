"""Power cut: the guest is reset (sysrq b) while a filesystem on a targetvirt LUN is being
written with fsyncs, with the reset landing in plain writes, in a snapshot, in a clone, in
a live migration and in an evacuation.  After each reset: the metadata checker finds no
damage, every file fsynced before the reset is intact, and the filesystem's fsck is clean.

The pool and the metadata store live on a virtual disk of the guest (a raw image on the
host, ext4 in the guest), so what the guest's kernel had not yet sent to that disk is lost
as in a real power cut.  (QEMU's writeback cache lives in the host's page cache, which
the reset does not drop: what the virtual disk had received survives.)

The reset kills the VM, so this test boots guests of its own (not the session guest),
one after the other on the same disk, six boots for five cuts: each boot checks the
previous cut and sets up the next one.  The cuts inside operations are placed by a trap in
the daemon (tests/vm/powercut.py): the reset lands at a chosen point of the operation
rather than wherever timing puts it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.guest import CHECKOUT, Guest, GuestDied, Result, default_workdir
from tests.vm.powercut import recorded

# 11-17 minutes of six guest boots.  It runs before the rest of the VM suite (conftest:
# tests with guests of their own come first), so the session guest is not up beside it.
pytestmark = pytest.mark.vm

MIB = 1 << 20
SLOW = 900.0  # seconds: a TCG guest on a loaded 2-core host is slow
VAR = "/var/tv"  # the virtual disk's filesystem in the guest: pool files and state
STATE, RUN = f"{VAR}/state", "/run/ram/tvrun"
ARM = "/run/ram/arm"  # the daemon's trap fires only once this exists (tmpfs: gone at reset)
LUN_MNT, CLONE_MNT = "/run/ram/lun", "/run/ram/clone"
POOL, VDISK, CLONE = "p", "v", "c"
IQN, CLONE_IQN = "iqn.2026-11.org.example:powercut", "iqn.2026-11.org.example:powercut-clone"
INITIATOR = "iqn.2026-11.org.example:guest-initiator"  # set by tests/vm/guest-setup.sh
RELOAD = "org.freedesktop.DBus.ReloadConfig"
EXPORT = ("portal=127.0.0.1:3260", f"acl={INITIATOR}")


@dataclass
class Cut:
    """One power cut: what it lands in, the daemon trap that places it, what it left."""

    name: str
    trap: str  # tests/vm/powercut.py trap spec
    expect: str  # the start of the trap's note ("" for a cut from outside)
    log: Path | None = None  # the writer's log: the files fsynced before the cut
    before_op: int = 0  # how many of them were fsynced before the operation began
    facts: dict[str, object] = field(default_factory=dict)


def plan() -> list[Cut]:
    """The cuts, in boot order (the migration adds the container the evacuation empties)."""
    return [
        Cut("write", "none", ""),
        Cut("snapshot", "copy-before:1", "cut: copy-before #1"),
        Cut("clone", "copy-after:1", "cut: copy-after #1"),
        Cut("migration", "migrate-repoint-after:4", "cut: repoint-after #4"),
        Cut("evacuation", "repoint-before:3", "cut: repoint-before #3"),
    ]


# --- the guest ----------------------------------------------------------------------------------


def sh(g: Guest, script: str, *args: str, check: bool = True) -> Result:
    """A fixed script; data goes in as positional parameters ($1...), never formatted in."""
    return g.run(["sh", "-ec", script, "sh", *args], timeout=SLOW, check=check)


def tv(g: Guest, *words: str) -> Result:
    """``targetvirt WORDS...`` in the guest (the shell's one-shot form, system bus)."""
    return g.module("targetvirt.manage.shell", *words, timeout=SLOW)


@contextlib.contextmanager
def booted(top: Path, n: int, disk: Path) -> Iterator[Guest]:
    g = Guest.boot(top / f"boot{n}", disks=[disk])
    try:
        g.run(["install", "-D", "-m", "0644", str(CHECKOUT / "packaging/dbus/targetvirt.conf"),
               "/etc/dbus-1/system.d/targetvirt.conf"])  # fmt: skip
        g.run(["dbus-send", "--system", "--type=method_call", "--print-reply",
               "--dest=org.freedesktop.DBus", "/", RELOAD])  # fmt: skip
        yield g
    finally:
        g.shutdown()  # after a cut: already dead, nothing to do


# The one virtio-blk disk; after a reset its ext4 needs its journal replayed (e2fsck exits
# 1 when that changed something), then must be clean.
MOUNT_DISK = """
modprobe virtio_blk
for i in $(seq 120); do ls -d /sys/block/vd* >/dev/null 2>&1 && break; sleep 0.5; done
dev=/dev/$(cd /sys/block && ls -d vd*)
[ -b "$dev" ] || { echo "not one virtio disk: $dev" >&2; exit 1; }
if [ "$1" = new ]; then
  mkfs.ext4 -q -F "$dev"
else
  e2fsck -y -E journal_only "$dev" || [ $? -le 1 ]
  fsck.ext4 -n -f "$dev"
fi
mkdir -p "$2" && mount "$dev" "$2"
"""


def start_daemon(g: Guest, cut: Cut) -> None:
    """targetvirt-handler with the trap of the next cut; waits until it is ready (it
    restores the saved exports first)."""
    log = g.results / f"handler-{cut.name}.log"
    g.run(["mkdir", "-p", STATE, RUN])
    pid = g.spawn(
        [str(g.python_path), "-m", "tests.vm.powercut", "daemon", cut.trap, ARM,
         str(note(g, cut)), "--", "--state-dir", STATE, "--run-dir", RUN, "--lun-timeout", "600"],
        log=log, cwd=CHECKOUT, env={"PYTHONPATH": str(CHECKOUT), "TV_MIGRATE_VDISK": VDISK},
    )  # fmt: skip
    deadline = time.monotonic() + SLOW
    while not (log.exists() and b"ready:" in log.read_bytes()):
        if not g.run(["kill", "-0", str(pid)], check=False).ok:
            pytest.fail(f"targetvirt-handler exited: {log.read_text()[-2000:]}")
        assert time.monotonic() < deadline, "targetvirt-handler not ready"
        time.sleep(1)


def note(g: Guest, cut: Cut) -> Path:
    return g.results / f"cut-{cut.name}.note"


# stack.iscsi_login in one shell: a Python start costs seconds under TCG.  The initiator
# waits for a slow daemon (TCG) rather than failing I/O: a long SCSI command timeout.
LOGIN = """
iscsiadm -m discovery -t st -p 127.0.0.1 >/dev/null
iscsiadm -m node -T "$1" -p 127.0.0.1 --login >/dev/null
for i in $(seq 1200); do
  for s in /sys/class/iscsi_session/session*; do
    [ "$(cat "$s/targetname" 2>/dev/null)" = "$1" ] || continue
    for b in "$s"/device/target*/*:*:*:*/block/*; do
      [ -b "/dev/${b##*/}" ] || continue
      echo 600 > "$b/device/timeout"
      echo "/dev/${b##*/}"
      exit 0
    done
  done
  sleep 0.5
done
echo "no disk for $1 after 600 s" >&2
exit 1
"""


def login(g: Guest, iqn: str) -> str:
    dev = sh(g, LOGIN, iqn).stdout.strip()
    assert re.fullmatch(r"/dev/sd[a-z]+", dev), dev
    return dev


def fsck_lun(g: Guest, dev: str) -> str:
    """Replay the journal (the reset left it dirty), then a full read-only check: clean."""
    sh(g, 'e2fsck -y -E journal_only "$1" || [ $? -le 1 ]', dev)
    res = g.run(["fsck.ext4", "-n", "-f", dev], timeout=SLOW, check=False)
    assert res.rc == 0, f"fsck of {dev} not clean: {res.stdout}{res.stderr}"
    return res.stdout


def verify(g: Guest, mnt: str, logs: list[Path]) -> int:
    """Every file the logs name is there with its content; returns how many."""
    want = sum(len(recorded(log)) for log in logs)
    res = g.module("tests.vm.powercut", "verify", mnt, *map(str, logs), timeout=SLOW)
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["bad"] == [], f"files fsynced before a reset are damaged: {got['bad'][:10]}"
    assert got["verified"] == want, got
    return want


def offline_check(g: Guest) -> dict[str, object]:
    """targetvirt-check on the store as the reset left it (no daemon holds it): no damage.
    Leaks (segments allocated but never committed) are expected; repair reclaims them."""
    cmd = [str(g.python_path), "-m", "targetvirt.check", "--state-dir", STATE]
    env = {"PYTHONPATH": str(CHECKOUT)}
    res = g.run(cmd, timeout=SLOW, check=False, cwd=CHECKOUT, env=env)
    out = res.stdout + res.stderr
    assert "DAMAGE" not in out and res.rc in (0, 1), f"the checker found damage: {out}"
    leaked = re.search(r"leaked segments \(free but holding space\): (\d+)", out)
    assert res.rc == 0 or leaked, f"the checker is not clean, and not for leaks: {out}"
    if res.rc == 1:
        rep = g.run([*cmd, "--repair"], timeout=SLOW, check=False, cwd=CHECKOUT, env=env)
        assert rep.rc == 0 and rep.stdout.endswith("clean\n"), rep.describe()
    vdisks = re.search(r"checked (\d+) vdisks", out)
    assert vdisks, out
    return {"vdisks": int(vdisks.group(1)), "leaked": int(leaked.group(1)) if leaked else 0}


# --- the cuts -------------------------------------------------------------------------------------


def start_writer(g: Guest, cut: Cut) -> None:
    cut.log = g.results / f"cut-{cut.name}.files"
    output = g.results / f"writer-{cut.name}.log"
    argv = ["-m", "tests.vm.powercut", "write", f"{LUN_MNT}/{cut.name}", str(cut.log)]
    g.spawn(
        [str(g.python_path), *argv], log=output, cwd=CHECKOUT, env={"PYTHONPATH": str(CHECKOUT)}
    )
    wait_files(g, cut.log, 10, output)
    cut.before_op = len(recorded(cut.log))


def wait_files(g: Guest, log: Path, n: int, output: Path) -> None:
    """Until the writer has fsynced ``n`` files; it prints nothing unless it failed."""
    deadline = time.monotonic() + SLOW
    while not (log.exists() and len(recorded(log)) >= n):
        assert g.alive(), f"the guest died before {n} files were written: {g.console_tail()}"
        assert not (output.exists() and output.stat().st_size), output.read_text()[-2000:]
        assert time.monotonic() < deadline, f"fewer than {n} files written in {SLOW:.0f} s"
        time.sleep(1)


def until_dead(g: Guest, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while g.alive():
        assert time.monotonic() < deadline, "the guest was not reset"
        time.sleep(0.5)


def cut_now(g: Guest, cut: Cut) -> None:
    """Land the cut: from outside for plain writes, else start the operation and let the
    daemon's trap reset the guest inside it."""
    assert cut.log is not None
    if cut.name == "write":
        wait_files(g, cut.log, cut.before_op + 20, g.results / f"writer-{cut.name}.log")
        with contextlib.suppress(GuestDied):
            g.run(["sh", "-c", "echo b > /proc/sysrq-trigger"], timeout=60)
    else:
        g.run(["touch", ARM])
        start_operation(g, cut)
    until_dead(g)
    if cut.expect:
        text = note(g, cut).read_text() if note(g, cut).exists() else "no note"
        assert text.startswith(cut.expect), f"the reset did not land in the {cut.name}: {text}"
        cut.facts["trap"] = text.strip()
    cut.facts["files_before_cut"] = len(recorded(cut.log))


def start_operation(g: Guest, cut: Cut) -> None:
    """The operation the armed trap cuts (the migration's migrator starts by itself)."""
    if cut.name in ("snapshot", "clone"):
        words = ("snapshot", "name=s1") if cut.name == "snapshot" else ("clone", f"name={CLONE}")
        with contextlib.suppress(GuestDied):
            res = tv(g, f"/vdisks/{VDISK}", *words)
            pytest.fail(f"the {cut.name} finished, the trap did not fire: {res.stdout}")
    elif cut.name == "evacuation":
        g.spawn([str(g.python_path), "-m", "targetvirt.manage.shell", f"/pools/{POOL}",
                 "evacuate", "container=0"], log=g.results / "evacuate.log", cwd=CHECKOUT,
                env={"PYTHONPATH": str(CHECKOUT)})  # fmt: skip


def prepare(g: Guest, cut: Cut) -> None:
    """What the cut needs beyond the writer: a second container to move segments to."""
    if cut.name == "migration":
        out = tv(g, f"/pools/{POOL}", "add", f"path={VAR}/pool1.img", "size=128M").stdout
        assert out.startswith(f"Added container 1 to pool {POOL}"), out


# --- boots ---------------------------------------------------------------------------------------


def first_boot(g: Guest, cut: Cut) -> str:
    """A fresh disk: pool, vdisk, export, login, a filesystem on the LUN; returns its dev."""
    sh(g, MOUNT_DISK, "new", VAR)
    start_daemon(g, cut)
    tv(g, "/pools", "create", f"name={POOL}", f"path={VAR}/pool0.img", "size=128M")
    tv(g, "/vdisks", "create", f"name={VDISK}", "size=64M", f"pool={POOL}")
    tv(g, "/exports", "create", f"vdisk={VDISK}", f"iqn={IQN}", *EXPORT)
    dev = login(g, IQN)
    g.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
           dev], timeout=SLOW)  # fmt: skip
    sh(g, 'mkdir -p "$2" && mount "$1" "$2"', dev, LUN_MNT)
    return dev


def recover(g: Guest, done: list[Cut], next_cut: Cut | None) -> str:
    """Check the last cut: disk, metadata, LUN fsck, every fsynced file; returns the dev."""
    last = done[-1]
    sh(g, MOUNT_DISK, "old", VAR)
    last.facts.update(offline_check(g))
    expected = {"write": 1, "snapshot": 1, "clone": 2, "migration": 2, "evacuation": 2}
    assert last.facts["vdisks"] == expected[last.name], (  # a snapshot cut before it was
        f"after the {last.name} cut: {last.facts['vdisks']} vdisks")  # fmt: skip
    start_daemon(g, next_cut or Cut("final", "none", ""))
    dev = login(g, IQN)
    fsck_lun(g, dev)
    sh(g, 'mkdir -p "$2" && mount "$1" "$2"', dev, LUN_MNT)
    last.facts["files_verified"] = verify(g, LUN_MNT, [c.log for c in done if c.log])
    if last.name == "clone":
        last.facts["clone_files_verified"] = check_clone(g, done)
    return dev


def check_clone(g: Guest, done: list[Cut]) -> int:
    """The clone, durable when the reset came: its filesystem is clean and holds every
    file fsynced before the clone began."""
    tv(g, "/exports", "create", f"vdisk={CLONE}", f"iqn={CLONE_IQN}", *EXPORT)
    dev = login(g, CLONE_IQN)
    fsck_lun(g, dev)
    sh(g, 'mkdir -p "$2" && mount "$1" "$2"', dev, CLONE_MNT)
    *earlier, cut = done
    assert cut.log is not None
    head = g.results / "clone-before.files"  # the files fsynced before the clone began
    head.write_text("".join(f"{n} {s} {d}\n" for n, s, d in recorded(cut.log)[: cut.before_op]))
    n = verify(g, CLONE_MNT, [*(c.log for c in earlier if c.log), head])
    sh(g, 'umount "$1"', CLONE_MNT)
    return n


def last_boot(g: Guest, done: list[Cut], top: Path) -> None:
    """Check the last cut; then the interrupted evacuation runs again to its end, the
    daemon's checker is clean and every file reads back from the other container."""
    recover(g, done, None)
    out = tv(g, f"/pools/{POOL}", "evacuate", "container=0").stdout
    assert "Evacuated container 0" in out, out
    assert tv(g, "check").stdout.endswith("clean\n")
    sh(g, "sync; echo 3 > /proc/sys/vm/drop_caches")  # read from the LUN, not the page cache
    n = verify(g, LUN_MNT, [c.log for c in done if c.log])
    (top / "final.txt").write_text(f"{out}{n} files verified after the evacuation\n")


@pytest.mark.timeout(3600)
def test_power_cut_during_writes_snapshot_clone_migration_evacuation() -> None:
    base = default_workdir()
    top = base.with_name(base.name + "-powercut")
    top.mkdir(parents=True)
    disk = top / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(512 * MIB)  # sparse
    done: list[Cut] = []
    boots: list[float] = []
    for n, cut in enumerate([*plan(), None], 1):
        t0 = time.monotonic()
        try:
            with booted(top, n, disk) as g:
                if cut is None:
                    last_boot(g, done, top)
                else:
                    prepare_and_cut(g, done, cut)
                    done.append(cut)
        finally:  # what each cut showed, also when one fails
            boots.append(round(time.monotonic() - t0, 1))
            summary = {"boot_seconds": boots, "cuts": {c.name: c.facts for c in done}}
            (top / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def prepare_and_cut(g: Guest, done: list[Cut], cut: Cut) -> None:
    if not done:
        first_boot(g, cut)
    else:
        recover(g, done, cut)
    prepare(g, cut)
    start_writer(g, cut)
    cut_now(g, cut)
