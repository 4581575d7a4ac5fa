"""uio discovery, node opening, mmap, events and the configfs restart sequence, against
a fake sysfs/configfs/dev tree in tmp_path (a regular file stands in for /dev/uioN)."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.clock import FakeClock
from tcmu_handler.ring import RecoveryStep, ResetMode, RingError
from tcmu_handler.uio import (
    DeviceActions,
    UioDevice,
    UioHandle,
    UioName,
    attach,
    open_node,
    parse_uio_name,
    read_device,
    scan,
)
from tests.fuzzing import fuzz_settings
from tests.tcmu_handler.kernel_emulator import KernelEmulator


def make_uio(root: Path, minor: int, name: str, size: str | None = "0x0000000040800000") -> None:
    d = root / f"uio{minor}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "version").write_text("2\n")
    if size is not None:
        (d / "maps" / "map0" / "size").write_text(size + "\n")


def make_configfs(root: Path, hba: int, dev: str) -> Path:
    action = root / "target" / "core" / f"user_{hba}" / dev / "action"
    action.mkdir(parents=True)
    for attr in ("block_dev", "reset_ring", "free_kept_buf"):
        (action / attr).write_text("")
    return action


# --- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("tcm-user/1/disk0/targetvirt/vd1\n", UioName(1, "disk0", "targetvirt/vd1")),
        ("tcm-user/12/d/targetvirt/vd1;ro=1", UioName(12, "d", "targetvirt/vd1;ro=1")),
        ("tcm-user/0/d/file/a/b/c", UioName(0, "d", "file/a/b/c")),
        ("tcm-user/3/nocfg", UioName(3, "nocfg", None)),
        ("tcm-user/3/d/targetvirt", UioName(3, "d", "targetvirt")),
        ("uio_pdrv_genirq", None),
        ("tcm-user/x/d/targetvirt/v", None),
        ("tcm-user/1", None),
        ("tcm-user/1//targetvirt/v", None),
        ("tcm-userX/1/d/targetvirt/v", None),
        ("tcm-user/\u0661/d/targetvirt/v", None),  # a non-ASCII digit
    ],
)
def test_parse_uio_name(name: str, parsed: UioName | None) -> None:
    assert parse_uio_name(name) == parsed


@fuzz_settings(500)
@given(
    st.text()
    | st.lists(st.sampled_from(["tcm-user", "1", "07", "\u0661", "", "d", "targetvirt", "x"])
               | st.text(max_size=8), max_size=6).map("/".join)
    | st.binary(max_size=80).map(lambda b: b.decode("utf-8", "surrogateescape"))
)  # fmt: skip
def test_arbitrary_uio_names_parse_or_are_not_ours(name: str) -> None:
    """Fuzz target: a uio name from sysfs or netlink never makes the parser raise."""
    parsed = parse_uio_name(name)
    if parsed is not None:
        assert parsed.hba >= 0 and parsed.dev_name and "/" not in parsed.dev_name
        assert parsed.subtype is None or "/" not in parsed.subtype


def test_subtype_and_cfgstring() -> None:
    name = UioName(1, "d", "targetvirt/vd1@snap;ro=1")
    assert (name.subtype, name.cfgstring) == ("targetvirt", "vd1@snap;ro=1")
    assert (UioName(1, "d", "targetvirt").cfgstring, UioName(1, "d", None).subtype) == (None, None)


# --- sysfs scan ---------------------------------------------------------------------------


def test_scan_keeps_only_targetvirt_devices(tmp_path: Path) -> None:
    make_uio(tmp_path, 0, "tcm-user/1/disk0/targetvirt/vd1")
    make_uio(tmp_path, 10, "tcm-user/1/disk1/targetvirt/vd2@s", size="0x800000")
    make_uio(tmp_path, 2, "tcm-user/2/f/file/img")  # tcmu-runner's
    make_uio(tmp_path, 3, "tcm-user/3/x/targetvirtx/vd")  # prefix is not a match
    make_uio(tmp_path, 4, "uio_pdrv_genirq")
    make_uio(tmp_path, 5, "tcm-user/3/nosize/targetvirt/vd", size=None)  # vanished
    make_uio(tmp_path, 6, "tcm-user/3/badsize/targetvirt/vd", size="lots")
    (tmp_path / "not-uio").mkdir()
    assert scan(tmp_path) == [
        UioDevice(0, UioName(1, "disk0", "targetvirt/vd1"), 0x40800000),
        UioDevice(10, UioName(1, "disk1", "targetvirt/vd2@s"), 0x800000),
    ]
    assert [d.minor for d in scan(tmp_path, subtype="file")] == [2]
    assert read_device(2, tmp_path) is not None and read_device(4, tmp_path) is None
    assert read_device(99, tmp_path) is None


def test_scan_without_uio_class_is_empty(tmp_path: Path) -> None:
    assert scan(tmp_path / "missing") == []


# --- the node -----------------------------------------------------------------------------


def test_open_node_opens_existing_node_nonblocking_cloexec(tmp_path: Path) -> None:
    (tmp_path / "uio3").write_bytes(b"")
    fd = open_node(3, dev_root=tmp_path, clock=FakeClock())
    try:
        flags = os.get_blocking(fd), os.get_inheritable(fd)
        assert flags == (False, False)
    finally:
        os.close(fd)


def test_open_node_gives_up_at_the_deadline(tmp_path: Path) -> None:
    clock = FakeClock()
    stop = threading.Event()

    def advance() -> None:
        while not stop.is_set():
            clock.advance(0.5)
            time.sleep(0.01)

    t = threading.Thread(target=advance)
    t.start()
    try:
        with pytest.raises(FileNotFoundError):
            open_node(3, dev_root=tmp_path, clock=clock, timeout=2.0)
    finally:
        stop.set()
        t.join()


def test_open_node_retries_until_the_node_appears(tmp_path: Path) -> None:
    clock = FakeClock()  # fake time never reaches the deadline: only the node ends it
    timer = threading.Timer(0.2, lambda: (tmp_path / "uio4").write_bytes(b""))
    timer.start()
    fd = open_node(4, dev_root=tmp_path, clock=clock, timeout=1.0)
    os.close(fd)
    timer.join()


def test_open_node_other_errors_pass_through(tmp_path: Path) -> None:
    (tmp_path / "uio5").mkdir()  # opening a directory O_RDWR: EISDIR
    with pytest.raises(IsADirectoryError):
        open_node(5, dev_root=tmp_path, clock=FakeClock())


# --- mmap and events ------------------------------------------------------------------------


def test_open_maps_exactly_map0_and_serves_a_ring(tmp_path: Path) -> None:
    emu = KernelEmulator(data_blocks=2)
    emu.submit(bytes(6))
    (tmp_path / "uio7").write_bytes(emu.buf)
    device = UioDevice(7, UioName(1, "d", "targetvirt/v"), len(emu.buf))
    with UioHandle.open(device, dev_root=tmp_path, clock=FakeClock()) as handle:
        assert len(handle.buffer) == len(emu.buf)
        _, ring = attach(device, reset=None, dev_root=tmp_path, clock=FakeClock())
        (cmd,) = ring.fetch().commands
        ring.complete(cmd.cmd_id, 0)
        ring.release()
        handle.buffer.flush()
    assert (tmp_path / "uio7").read_bytes()[64:68] == (120).to_bytes(4, "little")


def test_wait_reads_one_event_and_notify_writes_four_bytes() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    with mmap.mmap(-1, 4096) as anon:
        reader = UioHandle(r, anon)
        assert reader.wait(timeout=0) is False
        os.write(w, (7).to_bytes(4, "little"))
        assert reader.wait(timeout=5) is True
        assert reader.take_event() is None
        os.write(w, (-2).to_bytes(4, "little", signed=True))
        assert reader.take_event() == -2
        os.write(w, b"\x01\x02")  # a uio device never does this: fail loudly
        with pytest.raises(OSError, match="expected 4"):
            reader.take_event()
        writer = UioHandle(w, anon)
        writer.notify()
        assert os.read(r, 16) == b"\0\0\0\0"
    os.close(r)
    os.close(w)


# --- configfs -------------------------------------------------------------------------------


def test_device_actions_write_the_action_files(tmp_path: Path) -> None:
    action = make_configfs(tmp_path, 2, "disk0")
    actions = DeviceActions(UioName(2, "disk0", "targetvirt/v"), tmp_path)
    actions.block()
    assert (action / "block_dev").read_text() == "1"
    actions.reset_ring(ResetMode.CHECK_CONDITION)
    assert (action / "reset_ring").read_text() == "2"
    actions.unblock()
    assert (action / "block_dev").read_text() == "0"
    (action / "block_dev").write_text("blocked\n")
    assert actions.is_blocked()


def test_device_actions_never_create_files(tmp_path: Path) -> None:
    actions = DeviceActions(UioName(2, "gone", None), tmp_path)
    with pytest.raises(FileNotFoundError):
        actions.block()
    assert not (tmp_path / "target").exists()


class RecordingActions(DeviceActions):
    def __init__(self, name: UioName, root: Path, node: Path) -> None:
        super().__init__(name, root)
        self.node = node
        self.log: list[tuple[str, str, bool]] = []

    def apply(self, step: RecoveryStep) -> None:
        self.log.append((step.attribute, step.value, self._node_is_open()))
        super().apply(step)

    def _node_is_open(self) -> bool:
        fds = Path("/proc/self/fd")
        return any(os.path.realpath(fd) == str(self.node.resolve()) for fd in fds.iterdir())


def test_attach_blocks_resets_maps_then_unblocks(tmp_path: Path) -> None:
    emu = KernelEmulator(data_blocks=1)
    dev_root = tmp_path / "dev"
    dev_root.mkdir()
    node = dev_root / "uio9"
    node.write_bytes(emu.buf)
    name = UioName(1, "disk0", "targetvirt/vd1")
    action = make_configfs(tmp_path, 1, "disk0")
    actions = RecordingActions(name, tmp_path, node)
    device = UioDevice(9, name, len(emu.buf))
    handle, ring = attach(device, dev_root=dev_root, clock=FakeClock(), actions=actions)
    assert actions.log == [
        ("action/block_dev", "1", True),  # the node claimed before the ring is touched
        ("action/reset_ring", "1", True),
        ("action/block_dev", "0", True),  # unblocked only once mapped
    ]
    assert (action / "block_dev").read_text() == "0"
    assert ring.fetch().commands == []
    ring.release()
    handle.close()


def test_attach_leaves_device_blocked_and_closed_on_a_bad_mailbox(tmp_path: Path) -> None:
    dev_root = tmp_path / "dev"
    dev_root.mkdir()
    (dev_root / "uio9").write_bytes(bytes(8192))  # version 0
    action = make_configfs(tmp_path, 1, "disk0")
    device = UioDevice(9, UioName(1, "disk0", "targetvirt/vd1"), 8192)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RingError, match="version is 0"):
        attach(device, configfs_root=tmp_path, dev_root=dev_root, clock=FakeClock())
    assert (action / "block_dev").read_text() == "1"
    assert set(os.listdir("/proc/self/fd")) <= before


def test_attach_leaves_a_device_held_by_another_process_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel lets one process have the node open: a device a second daemon (or a
    predecessor still exiting) holds fails with EBUSY before its ring is blocked or reset."""
    dev_root = tmp_path / "dev"
    dev_root.mkdir()
    node = dev_root / "uio9"
    node.write_bytes(KernelEmulator(data_blocks=1).buf)
    name = UioName(1, "disk0", "targetvirt/vd1")
    action = make_configfs(tmp_path, 1, "disk0")
    actions = RecordingActions(name, tmp_path, node)
    real_open = os.open

    def held(path: object, flags: int, *args: int) -> int:
        if str(path) == str(node):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", held)
    with pytest.raises(OSError, match="already open by another process"):
        attach(UioDevice(9, name, len(node.read_bytes())), dev_root=dev_root,
               clock=FakeClock(), actions=actions)  # fmt: skip
    assert actions.log == []
    assert (action / "block_dev").read_text() == "" and (action / "reset_ring").read_text() == ""
