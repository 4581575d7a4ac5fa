"""The TCMU service's answers to the kernel's netlink events (no kernel: sysfs and
configfs are small trees in a temporary folder, laid out as the 6.1 kernel lays them)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from targetvirt.errors import NotFound
from tcmu_handler import netlink
from tcmu_handler.service import TcmuService

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
