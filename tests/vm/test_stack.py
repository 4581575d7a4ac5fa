"""The real LIO stack works in the test guest: rtslib-fb, libiscsi, the Linux iSCSI
initiator, tcmu-runner.  These are the foundations every later real-stack test uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm.guest import Guest
from tests.vm.lio import iqn
from tests.vm.stack import (
    create_qcow2,
    iscsi_login,
    iscsi_logout,
    leftovers,
    lio_state,
    start_tcmu_runner,
)

pytestmark = pytest.mark.vm

MIB = 1 << 20
TPG = "/sys/kernel/config/target/iscsi/{}/tpgt_1"


@pytest.mark.vm
def test_guest_basics(guest: Guest, results_dir: Path) -> None:
    """The harness itself: output, exit codes, the venv and checkout, shared results."""
    assert guest.run(["uname", "-r"]).stdout.strip() == guest.info["uname"]
    res = guest.run(["sh", "-c", "echo o; echo e >&2; exit 7"], check=False)
    assert (res.rc, res.stdout, res.stderr) == (7, "o\n", "e\n")
    assert guest.run(["sleep", "30"], timeout=1, check=False).timed_out
    out = guest.python_json(
        "import json, sys, importlib.metadata as m; "
        "print(json.dumps([sys.prefix, m.version('rtslib-fb')]))"
    )
    assert Path(out[0]).name == ".venv" and out[1].startswith("2.")
    guest.run(["sh", "-c", 'echo from-guest > "$0"', str(results_dir / "hello.txt")])
    assert (results_dir / "hello.txt").read_text() == "from-guest\n"
    # LIO keeps APTPL/ALUA metadata under dbroot, which must be a real folder: the setup
    # points it at /etc/target; Debian's rtslib-fb (used by tests that run Debian's
    # targetcli) moves it to /etc/rtslib-fb-target once configfs has been cleared.
    dbroot = guest.run(["cat", "/sys/kernel/config/target/dbroot"]).stdout.strip()
    assert dbroot in ("/etc/target", "/etc/rtslib-fb-target"), dbroot
    guest.run(["test", "-d", dbroot])
    mods = guest.run(["cat", "/proc/modules"]).stdout
    for m in ("target_core_user", "tcm_loop", "iscsi_target_mod", "target_core_file", "uio"):
        assert f"{m} " in mods


@pytest.mark.vm
def test_rtslib_fileio_iscsi_seen_by_libiscsi(guest: Guest) -> None:
    """rtslib-fb from the venv builds a fileio LUN on tmpfs exported over iSCSI on
    127.0.0.1; libiscsi's iscsi-inq and iscsi-readcapacity16 see it."""
    target = iqn("stack-a")
    size = 64 * MIB
    guest.lio("fileio", "stack_a", "/run/ram/stack_a.img", str(size))
    guest.lio("iscsi", target, "stack_a")
    tpg = TPG.format(target)
    attrs = guest.run(
        [
            "cat",
            f"{tpg}/attrib/generate_node_acls",
            f"{tpg}/attrib/authentication",
            f"{tpg}/attrib/demo_mode_write_protect",
            f"{tpg}/enable",
        ]
    ).stdout.split()
    assert attrs == ["1", "0", "0", "1"]
    assert guest.run(["ls", f"{tpg}/np"]).stdout.split() == ["127.0.0.1:3260"]

    url = f"iscsi://127.0.0.1/{target}/0"
    inq = guest.run(["iscsi-inq", url]).stdout
    assert "Vendor:LIO-ORG" in inq and "Product:FILEIO" in inq
    assert "Peripheral Device Type:DIRECT_ACCESS" in inq
    cap = guest.run(["iscsi-readcapacity16", url]).stdout
    assert f"Total size:{size}" in cap
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap

    guest.lio("delete-target", target)
    guest.lio("delete-so", "stack_a")
    assert lio_state(guest) == {"storage_objects": [], "targets": []}


