"""Every targetvirt TCMU device of this host: discovery, netlink events, device loops.

At start the service subscribes to the TCM-USER netlink family, then takes over the
devices that already exist (found in sysfs: LIO may have restored them before we ran)
with the open / block / reset-ring / map sequence, so nothing left in a ring from a previous
handler is replayed, and with the mode state (write cache...) that initiators set before
the restart (tcmu_handler/modestate.py).  Then it follows ADDED / REMOVED / RECONFIG
events, answering each with the DONE message that matches it.  One device failing to
open never stops the others, and a refused device is tried again every
``RETRY_SECONDS`` (a vdisk created later, a predecessor that had not yet let go of the
device): it is served as soon as it can be, its reason logged once per change.

Backends are supplied by the caller (the daemon): ``open_lun(config, info)`` returns the
block backend and the LUN state for a device, or raises a TargetvirtError that says why
the device cannot be served.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import re
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from targetvirt.clock import Clock, MonotonicClock
from targetvirt.errors import TargetvirtError
from targetvirt.threads import name_this_thread
from tcmu_handler import alua, config, netlink, uio
from tcmu_handler.device import Device
from tcmu_handler.modestate import ModeStore
from tcmu_handler.ring import ResetMode
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.lun import LunState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What configfs says about a user backstore (its ``info`` file)."""

    hba: int
    name: str
    block_size: int
    size: int
    dev_config: str


_INFO_RE = {
    "block_size": re.compile(r"SectorSize: (\d+)"),
    "size": re.compile(r"Size: (\d+)"),
}


def read_info(name: uio.UioName, configfs_root: Path) -> DeviceInfo:
    path = configfs_root / "target" / "core" / f"user_{name.hba}" / name.dev_name / "info"
    text = path.read_text()
    values = {}
    for key, rx in _INFO_RE.items():
        # "Size:" also matches inside "...SectorSize:"; take the standalone one
        found = [m for m in rx.finditer(text) if key != "size" or text[m.start() - 1] in " \t\n"]
        if not found:
            raise TargetvirtError(f"{path} does not report {key}")
        values[key] = int(found[0].group(1))
    return DeviceInfo(name.hba, name.dev_name, values["block_size"], values["size"],
                      name.dev_config or "")  # fmt: skip


RETRY_SECONDS = 10.0  # between attempts to serve the devices refused so far

OpenLun = Callable[[config.DevConfig, DeviceInfo], tuple[BlockBackend, LunState]]
CloseLun = Callable[[str], None]  # the last device of this vdisk (or vdisk@snap) is gone


