"""LIO helpers that run INSIDE the test guest (with the project venv's python, as root).

Used by the vm tests (through ``Guest.lio(...)``, i.e. ``python -m tests.vm.lio ...``),
by the compliance helper and by ``bench/lun.py``.  Each CLI subcommand prints one JSON
object on stdout.  Library functions can also be imported directly by code running in the
guest.

rtslib-fb is imported lazily so that this module can be imported (for its constants) on
the host, which has no configfs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The portal every test target listens on (the guest's loopback).
PORTAL_IP = "127.0.0.1"
PORTAL_PORT = 3260
#: IQN prefix; rtslib only accepts IQNs with a reversed domain (iqn.YYYY-MM.tld.name:x).
IQN_PREFIX = "iqn.2026-11.org.example"
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def iqn(name: str) -> str:
    """The test IQN for ``name`` (lower case letters, digits, '-' and '.')."""
    return f"{IQN_PREFIX}:{name}"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in SIZE_UNITS else ""
    return int(t[: len(t) - len(unit)]) * SIZE_UNITS[unit]


def _rtslib() -> Any:
    import rtslib_fb  # noqa: PLC0415 - only importable where configfs exists

    # An RTSRoot made before the first storage object sets target/dbroot to /etc/target
    # (as targetcli does); storage objects alone never do (see guest-setup.sh).
    rtslib_fb.RTSRoot()
    return rtslib_fb


def find_storage_object(name: str) -> Any:
    rts = _rtslib()
    for so in rts.RTSRoot().storage_objects:
        if so.name == name:
            return so
    raise LookupError(f"no storage object named {name!r}")


def create_fileio(name: str, path: str, size: int, *, write_back: bool = True) -> Any:
    """A fileio backstore on ``path`` (created sparse at ``size`` if missing)."""
    rts = _rtslib()
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)
    return rts.FileIOStorageObject(name, dev=str(p), size=size, write_back=write_back)


def create_user(name: str, config: str, size: int, *, control: str | None = None) -> Any:
    """A TCMU (``user``) backstore; ``config`` is ``<subtype>/<cfgstring>``."""
    rts = _rtslib()
    return rts.UserBackedStorageObject(name, config=config, size=size, control=control)


def export_iscsi(target_iqn: str, so_name: str, *, lun: int = 0) -> dict[str, Any]:
    """An iSCSI target with one TPG, portal 127.0.0.1:3260, the storage object as ``lun``,
    demo mode (generate_node_acls=1, no auth, writable) so any initiator may log in."""
    rts = _rtslib()
    so = find_storage_object(so_name)
    fabric = rts.FabricModule("iscsi")
    target = rts.Target(fabric, target_iqn)
    tpg = rts.TPG(target, 1)
    tpg.set_attribute("generate_node_acls", "1")
    tpg.set_attribute("authentication", "0")
    tpg.set_attribute("demo_mode_write_protect", "0")
    tpg.set_attribute("cache_dynamic_acls", "1")
    rts.NetworkPortal(tpg, PORTAL_IP, PORTAL_PORT)
    rts.LUN(tpg, lun, so)
    tpg.enable = True
    return {"iqn": target_iqn, "lun": lun, "portal": f"{PORTAL_IP}:{PORTAL_PORT}"}


def export_loopback(so_name: str, *, timeout: float = 60.0) -> dict[str, Any]:
    """A tcm_loop target with the storage object as LUN 0; waits for its /dev/sdX."""
    rts = _rtslib()
    so = find_storage_object(so_name)
    target = rts.Target(rts.FabricModule("loopback"))
    tpg = rts.TPG(target, 1)
    rts.LUN(tpg, 0, so)
    # The TPG's nexus creates a SCSI host; its H:C:T address is in tpgt_1/address.
    address = (Path(tpg.path) / "address").read_text().strip()
    dev = wait_for_disk(lambda: _disk_at(address), timeout, f"loopback {target.wwn}")
    return {"wwn": target.wwn, "address": address, "dev": dev}


def _disk_at(address: str) -> str | None:
    for blk in Path("/sys/class/scsi_device").glob(f"{address}:*/device/block/*"):
        return f"/dev/{blk.name}"
    return None


def iscsi_disk(target_iqn: str) -> str | None:
    """The /dev/sdX of the Linux initiator's session to ``target_iqn``, if any."""
    for sess in Path("/sys/class/iscsi_session").glob("session*"):
        try:
            if (sess / "targetname").read_text().strip() != target_iqn:
                continue
        except OSError:
            continue
        for blk in sess.glob("device/target*/*:*:*:*/block/*"):
            return f"/dev/{blk.name}"
    return None


def wait_for_disk(find: Any, timeout: float, what: str) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dev = find()
        if dev and os.path.exists(dev):
            return str(dev)
        time.sleep(0.2)
    raise TimeoutError(f"no block device for {what} after {timeout:.0f} s")


def delete_target(wwn: str) -> None:
    rts = _rtslib()
    for t in rts.RTSRoot().targets:
        if t.wwn == wwn:
            t.delete()
            return
    raise LookupError(f"no target {wwn!r}")


def delete_storage_object(name: str) -> None:
    find_storage_object(name).delete()


def clear() -> None:
    """Remove every target and storage object (the guest is ours alone)."""
    _rtslib().RTSRoot().clear_existing(confirm=True)


CONFIGFS = Path("/sys/kernel/config/target")


