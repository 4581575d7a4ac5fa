"""targetvirt-handler on the real stack: LIO, TCMU, iSCSI, the Linux initiator, targetcli.

All in the session's QEMU guest.  The handler runs as it would on a host (a daemon on a
state folder), its pool is a file on the guest's tmpfs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.compliance import Results, run_compliance, targetvirt_backstore
from tests.vm.guest import Guest
from tests.vm.lio import iqn
from tests.vm.stack import iscsi_login, iscsi_logout, start_tcmu_runner

POLICY = Path(__file__).resolve().parents[2] / "packaging" / "dbus" / "targetvirt.conf"


@pytest.mark.vm
@pytest.mark.timeout(2400)
def test_compliance_matches_kernel_fileio(
    guest: Guest, fileio_compliance: Results, results_dir: Path
) -> None:
    """libiscsi's iscsi-test-cu -t ALL against a targetvirt LUN: at least as many passes
    as the kernel's fileio backstore in the same guest, and no more failures."""
    res = run_compliance(guest, targetvirt_backstore("128M"), name="targetvirt",
                         results_dir=results_dir)  # fmt: skip
    cmp = res.compare(fileio_compliance)
    (results_dir / "comparison.json").write_text(
        json.dumps(
            {
                "targetvirt": res.counts(),
                "fileio": fileio_compliance.counts(),
                "regressions": cmp.regressions,
                "fixed": cmp.fixed,
                "lost_passes": cmp.lost_passes,
            },
            indent=2,
        )
    )
    assert res.complete, res.describe()
    assert cmp.ok, cmp.describe()


@pytest.fixture
def lun(guest: Guest) -> Iterator[tuple[str, str]]:
    """A 256 MiB targetvirt LUN exported over iSCSI; yields (iqn, vdisk name)."""
    where, name = "/run/ram/tv-lun", "tvlun"
    guest.module("tests.vm.tvlun", "up", where, name, "256M", "--no-dbus", timeout=300)
    target = iqn("tv-lun")
    guest.lio("iscsi", target, name)
    try:
        yield target, name
    finally:
        guest.lio("delete-target", target)
        guest.lio("delete-so", name)
        guest.module("tests.vm.tvlun", "stop", where, timeout=120, check=False)
        guest.run(["rm", "-rf", where], check=False)


@pytest.mark.vm
@pytest.mark.timeout(1200)
def test_filesystem_and_fio_verify_through_the_linux_initiator(
    guest: Guest, lun: tuple[str, str], results_dir: Path
) -> None:
    target, _ = lun
    dev = iscsi_login(guest, target)
    try:
        guest.run(["fio", "--name=verify", f"--filename={dev}", "--ioengine=libaio",
                   "--direct=1", "--rw=randwrite", "--bs=4k,64k", "--bsrange=4k-256k",
                   "--iodepth=8", "--size=64M", "--verify=crc32c", "--verify_fatal=1",
                   "--do_verify=1", "--randrepeat=0", "--output-format=json",
                   f"--output={results_dir}/fio-verify.json"], timeout=900)  # fmt: skip
        mnt = "/run/ram/mnt"
        guest.run(["mkfs.ext4", "-q", "-F", dev], timeout=300)
        guest.run(["mkdir", "-p", mnt])
        guest.run(["mount", dev, mnt])
        guest.run(["dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M", "count=16"], timeout=300)
        want = guest.run(["sha256sum", f"{mnt}/data"]).stdout.split()[0]
        guest.run(["umount", mnt])
        guest.run(["mount", dev, mnt])  # read back after a remount (no page cache)
        assert guest.run(["sha256sum", f"{mnt}/data"]).stdout.split()[0] == want
        guest.run(["umount", mnt])
        guest.run(["fsck.ext4", "-n", "-f", dev], timeout=300)
    finally:
        iscsi_logout(guest, target)


KILLS = 10
CRASH_LOOP = (3, 7)  # after these kills the successor is killed in its start as well