class TcmuService:
    """Owns every targetvirt device of this host."""

    def __init__(
        self,
        open_lun: OpenLun,
        *,
        close_lun: CloseLun | None = None,
        sysfs_root: Path = uio.SYSFS_UIO,
        configfs_root: Path = uio.CONFIGFS_ROOT,
        dev_root: Path = uio.DEV_ROOT,
        workers: int = 4,
        network_workers: int = 16,
        modes: ModeStore | None = None,
        clock: Clock | None = None,
        devices: str = "*",
    ) -> None:
        self.open_lun = open_lun
        self.pattern = devices
        self.clock = clock or MonotonicClock()
        self._next_retry = self.clock.now() + RETRY_SECONDS
        self.modes = modes
        self.close_lun = close_lun
        self.sysfs_root = sysfs_root
        self.configfs_root = configfs_root
        self.dev_root = dev_root
        self.workers = workers
        self.network_workers = network_workers
        self.devices: dict[str, Device] = {}  # by uio name
        self.refused: dict[str, str] = {}  # uio name -> why it is not served
        self._lock = threading.Lock()
        self._channel: netlink.NetlinkChannel | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        channel = netlink.NetlinkChannel.open()
        info = channel.resolve()
        channel.subscribe(info)
        # Tell the kernel we answer events, as tcmu-runner does; our own exports opt out
        # per device (nl_reply_supported=-1) so tcmu-runner's -ENOENT can't refuse them.
        channel.set_features(True)
        self._channel = channel
        self.rescan()
        self._thread = threading.Thread(target=self._events, name="tcmu-netlink", daemon=True)
        self._thread.start()

    def set_reply_mode(self, on: bool) -> None:
        """Whether the kernel waits for an answer to device events (a global setting,
        SET_FEATURES; tcmu.md 2.4).  Beside tcmu-runner it must be off: tcmu-runner
        answers -ENOENT for devices of subtypes it does not serve, and the kernel takes
        the first answer, so a ``user:targetvirt`` device made by targetcli would fail."""
        assert self._channel is not None
        self._channel.set_features(on)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            devices, self.devices = list(self.devices.values()), {}
        for device in devices:
            device.stop()
        if self._channel is not None:
            self._channel.close()

    def rescan(self) -> None:
        """Take over every targetvirt device that exists and is not served yet."""
        for dev in uio.scan(self.sysfs_root):
            if self.ours(dev.name) and key_of(dev.name) not in self.devices:
                self._add(dev, reset=ResetMode.BUSY)

    def retry_refused(self) -> None:
        """Try again to serve the devices refused so far that still exist."""
        for dev in uio.scan(self.sysfs_root):
            key = key_of(dev.name)
            if key in self.refused and key not in self.devices:
                self._add(dev, reset=ResetMode.BUSY)

    def _retry_when_due(self) -> None:
        now = self.clock.now()
        if now >= self._next_retry:
            self._next_retry = now + RETRY_SECONDS
            if self.refused:
                self.retry_refused()

    # --- devices ---------------------------------------------------------------------

    def ours(self, name: uio.UioName) -> bool:
        """A targetvirt device whose storage-object name matches ``--devices``: several
        daemons on one kernel (one per failure domain, or the gateways of a test) each
        serve their own devices and leave the others alone."""
        return name.subtype == config.SUBTYPE and fnmatch.fnmatchcase(name.dev_name, self.pattern)

    def _add(self, dev: uio.UioDevice, reset: ResetMode | None) -> int:
        """Serve a device; returns 0 or a negative errno for the netlink reply."""
        key = key_of(dev.name)
        try:
            cfg = config.parse(dev.name.dev_config or "")
            info = read_info(dev.name, self.configfs_root)
            backend, lun = self.open_lun(cfg, info)
            alua.attach(lun, self.configfs_root, dev.name.hba, dev.name.dev_name)
            handle, ring = uio.attach(
                dev, reset=reset, configfs_root=self.configfs_root, dev_root=self.dev_root
            )
        except (TargetvirtError, OSError) as e:
            if self.refused.get(key) != str(e):  # retried every RETRY_SECONDS: say it once
                log.error("not serving %s: %s", key, e)
            self.refused[key] = str(e)
            return -(e.errno or errno.EINVAL) if isinstance(e, OSError) else -errno.ENOENT
        self._keep_modes(key, lun, fresh=reset is None)
        device = Device(key, handle, ring, lun, backend, workers=self._workers_for(backend))
        device.vdisk = cfg.vdisk + (f"@{cfg.snapshot}" if cfg.snapshot else "")
        with self._lock:
            self.devices[key] = device
            self.refused.pop(key, None)
        device.start()
        log.info("serving %s (%s, %d blocks of %d)", key, cfg.format(), lun.num_blocks,
                 lun.block_size)  # fmt: skip
        return 0

    def _workers_for(self, backend: object) -> int:
        """A worker holds one command for as long as its I/O takes.  On a file that is
        microseconds; on RADOS a network round trip, during which a few workers would cap
        the commands in flight below what the initiator queues (fio's iodepth 16)."""
        if getattr(backend, "waits_on_network", False):  # optional: agent vdisks have it
            return max(self.workers, self.network_workers)
        return self.workers

    def _keep_modes(self, key: str, lun: LunState, *, fresh: bool) -> None:
        """A device taken over after a restart gets back its mode state; a new one starts
        from the defaults.  Either way MODE SELECT changes are saved from now on."""
        modes = self.modes
        if modes is None:
            return
        if fresh:
            modes.forget(key)
        elif modes.restore(key, lun):
            log.info("%s: write cache %s, as set before the restart", key,
                     "on" if lun.write_cache_enabled else "off")  # fmt: skip
        lun.on_mode_select = lambda changed: modes.save(key, changed)

    def _remove(self, key: str) -> None:
        with self._lock:
            device = self.devices.pop(key, None)
            self.refused.pop(key, None)
        if self.modes is not None:
            self.modes.forget(key)
        if device is not None:
            device.stop()
            log.info("stopped serving %s", key)
            if self.close_lun is not None and not self.devices_of(device.vdisk):
                self.close_lun(device.vdisk)

    def devices_of(self, vdisk: str) -> list[Device]:
        with self._lock:
            return [d for d in self.devices.values() if d.vdisk == vdisk]

    # --- netlink -------------------------------------------------------------------------

    def _events(self) -> None:
        name_this_thread("tv-netlink")
        assert self._channel is not None
        poller = select.poll()
        poller.register(self._channel.fileno(), select.POLLIN)
        while not self._stopping.is_set():
            self._retry_when_due()
            if not poller.poll(500):
                continue
            try:
                messages = self._channel.receive()
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events were dropped: find devices again
                    log.warning("netlink events lost; rescanning devices")
                    self.rescan()
                    continue
                raise
            for msg in messages:
                if isinstance(msg, netlink.DeviceEvent):
                    self._channel.reply(msg, self._answer(msg))

    def _answer(self, ev: netlink.DeviceEvent) -> int:
        """The reply to one event, whatever happens: a kernel that waits for it holds the
        configfs write (targetcli) in D state until it comes, so nothing may escape."""
        try:
            return self._on_event(ev)
        except Exception:  # logged with its traceback; the kernel gets -EIO
            log.exception("netlink event %s for %s failed", ev.cmd, ev.device)
            return -errno.EIO

    def _on_event(self, ev: netlink.DeviceEvent) -> int:
        name = uio.parse_uio_name(ev.device)
        if name is None or not self.ours(name):
            return 0  # not ours: a neutral answer (a waiting kernel gets unblocked)
        if ev.cmd == netlink.TcmuCmd.ADDED_DEVICE:
            dev = uio.read_device(ev.minor, self.sysfs_root)
            if dev is None:
                return -errno.ENODEV
            return self._add(dev, reset=None)
        if ev.cmd == netlink.TcmuCmd.REMOVED_DEVICE:
            self._remove(key_of(name))
            return 0
        return self._reconfig(name, ev)

    def _reconfig(self, name: uio.UioName, ev: netlink.DeviceEvent) -> int:
        device = self.devices.get(key_of(name))
        if device is None:
            return -errno.ENODEV
        if ev.dev_size is not None:
            blocks, rest = divmod(ev.dev_size, device.lun.block_size)
            if rest or ev.dev_size > device.backend.size:
                return -errno.EINVAL
            if blocks != device.lun.num_blocks:
                device.lun.resize(blocks)  # queues CAPACITY DATA HAS CHANGED
        if ev.writecache is not None:
            device.lun.set_write_cache(ev.writecache)
        if ev.dev_cfg is not None and ev.dev_cfg != name.dev_config:
            return -errno.EOPNOTSUPP  # pointing a live LUN at another vdisk: unexport first
        return 0


def key_of(name: uio.UioName) -> str:
    """A device's identity: its configfs HBA and storage-object name."""
    return f"user_{name.hba}/{name.dev_name}"
