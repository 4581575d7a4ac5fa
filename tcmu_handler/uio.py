"""The kernel edge of one TCMU device: sysfs discovery, /dev/uioN, the mmap, events,
and the configfs actions of the restart sequence (tcmu.md 1.8, 1.9, 2.1, 2.2).

Every root path is a parameter so tests run against a fake tree. The ring itself is
:mod:`tcmu_handler.ring`; this module only does the I/O around it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import select
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from targetvirt.clock import Clock, MonotonicClock
from tcmu_handler.config import SUBTYPE
from tcmu_handler.ring import UNBLOCK, RecoveryStep, ResetMode, Ring, recovery_steps

SYSFS_UIO: Final = Path("/sys/class/uio")
DEV_ROOT: Final = Path("/dev")
CONFIGFS_ROOT: Final = Path("/sys/kernel/config")
UIO_NAME_PREFIX: Final = "tcm-user"

_UIO_DIR = re.compile(r"uio(\d+)")
_EVENT_SIZE: Final = 4  # uio read/write must be exactly one s32
_NOTIFY: Final = b"\0\0\0\0"


# --- names and discovery ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UioName:
    """A parsed uio name ``tcm-user/<hba>/<dev_name>[/<dev_config>]``."""

    hba: int  # N of configfs core/user_N
    dev_name: str  # the storage object's configfs directory name
    dev_config: str | None  # "<subtype>/<cfgstring>" by convention, as written

    @property
    def subtype(self) -> str | None:
        if self.dev_config is None:
            return None
        return self.dev_config.split("/", 1)[0]

    @property
    def cfgstring(self) -> str | None:
        """What follows ``<subtype>/`` in the config (None without a '/')."""
        if self.dev_config is None or "/" not in self.dev_config:
            return None
        return self.dev_config.split("/", 1)[1]


def parse_uio_name(name: str) -> UioName | None:
    """Parse a uio ``name`` (a trailing newline from sysfs is dropped); None if it is
    not a TCMU device name."""
    parts = name.removesuffix("\n").split("/", 3)
    if len(parts) < 3 or parts[0] != UIO_NAME_PREFIX:
        return None
    hba, dev_name = parts[1], parts[2]
    if not hba.isascii() or not hba.isdigit() or not dev_name:
        return None
    return UioName(int(hba), dev_name, parts[3] if len(parts) == 4 else None)


@dataclass(frozen=True, slots=True)
class UioDevice:
    """A TCMU uio device found in sysfs."""

    minor: int  # N of /dev/uioN, also the netlink TCMU_ATTR_MINOR
    name: UioName
    map_size: int  # exact mmap length (maps/map0/size)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="surrogateescape")


def read_device(minor: int, sysfs_root: Path = SYSFS_UIO) -> UioDevice | None:
    """The TCMU device ``uio<minor>``, or None if it is gone or not a TCMU device."""
    base = sysfs_root / f"uio{minor}"
    try:
        name = parse_uio_name(_read_text(base / "name"))
        if name is None:
            return None
        # printed with %pa, e.g. 0x0000000040800000
        size = int(_read_text(base / "maps" / "map0" / "size").strip(), 0)
    except (OSError, ValueError):
        return None  # removed while we looked, or not a uio device we understand
    return UioDevice(minor, name, size)


def scan(sysfs_root: Path = SYSFS_UIO, subtype: str = SUBTYPE) -> list[UioDevice]:
    """Every TCMU device of ``subtype`` (exact match, not a prefix), by minor."""
    try:
        entries = list(sysfs_root.iterdir())
    except FileNotFoundError:
        return []  # no uio device at all (module not loaded)
    found = []
    for entry in entries:
        match = _UIO_DIR.fullmatch(entry.name)
        if match is None:
            continue
        device = read_device(int(match.group(1)), sysfs_root)
        if device is not None and device.name.subtype == subtype:
            found.append(device)
    return sorted(found, key=lambda d: d.minor)


# --- the device node and its mmap -----------------------------------------------------------


def open_node(
    minor: int,
    *,
    dev_root: Path = DEV_ROOT,
    clock: Clock | None = None,
    timeout: float = 2.0,
    interval: float = 0.05,
) -> int:
    """Open ``/dev/uio<minor>`` (O_RDWR|O_NONBLOCK|O_CLOEXEC), retrying while the node
    does not exist yet: the netlink event can beat udev."""
    clock = clock or MonotonicClock()
    path = dev_root / f"uio{minor}"
    deadline = clock.now() + timeout
    pause = threading.Condition()
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if clock.now() >= deadline:
                raise
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise OSError(
                    e.errno, "already open by another process (tcmu-runner?)", str(path)
                ) from e
            raise
        with pause:
            clock.wait(pause, min(deadline, clock.now() + interval))


class UioHandle:
    """An open, mapped TCMU uio device: the fd to poll, the mmap, events."""

    def __init__(self, fd: int, buffer: mmap.mmap, device: UioDevice | None = None) -> None:
        self._fd = fd
        self.buffer = buffer
        self.device = device
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def open(
        cls,
        device: UioDevice,
        *,
        dev_root: Path = DEV_ROOT,
        clock: Clock | None = None,
        timeout: float = 2.0,
    ) -> UioHandle:
        fd = open_node(device.minor, dev_root=dev_root, clock=clock, timeout=timeout)
        return cls.map(fd, device)

    @classmethod
    def map(cls, fd: int, device: UioDevice) -> UioHandle:
        """Map an open node (closed if the mapping fails)."""
        try:
            # The kernel refuses (EINVAL) any length but exactly map0's size.
            buffer = mmap.mmap(
                fd,
                device.map_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=0,
            )
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, buffer, device)

    def fileno(self) -> int:
        return self._fd

    def take_event(self) -> int | None:
        """Consume a pending event: the kernel's s32 event counter, None if none."""
        try:
            data = os.read(self._fd, _EVENT_SIZE)
        except BlockingIOError:
            return None
        if len(data) != _EVENT_SIZE:
            raise OSError(errno.EIO, f"uio read returned {len(data)} bytes, expected 4")
        return int.from_bytes(data, sys.byteorder, signed=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the kernel signals new entries (or ``timeout`` seconds pass);
        consumes the event. Fetch the ring after True, and also once after mapping:
        commands queued before ``open()`` raise no event."""
        ms = None if timeout is None else max(0, round(timeout * 1000))
        if not self._poll.poll(ms):
            return False
        return self.take_event() is not None

    def notify(self) -> None:
        """Tell the kernel the tail moved: it reaps completions up to ``cmd_tail``."""
        written = os.write(self._fd, _NOTIFY)
        if written != _EVENT_SIZE:
            raise OSError(errno.EIO, f"uio write took {written} bytes, expected 4")

    def close(self) -> None:
        """Unmap and close. Every view of the buffer (ring, commands) must be released
        first, or the unmap fails with BufferError and the fd stays open."""
        self.buffer.close()
        os.close(self._fd)

    def __enter__(self) -> UioHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- configfs actions and the restart sequence --------------------------------------------------


class DeviceActions:
    """The ``action/`` files of a user backstore in configfs."""

    def __init__(self, name: UioName, configfs_root: Path = CONFIGFS_ROOT) -> None:
        self.path = configfs_root / "target" / "core" / f"user_{name.hba}" / name.dev_name

    def apply(self, step: RecoveryStep) -> None:
        self._write(step.attribute, step.value)

    def _write(self, attribute: str, value: str) -> None:
        path = self.path / attribute
        # configfs attributes exist already: no O_CREAT, no O_TRUNC.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            data = value.encode()
            written = os.write(fd, data)
        except OSError as e:
            raise OSError(e.errno, f"writing {value!r} failed: {e.strerror}", str(path)) from e
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(errno.EIO, f"short write of {value!r}", str(path))

    def block(self) -> None:
        self._write("action/block_dev", "1")

    def unblock(self) -> None:
        self.apply(UNBLOCK)

    def reset_ring(self, mode: ResetMode = ResetMode.BUSY) -> None:
        self._write("action/reset_ring", str(int(mode)))

    def is_blocked(self) -> bool:
        return _read_text(self.path / "action" / "block_dev").strip() == "blocked"


def attach(
    device: UioDevice,
    *,
    reset: ResetMode | None = ResetMode.BUSY,
    configfs_root: Path = CONFIGFS_ROOT,
    dev_root: Path = DEV_ROOT,
    clock: Clock | None = None,
    actions: DeviceActions | None = None,
) -> tuple[UioHandle, Ring]:
    """Take over a device: open it, block it and reset its ring (unless ``reset`` is
    None, for a device just created), map it, check the mailbox, then unblock.

    The node is opened first because the kernel lets one process have it open: a
    device another process still serves (a second daemon, or a predecessor still
    exiting) fails here with EBUSY before anything touches its ring.  (libtcmu opens
    after the reset; opening changes nothing in the ring, so the order is free.)

    The caller must fetch the ring once right away. If anything fails after blocking,
    the device is left blocked (initiators get BUSY and retry) and the error raised.
    """
    actions = actions or DeviceActions(device.name, configfs_root)
    fd = open_node(device.minor, dev_root=dev_root, clock=clock)
    try:
        if reset is not None:
            for step in recovery_steps(reset):
                actions.apply(step)
    except BaseException:
        os.close(fd)
        raise
    handle = UioHandle.map(fd, device)
    ring: Ring | None = None
    try:
        ring = Ring(handle.buffer)
        if reset is not None:
            actions.unblock()
    except BaseException:
        if ring is not None:
            ring.release()
        handle.close()
        raise
    return handle, ring
