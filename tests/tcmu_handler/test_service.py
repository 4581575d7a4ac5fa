"""The TCMU service's answers to the kernel's netlink events (no kernel: sysfs and
configfs are small trees in a temporary folder, laid out as the 6.1 kernel lays them)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from targetvirt.clock import FakeClock
from targetvirt.errors import NotFound
from tcmu_handler import netlink
from tcmu_handler.scsi.backend import RamBackend
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.service import RETRY_SECONDS, DeviceInfo, TcmuService
from tests.tcmu_handler.kernel_emulator import KernelEmulator

NAME = "tcm-user/1/lun0/targetvirt/db"


def trees(tmp_path: Path) -> tuple[Path, Path]:
    sysfs, configfs = tmp_path / "sys", tmp_path / "cfg"
    uio0 = sysfs / "uio0"
    (uio0 / "maps" / "map0").mkdir(parents=True)
    (uio0 / "name").write_text(NAME + "\n")
    (uio0 / "maps" / "map0" / "size").write_text("0x0000000040800000\n")
    info = configfs / "target" / "core" / "user_1" / "lun0"
    info.mkdir(parents=True)
    (info / "info").write_text(
        "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 128\n"
        "        Config: targetvirt/db Size: 67108864 MaxDataAreaMB: 1024 "
        "DataPagesPerBlk: 1\n"
    )
    return sysfs, configfs


def event(cmd: netlink.TcmuCmd, device: str = NAME) -> netlink.DeviceEvent:
    return netlink.DeviceEvent(cmd, device, 0, 7)


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        (NotFound("no vdisk named 'db' in targetvirt"), -errno.ENOENT),
        (OSError(errno.EACCES, "denied"), -errno.EACCES),
        (RuntimeError("a bug"), -errno.EIO),
    ],
)
def test_every_added_device_gets_an_answer(tmp_path: Path, fault: Exception, expect: int) -> None:
    """A kernel that waits for the reply holds targetcli in D state until it comes: even a
    bug in the open path must produce one (a failure, with the device left unserved)."""
    sysfs, configfs = trees(tmp_path)

    def open_lun(cfg: object, info: object) -> tuple[object, object]:
        raise fault

    service = TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs)  # type: ignore[arg-type]
    assert service._answer(event(netlink.TcmuCmd.ADDED_DEVICE)) == expect
    assert service.devices == {}


def test_other_subtypes_and_vanished_devices(tmp_path: Path) -> None:
    sysfs, configfs = trees(tmp_path)
    opened: list[object] = []

    def open_lun(cfg: object, info: object) -> tuple[object, object]:
        opened.append(cfg)
        raise AssertionError("not ours: must not be opened")

    service = TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs)  # type: ignore[arg-type]
    other = "tcm-user/1/lun1/qcow/some.qcow2"
    assert service._answer(event(netlink.TcmuCmd.ADDED_DEVICE, other)) == 0
    (sysfs / "uio0" / "name").unlink()
    assert service._answer(event(netlink.TcmuCmd.ADDED_DEVICE)) == -errno.ENODEV
    assert service._answer(event(netlink.TcmuCmd.REMOVED_DEVICE)) == 0
    assert opened == []


@pytest.mark.parametrize(("pattern", "served"), [("*", True), ("lun*", True), ("gw2_*", False)])
def test_only_devices_matching_the_pattern_are_served(
    tmp_path: Path, pattern: str, served: bool
) -> None:
    """``--devices``: a daemon beside another on the same kernel leaves the other's devices
    alone, both those found at start and those added later."""
    sysfs, configfs = trees(tmp_path)
    opened: list[str] = []

    def open_lun(cfg: object, info: object) -> tuple[object, object]:
        opened.append(str(cfg))
        raise NotFound("stop here: asked to open")

    service = TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs,  # type: ignore[arg-type]
                          devices=pattern)  # fmt: skip
    service.rescan()
    answer = service._answer(event(netlink.TcmuCmd.ADDED_DEVICE))
    assert len(opened) == (2 if served else 0)
    assert answer == (-errno.ENOENT if served else 0)
    assert list(service.refused) == (["user_1/lun0"] if served else [])


def servable(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The trees plus what taking the device over needs: configfs action files and a
    device node holding a kernel-laid-out mailbox (a file stands in for /dev/uio0)."""
    sysfs, configfs = trees(tmp_path)
    emu = KernelEmulator(data_blocks=2)
    (sysfs / "uio0" / "maps" / "map0" / "size").write_text(f"{len(emu.buf):#x}\n")
    action = configfs / "target" / "core" / "user_1" / "lun0" / "action"
    action.mkdir()
    for attr in ("block_dev", "reset_ring"):
        (action / attr).write_text("")
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "uio0").write_bytes(emu.buf)
    return sysfs, configfs, dev


def lun_of(info: DeviceInfo) -> LunState:
    return LunState(block_size=512, num_blocks=info.size // 512, serial="s",
                    naa=bytes([0x60]) + bytes(15))  # fmt: skip


def test_a_refused_device_is_tried_again_and_its_reason_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device refused at start (its vdisk not made yet, its node still held by a
    predecessor that is exiting) is served once the cause is gone, without a restart."""
    sysfs, configfs, dev = servable(tmp_path)
    missing = True

    def open_lun(cfg: object, info: DeviceInfo) -> tuple[object, object]:
        if missing:
            raise NotFound("no vdisk named 'db' in targetvirt")
        return RamBackend(info.size), lun_of(info)

    clock = FakeClock()
    service = TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs,  # type: ignore[arg-type]
                          dev_root=dev, clock=clock, workers=1)  # fmt: skip
    service.rescan()
    assert service.refused == {"user_1/lun0": "no vdisk named 'db' in targetvirt"}
    for _ in range(3):
        clock.advance(RETRY_SECONDS)
        service._retry_when_due()
    assert sum("not serving" in r.message for r in caplog.records) == 1
    assert service.devices == {}

    missing = False
    clock.advance(RETRY_SECONDS - 1)
    service._retry_when_due()
    assert service.devices == {}  # not due yet
    clock.advance(1)
    service._retry_when_due()
    try:
        assert list(service.devices) == ["user_1/lun0"] and service.refused == {}
        assert (configfs / "target/core/user_1/lun0/action/reset_ring").read_text() == "1"
    finally:
        service.stop()


class NetworkBackend(RamBackend):
    """A backend whose I/O waits on the network, as an agent vdisk on RADOS says."""

    waits_on_network = True


@pytest.mark.parametrize(("backend", "workers"), [(RamBackend, 2), (NetworkBackend, 5)])
def test_a_vdisk_that_waits_on_the_network_gets_more_workers(
    tmp_path: Path, backend: type[RamBackend], workers: int
) -> None:
    """Each worker holds one command for its whole I/O: on RADOS a round trip, so the
    device gets --network-workers of them, enough for what the initiator keeps queued."""
    sysfs, configfs, dev = servable(tmp_path)

    def open_lun(cfg: object, info: DeviceInfo) -> tuple[object, object]:
        return backend(info.size), lun_of(info)

    service = TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs,  # type: ignore[arg-type]
                          dev_root=dev, workers=2, network_workers=5)  # fmt: skip
    service.rescan()
    try:
        (device,) = service.devices.values()
        io = [t for t in device._threads if t.name.startswith("user_1/lun0-io")]
        assert len(io) == workers and all(t.is_alive() for t in io)
    finally:
        service.stop()