def leftovers() -> list[str]:
    """Cheap check (no rtslib import) for state a test left behind: iSCSI initiator
    sessions, LIO targets, storage objects, tcmu-runner processes."""
    found = [f"iscsi-session:{p.name}" for p in Path("/sys/class/iscsi_session").glob("*")]
    for fabric in ("iscsi", "loopback"):
        for t in (CONFIGFS / fabric).glob("*"):
            if t.is_dir() and t.name != "discovery_auth":
                found.append(f"target:{fabric}/{t.name}")
    for hba in (CONFIGFS / "core").glob("*_*"):
        found += [f"so:{hba.name}/{so.name}" for so in hba.iterdir() if so.is_dir()]
    found += [f"tcmu-runner:{pid}" for pid in pids_of("tcmu-runner")]
    for mnt in Path("/proc/mounts").read_text().splitlines():
        source, point = mnt.split()[:2]
        if source.startswith("/dev/sd"):
            found.append(f"mount:{point}")
    return found


def pids_of(comm: str) -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if (p / "comm").read_text().strip() == comm:
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def reset(scratch: Path = Path("/run/ram")) -> list[str]:
    """Return the guest to its post-setup state: log the initiator out of everything,
    remove all targets and storage objects, stop tcmu-runner, empty the scratch tmpfs.
    Returns what it found (see leftovers)."""
    found = leftovers()
    if not found and not any(scratch.iterdir()):
        return found
    for mnt in reversed(Path("/proc/mounts").read_text().splitlines()):
        source, point = mnt.split()[:2]
        if source.startswith("/dev/sd") or point.startswith(str(scratch) + "/"):
            _quiet(["umount", "-l", point], 60)
    if any(f.startswith("iscsi-session:") for f in found):
        _quiet(["iscsiadm", "-m", "node", "--logoutall=all"], 300)
    _quiet(["iscsiadm", "-m", "node", "-o", "delete"], 60)
    if any(not f.startswith("tcmu-runner:") for f in found):
        clear()  # before stopping tcmu-runner, so it can answer REMOVED_DEVICE
    for pid in pids_of("tcmu-runner"):
        os.kill(pid, signal.SIGTERM)
    for child in scratch.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return found


def _quiet(argv: list[str], timeout: float) -> None:
    """Best-effort cleanup step: report failures on stderr, never raise."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"reset: {' '.join(argv)} timed out after {timeout:.0f} s", file=sys.stderr)
        return
    if proc.returncode not in (0, 21):  # 21: iscsiadm found nothing to do
        print(f"reset: {' '.join(argv)}: {proc.stderr.strip()}", file=sys.stderr)


def state() -> dict[str, Any]:
    """What LIO has configured, as plain data."""
    root = _rtslib().RTSRoot()
    return {
        "storage_objects": sorted(f"{so.plugin}/{so.name}" for so in root.storage_objects),
        "targets": sorted(f"{t.fabric_module.name}/{t.wwn}" for t in root.targets),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vm.lio", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fileio", help="create a fileio backstore")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("size")
    p.add_argument("--write-through", action="store_true")
    p = sub.add_parser("user", help="create a TCMU user backstore")
    p.add_argument("name")
    p.add_argument("config", help="<subtype>/<cfgstring>, e.g. qcow//run/ram/a.qcow2")
    p.add_argument("size")
    p.add_argument("--control")
    p = sub.add_parser("iscsi", help="export a storage object over iSCSI on 127.0.0.1")
    p.add_argument("iqn")
    p.add_argument("so")
    p.add_argument("--lun", type=int, default=0)
    p = sub.add_parser("loopback", help="export a storage object via tcm_loop")
    p.add_argument("so")
    p = sub.add_parser("iscsi-disk", help="wait for the initiator's /dev/sdX of a target")
    p.add_argument("iqn")
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("delete-target")
    p.add_argument("wwn")
    p = sub.add_parser("delete-so")
    p.add_argument("name")
    sub.add_parser("clear", help="remove all targets and storage objects")
    sub.add_parser("state", help="print what is configured")
    sub.add_parser("leftovers", help="list sessions/targets/backstores/daemons left behind")
    sub.add_parser("reset", help="remove everything leftovers lists, empty /run/ram")
    a = ap.parse_args(argv)

    out: dict[str, Any] = {}
    if a.cmd == "fileio":
        so = create_fileio(a.name, a.file, parse_size(a.size), write_back=not a.write_through)
        out = {"name": so.name, "plugin": so.plugin, "wwn": so.wwn}
    elif a.cmd == "user":
        so = create_user(a.name, a.config, parse_size(a.size), control=a.control)
        out = {"name": so.name, "plugin": so.plugin, "wwn": so.wwn}
    elif a.cmd == "iscsi":
        out = export_iscsi(a.iqn, a.so, lun=a.lun)
    elif a.cmd == "loopback":
        out = export_loopback(a.so)
    elif a.cmd == "iscsi-disk":
        out = {"dev": wait_for_disk(lambda: iscsi_disk(a.iqn), a.timeout, a.iqn)}
    elif a.cmd == "delete-target":
        delete_target(a.wwn)
    elif a.cmd == "delete-so":
        delete_storage_object(a.name)
    elif a.cmd == "clear":
        clear()
    elif a.cmd == "state":
        out = state()
    elif a.cmd == "leftovers":
        out = {"leftovers": leftovers()}
    elif a.cmd == "reset":
        out = {"leftovers": reset()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
