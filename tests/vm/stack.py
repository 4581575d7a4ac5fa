"""Host-side helpers for driving the real stack in the test guest: tcmu-runner, the Linux
iSCSI initiator, LUN exports.  Everything here talks to a ``Guest``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.guest import Guest, GuestError
from tests.vm.lio import PORTAL_IP

TCMU_BUS_NAME = "org.kernel.TCMUService1"

#: qemu-img options for qcow2 images served by tcmu-runner from a tmpfs.  tcmu-runner's
#: qcow handler (1.5.4) allocates every new cluster with fallocate(FALLOC_FL_ZERO_RANGE),
#: which tmpfs does not support (EOPNOTSUPP), so writes to unallocated clusters fail with
#: MEDIUM ERROR.  With metadata preallocation every cluster is mapped up front (the data
#: stays sparse) and the handler never allocates.
QCOW_CREATE_OPTS = ["-f", "qcow2", "-o", "preallocation=metadata"]


def create_qcow2(guest: Guest, path: str, size: int | str) -> None:
    guest.run(["qemu-img", "create", "-q", *QCOW_CREATE_OPTS, path, str(size)], timeout=300)


def bus_name_owned(guest: Guest, name: str) -> bool:
    res = guest.run(
        [
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            f"string:{name}",
        ],
        check=False,
        timeout=30,
    )
    return res.ok and "boolean true" in res.stdout


@dataclass
class TcmuRunner:
    """A tcmu-runner started in the guest (stop it with ``stop()``)."""

    guest: Guest
    pid: int
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by pid, wait for it to go; SIGKILL if it does not."""
        self.guest.run(["kill", str(self.pid)], check=False)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.guest.run(["kill", "-0", str(self.pid)], check=False).ok:
                break
            time.sleep(0.5)
        else:
            self.guest.run(["kill", "-9", str(self.pid)], check=False)
        # its own log file (it also logs to stdout/stderr, which go to self.log)
        self.guest.run(["cp", "/var/log/tcmu-runner.log", str(self.log) + ".file"], check=False)


def start_tcmu_runner(guest: Guest, log: Path, *, timeout: float = 60.0) -> TcmuRunner:
    """Start tcmu-runner in the guest and wait until it owns its D-Bus name (it needs
    the system bus, which the guest setup starts; without it tcmu-runner exits).  Do not
    use ``--debug``: it logs every SCSI command and makes I/O ~40x slower under TCG."""
    if bus_name_owned(guest, TCMU_BUS_NAME):
        raise GuestError(f"{TCMU_BUS_NAME} is already owned in the guest (another tcmu-runner?)")
    pid = guest.spawn(["tcmu-runner"], log=log)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if bus_name_owned(guest, TCMU_BUS_NAME):
            return TcmuRunner(guest, pid, log)
        if not guest.run(["kill", "-0", str(pid)], check=False).ok:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-1000:] if log.exists() else ""
    guest.run(["kill", "-9", str(pid)], check=False)
    raise GuestError(f"tcmu-runner did not come up on D-Bus within {timeout:.0f} s; log: {tail}")


def iscsi_login(guest: Guest, iqn: str, *, timeout: float = 120.0) -> str:
    """Discover and log the guest's Linux initiator in to ``iqn`` at 127.0.0.1; returns
    the /dev/sdX it gets."""
    guest.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", PORTAL_IP], timeout=timeout)
    guest.run(["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL_IP, "--login"], timeout=timeout)
    dev = guest.lio("iscsi-disk", iqn, "--timeout", str(timeout))["dev"]
    return str(dev)


def iscsi_logout(guest: Guest, iqn: str, *, timeout: float = 120.0) -> None:
    guest.run(["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL_IP, "--logout"], timeout=timeout)
    guest.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", iqn], timeout=timeout)


def lio_state(guest: Guest) -> dict[str, list[str]]:
    state: dict[str, list[str]] = guest.lio("state")
    return state


def leftovers(guest: Guest) -> list[str]:
    found: list[str] = guest.lio("leftovers")["leftovers"]
    return found


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