@pytest.mark.vm
def test_linux_initiator_data_and_filesystem(guest: Guest) -> None:
    """iscsiadm discovery + login gives a /dev/sdX; O_DIRECT data reads back identical;
    ext4 mkfs/mount/write/umount works; logout and teardown leave LIO clean."""
    target = iqn("stack-b")
    guest.lio("fileio", "stack_b", "/run/ram/stack_b.img", str(64 * MIB))
    guest.lio("iscsi", target, "stack_b")
    dev = iscsi_login(guest, target)
    assert dev.startswith("/dev/sd")
    assert guest.run(["lsblk", "-dn", "-o", "TRAN", dev]).stdout.strip() == "iscsi"

    # O_DIRECT round trip at the start and at the last 4 MiB of the LUN.
    guest.run(["dd", "if=/dev/urandom", "of=/run/ram/pattern", "bs=1M", "count=4"])
    for seek in ("0", "60"):
        guest.run(["dd", "if=/run/ram/pattern", f"of={dev}", "bs=1M", f"seek={seek}",
                   "oflag=direct", "conv=fsync"])  # fmt: skip
        guest.run(["dd", f"if={dev}", "of=/run/ram/readback", "bs=1M", f"skip={seek}",
                   "count=4", "iflag=direct"])  # fmt: skip
        guest.run(["cmp", "/run/ram/pattern", "/run/ram/readback"])

    # A filesystem on it, data survives umount + mount.
    mnt = "/run/ram/mnt"
    guest.run(["mkfs.ext4", "-q", "-F", dev], timeout=300)
    guest.run(["mkdir", "-p", mnt])
    guest.run(["mount", dev, mnt])
    guest.run(["cp", "/run/ram/pattern", f"{mnt}/file"])
    guest.run(["umount", mnt])
    guest.run(["mount", dev, mnt])
    guest.run(["cmp", "/run/ram/pattern", f"{mnt}/file"])
    guest.run(["umount", mnt])
    guest.run(["fsck.ext4", "-n", "-f", dev], timeout=300)

    iscsi_logout(guest, target)
    assert guest.run(["iscsiadm", "-m", "session"], check=False).rc == 21  # no sessions
    guest.lio("delete-target", target)
    guest.lio("delete-so", "stack_b")
    guest.run(["rm", "-f", "/run/ram/stack_b.img", "/run/ram/pattern", "/run/ram/readback"])
    assert lio_state(guest) == {"storage_objects": [], "targets": []}
    assert leftovers(guest) == []


@pytest.mark.vm
def test_tcmu_runner_qcow_lun(guest: Guest, results_dir: Path) -> None:
    """tcmu-runner (with its D-Bus service) serves a qcow2 file as a user backstore; the
    Linux initiator writes and reads it; the data really is in the qcow2 image."""
    qcow = "/run/ram/stack_c.qcow2"
    target = iqn("stack-c")
    runner = start_tcmu_runner(guest, results_dir / "tcmu-runner.log")
    try:
        create_qcow2(guest, qcow, 64 * MIB)  # metadata-preallocated: see QCOW_CREATE_OPTS
        so = guest.lio("user", "stack_c", f"qcow/{qcow}", str(64 * MIB))
        assert so["plugin"] == "user"
        info = guest.sh("cat /sys/kernel/config/target/core/user_*/stack_c/info").stdout
        guest.lio("iscsi", target, "stack_c")
        inq = guest.run(["iscsi-inq", f"iscsi://127.0.0.1/{target}/0"]).stdout
        assert "Product:TCMU device" in inq, inq

        dev = iscsi_login(guest, target)
        guest.run(["dd", "if=/dev/urandom", "of=/run/ram/pattern", "bs=1M", "count=4"])
        guest.run(["dd", "if=/run/ram/pattern", f"of={dev}", "bs=1M", "seek=8",
                   "oflag=direct", "conv=fsync"])  # fmt: skip
        guest.run(["dd", f"if={dev}", "of=/run/ram/readback", "bs=1M", "skip=8", "count=4",
                   "iflag=direct"])  # fmt: skip
        guest.run(["cmp", "/run/ram/pattern", "/run/ram/readback"])
        iscsi_logout(guest, target)
        guest.lio("delete-target", target)
        guest.lio("delete-so", "stack_c")
    finally:
        runner.stop()

    # The image is a valid qcow2 holding the data at the offset written.
    check = json.loads(guest.run(["qemu-img", "check", "--output=json", qcow]).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    guest.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, "/run/ram/raw"])
    guest.run(["dd", "if=/run/ram/raw", "of=/run/ram/fromimg", "bs=1M", "skip=8", "count=4"])
    guest.run(["cmp", "/run/ram/pattern", "/run/ram/fromimg"])
    (results_dir / "user-backstore-info.txt").write_text(info)
    assert lio_state(guest) == {"storage_objects": [], "targets": []}