@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_handler_killed_and_restarted_loses_nothing_acknowledged(
    guest: Guest, lun: tuple[str, str], results_dir: Path
) -> None:
    """SIGKILL the handler under I/O, start it again (as systemd would), ten times: each
    time it takes the device over (block, reset ring, reopen), the initiator's retries go
    through, and fio's verify passes.  Twice the successor is itself killed somewhere in
    its start (a crash loop: opening the store, in the middle of the takeover), and the
    next one must still take the device over.  (The harness forks the daemons from a warm
    interpreter, tests/vm/tvlun.py, so a start here is not spent importing.)

    The LUN keeps its default write-back cache and fio flushes nothing: the handler's
    mapping journal (targetvirt/catalog.py) keeps every completed write across the death
    of the process, which is stronger than the durability contract (flushed writes only).

    A restart takes ~25 s in this TCG guest (~1 s on hardware), close to sd's default
    30 s command timeout, past which the SCSI error handler aborts and resets and reads
    fail with EIO (seen in the first run of this test).  Like iSCSI deployments that ride
    through gateway restarts, the disk gets a 180 s timeout (LIO's cmd_time_out here).
    """
    target, _ = lun
    dev = iscsi_login(guest, target)
    sysfs = f"/sys/block/{Path(dev).name}/device"
    guest.run(["sh", "-c", f"echo 180 > {sysfs}/timeout"])
    cache = f"{sysfs}/scsi_disk/*/cache_type"
    assert guest.run(["sh", "-c", f"cat {cache}"]).stdout.strip() == "write back"
    rng = random.Random()
    runs: list[tuple[int, Path]] = []

    def start_fio() -> int:
        log = results_dir / f"fio-{len(runs)}.log"
        pid = guest.spawn(["fio", f"--name=kill{len(runs)}", f"--filename={dev}",
                           "--ioengine=libaio", "--direct=1", "--rw=randwrite",
                           "--bsrange=4k-64k", "--iodepth=8", "--size=48M",
                           "--verify=crc32c",
                           "--verify_fatal=1", "--do_verify=1", "--randrepeat=0"],
                          log=log)  # fmt: skip
        runs.append((pid, log))
        return pid

    def running(pid: int) -> bool:
        return guest.run(["kill", "-0", str(pid)], check=False).ok

    try:
        fio = start_fio()
        pids = set()
        for _ in range(KILLS):
            if not running(fio):  # it wrote and verified everything between two kills
                fio = start_fio()
            guest.run(["sleep", f"{rng.uniform(1.0, 4.0):.2f}"])
            pid = guest.run(["cat", "/run/ram/tv-lun/handler.pid"]).stdout.strip()
            pids.add(pid)
            uptime = guest.run(["cat", "/proc/uptime"]).stdout.split()[0]
            guest.run(["kill", "-9", pid])
            if len(pids) in CRASH_LOOP:  # its successor dies too, somewhere in its start
                crash = guest.module("tests.vm.tvlun", "crash", "/run/ram/tv-lun",
                                     f"{rng.uniform(0.5, 8.0):.2f}", "--no-dbus",
                                     timeout=300)  # fmt: skip
                with open(results_dir / "kills.txt", "a") as f:
                    f.write(f"a successor killed in its start: {crash.stdout.strip()}\n")
            guest.module("tests.vm.tvlun", "restart", "/run/ram/tv-lun", "--no-dbus",
                         timeout=300)  # fmt: skip
            ready = guest.run(["cat", "/proc/uptime"]).stdout.split()[0]
            with open(results_dir / "kills.txt", "a") as f:  # guest clock, beside dmesg
                f.write(f"killed {pid} at {uptime}, successor ready at {ready}\n")
        assert len(pids) == KILLS  # a new handler process each time
        guest.run(["sh", "-c", f"while kill -0 {fio} 2>/dev/null; do sleep 1; done"],
                  timeout=900)  # fmt: skip
        for _, log in runs:
            text = log.read_text()
            assert "err= 0" in text, text[-2000:]
            assert "verify" not in text.lower() or "bad" not in text.lower(), text[-2000:]
    finally:
        guest.run(["cp", "/run/ram/tv-lun/handler.log", str(results_dir)], check=False)
        iscsi_logout(guest, target)


@pytest.mark.vm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("with_runner", [False, True], ids=["alone", "beside-tcmu-runner"])
def test_targetcli_lists_and_validates_user_targetvirt(
    guest: Guest, results_dir: Path, with_runner: bool
) -> None:
    guest.run(["cp", str(POLICY), "/etc/dbus-1/system.d/targetvirt.conf"])
    guest.run(["dbus-send", "--system", "--type=method_call", "--dest=org.freedesktop.DBus",
               "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"])  # fmt: skip
    runner = start_tcmu_runner(guest, results_dir / "tcmu-runner.log") if with_runner else None
    where = "/run/ram/tv-cli"
    try:
        guest.module("tests.vm.tvlun", "up", where, "known", "64M", timeout=300)
        listing = guest.run(["targetcli", "ls", "/backstores"]).stdout
        assert "user:targetvirt" in listing, listing
        ok = guest.run(["targetcli", "/backstores/user:targetvirt", "create", "name=viacli",
                        "size=64M", "cfgstring=known"], check=False)  # fmt: skip
        assert ok.ok, ok.describe()
        bad = guest.run(["targetcli", "/backstores/user:targetvirt", "create", "name=bad",
                         "size=64M", "cfgstring=nosuchvdisk"], check=False)  # fmt: skip
        assert not bad.ok or "cfgstring invalid" in bad.stdout + bad.stderr
        assert "no vdisk named 'nosuchvdisk'" in bad.stdout + bad.stderr
    finally:
        for so in ("viacli", "known"):
            guest.module("tests.vm.lio", "delete-so", so, check=False)
        guest.module("tests.vm.tvlun", "stop", where, timeout=120, check=False)
        guest.run(["rm", "-rf", where], check=False)
        if runner is not None:
            runner.stop()
