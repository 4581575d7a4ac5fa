"""A failing container, for real: a pool whose container is a device-mapper device in the
guest, part of which is swapped to dm's ``error`` target under the running handler.

The unit tests (tests/targetvirt/test_faults.py) inject EIO at the descriptor level; here
the kernel produces it.  The LUNs are driven two ways: with SG_IO (this module's ``scsi``
subcommand, run in the guest) to see the exact status and sense of each command, and
with ``dd`` through the Linux initiator's block layer for bulk data and the kernel log.

    python -m tests.vm.test_faults scsi DEV CMDS-JSON    # in the guest: SG_IO, JSON out
    python -m tests.vm.test_faults locate IMAGE FILE...  # in the guest: where data landed
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from targetvirt.container import DATA_OFFSET
from tests.vm.guest import Guest
from tests.vm.test_shell import ACL, PORTAL, SLOW, WORK, Stack, login

pytestmark = pytest.mark.vm

MIB = 1 << 20
SEG = MIB  # the pools' segment size (the default)
BLOCK = 512
DM_NAME = "tvfault"
DM_DIR = "/run/ram/dm"
DM_IMAGE = f"{DM_DIR}/{DM_NAME}.img"
DM_BYTES = 24 * MIB  # the header MiB, then 23 segments
BAD = 256 << 10  # the failing range: the first 256 KiB of one physical segment
GOOD_STATUS, CHECK_CONDITION = 0x00, 0x02
MEDIUM_READ = (0x03, 0x11, 0x00)  # MEDIUM ERROR, UNRECOVERED READ ERROR
SPACE_ALLOCATION_FAILED = (0x07, 0x27, 0x07)  # DATA PROTECT, SPACE ALLOCATION FAILED WP
SOFT_THRESHOLD = (0x06, 0x38, 0x07)  # UNIT ATTENTION, THIN PROVISIONING SOFT THRESHOLD
SOFT_THRESHOLD_LOG = "reached a thin provisioning soft threshold"  # the kernel's warning


# --- in the guest: SG_IO ------------------------------------------------------------------

SG_IO = 0x2285
SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV = -1, -2, -3
UNIT_ATTENTION = 0x06
DRIVER_SENSE = 0x08  # driver_status bit: sense data is valid (not a transport failure)


class SgIoHdr(ctypes.Structure):
    """``struct sg_io_hdr`` (include/scsi/sg.h)."""

    _fields_ = [
        ("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort), ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p), ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint), ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte), ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint), ("info", ctypes.c_uint),
    ]  # fmt: skip


def sense_triple(sb: bytes) -> list[int] | None:
    """Key, ASC, ASCQ of fixed (70h/71h) or descriptor (72h/73h) sense data."""
    if len(sb) < 4:
        return None
    if sb[0] & 0x7F in (0x72, 0x73):
        return [sb[1] & 0x0F, sb[2], sb[3]]
    return [sb[2] & 0x0F, sb[12], sb[13]] if len(sb) >= 14 else None


def sgio_once(fd: int, cdb: bytes, out: bytes, in_len: int) -> dict[str, Any]:
    n = len(out) or in_len
    cdb_buf = ctypes.create_string_buffer(cdb, len(cdb))
    sense = ctypes.create_string_buffer(64)
    data = ctypes.create_string_buffer(out, n) if out else ctypes.create_string_buffer(max(n, 1))
    direction = SG_DXFER_TO_DEV if out else SG_DXFER_FROM_DEV if in_len else SG_DXFER_NONE
    hdr = SgIoHdr(
        interface_id=ord("S"), dxfer_direction=direction, cmd_len=len(cdb), mx_sb_len=64,
        dxfer_len=n, dxferp=ctypes.addressof(data) if n else None,
        cmdp=ctypes.addressof(cdb_buf), sbp=ctypes.addressof(sense), timeout=int(SLOW * 1000),
    )  # fmt: skip
    fcntl.ioctl(fd, SG_IO, hdr)
    sb = sense.raw[: hdr.sb_len_wr]
    return {
        "status": hdr.status, "host": hdr.host_status, "driver": hdr.driver_status,
        "sense": sense_triple(sb) if hdr.status == CHECK_CONDITION else None,
        "data": data.raw[: n - hdr.resid].hex() if in_len else "",
    }  # fmt: skip


def sgio(dev: str, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each command; a UNIT ATTENTION is retried (as every initiator does) and kept
    in ``uas`` so the caller can see which ones the LUN reported."""
    fd = os.open(dev, os.O_RDWR)
    try:
        replies = []
        for cmd in cmds:
            uas: list[list[int] | None] = []
            for _ in range(4):
                r = sgio_once(fd, bytes.fromhex(cmd["cdb"]), bytes.fromhex(cmd["out"]),
                              cmd["in"])  # fmt: skip
                if not (r["sense"] and r["sense"][0] == UNIT_ATTENTION):
                    break
                uas.append(r["sense"])
            replies.append({**r, "uas": uas})
        return replies
    finally:
        os.close(fd)


def locate(image: str, files: list[str]) -> list[int | None]:
    """The physical segment of a container image holding each file's bytes."""
    want = {Path(f).read_bytes(): i for i, f in enumerate(files)}
    found: list[int | None] = [None] * len(files)
    with open(image, "rb") as f:
        f.seek(DATA_OFFSET)
        pseg = 0
        while chunk := f.read(SEG):
            if chunk in want:
                found[want[chunk]] = pseg
            pseg += 1
    return found


# --- on the host: talking to LUNs ------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    sense: tuple[int, int, int] | None
    data: bytes
    uas: list[tuple[int, int, int]]
    transport: tuple[int, int]  # host, driver status (DRIVER_SENSE masked): (0, 0) = answered


def _triple(sense: list[int]) -> tuple[int, int, int]:
    key, asc, ascq = sense
    return key, asc, ascq


def cdb16(opcode: int, offset: int, length: int) -> str:
    return struct.pack(">BBQIBB", opcode, 0, offset // BLOCK, length // BLOCK, 0, 0).hex()


@dataclass
class Lun:
    """A LUN as the guest's initiator sees it: ``dev`` is its /dev/sdX."""

    guest: Guest
    dev: str

    @property
    def name(self) -> str:
        return Path(self.dev).name

    def scsi(self, *cmds: dict[str, Any]) -> list[Reply]:
        res = self.guest.module("tests.vm.test_faults", "scsi", self.dev, json.dumps(cmds),
                                timeout=SLOW)  # fmt: skip
        replies = json.loads(res.stdout.strip().splitlines()[-1])
        return [
            Reply(
                r["status"],
                _triple(r["sense"]) if r["sense"] else None,
                bytes.fromhex(r["data"]),
                [_triple(u) for u in r["uas"]],
                (r["host"], r["driver"] & ~DRIVER_SENSE),
            )
            for r in replies
        ]

    @staticmethod
    def read(offset: int, length: int) -> dict[str, Any]:
        return {"cdb": cdb16(0x88, offset, length), "out": "", "in": length}

    @staticmethod
    def write(offset: int, data: bytes) -> dict[str, Any]:
        return {"cdb": cdb16(0x8A, offset, len(data)), "out": data.hex(), "in": 0}

    def dd_cmp(self, ref: str, seg: int, count: int = 1) -> None:
        """Read ``count`` segments at ``seg`` through the block layer; they equal ``ref``."""
        dd = f"dd if={self.dev} of={ref}.back bs=1M skip={seg} count={count} iflag=direct"
        self.guest.sh(f"{dd} status=none && cmp {ref} {ref}.back", timeout=SLOW)


def attach(s: Stack, vdisk: str) -> Lun:
    _, dev = login(s, vdisk)
    # the initiator waits for a slow TCG target rather than aborting and resetting
    s.guest.run(["sh", "-c", f"echo {int(SLOW)} > /sys/block/{Path(dev).name}/device/timeout"])
    return Lun(s.guest, dev)


def good(r: Reply) -> bool:
    return r.status == GOOD_STATUS and r.transport == (0, 0)


# --- the device-mapper device ----------------------------------------------------------------


@dataclass
class Mapper:
    """``/dev/mapper/tvfault``: dm ``linear`` over a loop device on a tmpfs file.  The
    ``failing`` table maps a range of it to dm's ``error`` target (any I/O there: EIO)."""

    guest: Guest
    loop: str
    sectors: int = DM_BYTES // BLOCK

    path = f"/dev/mapper/{DM_NAME}"

    def linear(self) -> str:
        return f"0 {self.sectors} linear {self.loop} 0\n"

    def failing(self, offset: int, length: int) -> str:
        s, n = offset // BLOCK, length // BLOCK
        rest = self.sectors - s - n
        return (f"0 {s} linear {self.loop} 0\n{s} {n} error\n"
                f"{s + n} {rest} linear {self.loop} {s + n}\n")  # fmt: skip

    def load(self, table: str) -> None:
        """Swap the live table: load it inactive, suspend (in-flight I/O drains), resume."""
        g = self.guest
        g.run(["dmsetup", "reload", DM_NAME], input=table, timeout=SLOW)
        g.run(["dmsetup", "suspend", "--noudevsync", DM_NAME], timeout=SLOW)
        g.run(["dmsetup", "resume", "--noudevsync", DM_NAME], timeout=SLOW)
        assert g.run(["dmsetup", "table", DM_NAME]).stdout.count("\n") == table.count("\n")
        # the handler opens containers buffered: what the page cache holds of the device
        # would hide the new table from reads, so drop it (it is clean: all was flushed)
        g.run(["blockdev", "--flushbufs", self.path], timeout=SLOW)
        g.sh("echo 1 > /proc/sys/vm/drop_caches", timeout=SLOW)


@pytest.fixture
def mapper(guest: Guest) -> Iterator[Mapper]:
    g = guest
    g.run(["modprobe", "-a", "dm_mod", "loop"])
    g.run(["mkdir", "-p", DM_DIR])
    g.run(["truncate", "-s", str(DM_BYTES), DM_IMAGE])
    loop = g.run(["losetup", "--find", "--show", DM_IMAGE]).stdout.strip()
    m = Mapper(g, loop)
    try:
        # no udev handshake (it hangs where udev's dm rules do not answer): let udev
        # settle, then mknodes makes /dev/mapper/tvfault if udev did not
        g.run(["dmsetup", "create", "--noudevsync", DM_NAME, "--table", m.linear().strip()])
        g.run(["udevadm", "settle"], check=False, timeout=SLOW)
        g.run(["dmsetup", "mknodes", DM_NAME])
        g.run(["test", "-b", m.path])
        yield m
    finally:  # after the handler (the stack fixture depends on this one) let go of it
        g.run(["udevadm", "settle"], check=False, timeout=SLOW)
        g.run(["dmsetup", "remove", "--retry", "--noudevsync", DM_NAME], check=False,
              timeout=SLOW)  # fmt: skip
        g.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def stack(guest: Guest, results_dir: Path, mapper: Mapper) -> Iterator[Stack]:
    s = Stack(guest, results_dir / "handler.log")
    s.install_policy()
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


# --- the test --------------------------------------------------------------------------------


def container_info(s: Stack, pool: str) -> str:
    return s.tv(f"/pools/{pool}/0", "info").stdout


def wait_for_state(s: Stack, pool: str, state: str) -> str:
    """The agent reports a medium error to the controller asynchronously."""
    deadline = time.monotonic() + 120
    while f"state: {state}" not in (info := container_info(s, pool)):
        assert time.monotonic() < deadline, info
        time.sleep(1)
    return info


def fill(s: Stack, lun: Lun, name: str, segs: int) -> list[str]:
    """Random data in segments 0..segs-1 of a LUN, flushed (conv=fsync: SYNCHRONIZE
    CACHE, so it is in the container); returns the reference files."""
    refs = [f"{WORK}/{name}{i}" for i in range(segs)]
    for i, ref in enumerate(refs):
        write = f"dd if={ref} of={lun.dev} bs=1M seek={i} oflag=direct conv=fsync"
        s.sh(f"dd if=/dev/urandom of={ref} bs=1M count=1 status=none && {write} status=none")
    return refs


def physical_segments(s: Stack, refs: list[str]) -> list[int]:
    """Where the device-mapper container holds each segment: looked for by content."""
    deadline = time.monotonic() + 120
    while True:
        res = s.guest.module("tests.vm.test_faults", "locate", DM_IMAGE, *refs, timeout=SLOW)
        found = json.loads(res.stdout.strip().splitlines()[-1])
        if None not in found:
            return [int(p) for p in found]
        assert time.monotonic() < deadline, f"not all segments reached the container: {found}"
        time.sleep(2)


def kernel_log_mark(g: Guest) -> str:
    """Write a unique line into the kernel's log; :func:`kernel_log_since` returns what
    follows it.  (Counting lines does not work: after the compliance tests the log
    buffer is full, wraps, and keeps the same number of lines.)"""
    mark = f"targetvirt-test-mark-{uuid.uuid4().hex}"
    g.run(["sh", "-c", 'echo "$1" > /dev/kmsg', "sh", mark])
    return mark


def kernel_log_since(g: Guest, mark: str) -> str:
    text = g.run(["dmesg"]).stdout
    at = text.rfind(mark)
    assert at >= 0, f"the kernel log lost the mark {mark}: it wrapped during the test"
    return text[at + len(mark) :]


def scsi_address(g: Guest, lun: Lun) -> str:
    """H:C:T:L of a disk, as the kernel's log names it."""
    return Path(g.run(["readlink", "-f", f"/sys/block/{lun.name}/device"]).stdout.strip()).name


def threshold_logged(log: str, addr: str) -> bool:
    return re.search(rf"^.*sd {re.escape(addr)}: .*{SOFT_THRESHOLD_LOG}", log, re.M) is not None


def test_a_failing_dm_container_fails_only_what_meets_it(
    guest: Guest, stack: Stack, mapper: Mapper
) -> None:
    s, g = stack, guest
    s.tv("/pools", "create", "name=pf", f"device={mapper.path}")
    s.tv("/pools", "create", "name=pq", f"path={WORK}/pq.img", "size=64M")
    info = container_info(s, "pf")
    assert "kind: block" in info and "state: online" in info, info
    s.tv("/vdisks", "create", "name=v", "size=16M", "pool=pf")
    s.tv("/vdisks", "create", "name=w", "size=8M", "pool=pq")
    for vdisk in ("v", "w"):
        s.tv("/exports", "create", f"vdisk={vdisk}", PORTAL, ACL)
    v, w = attach(s, "v"), attach(s, "w")
    v_refs, w_refs = fill(s, v, "v", 4), fill(s, w, "w", 1)
    psegs = physical_segments(s, v_refs)

    # segment 1 of v: the first 256 KiB of its physical segment start failing
    bad = DATA_OFFSET + psegs[1] * SEG
    mapper.load(mapper.failing(bad, BAD))
    mark = kernel_log_mark(g)

    # the command that meets the bad range gets MEDIUM ERROR, UNRECOVERED READ ERROR
    (r,) = v.scsi(Lun.read(SEG, 4096))
    assert (r.status, r.sense, r.transport) == (CHECK_CONDITION, MEDIUM_READ, (0, 0)), r
    info = wait_for_state(s, "pf", "failed")
    m = re.search(r"^failure: read at (\d+): Input/output error", info, re.M)
    assert m and bad <= int(m.group(1)) < bad + BAD, info
    assert "1 failed" in s.tv("ls", "/pools").stdout
    assert "state: online" in container_info(s, "pq")

    # the Linux initiator meets it too: the block layer turns MEDIUM ERROR into ENODATA
    # (BLK_STS_MEDIUM), and the kernel logs the sense
    dd = g.run(["dd", f"if={v.dev}", "of=/dev/null", "bs=4k", "count=1", f"skip={SEG // 4096}",
                "iflag=direct"], check=False, timeout=SLOW)  # fmt: skip
    assert not dd.ok and "No data available" in dd.stderr, dd.describe()
    log = kernel_log_since(g, mark)
    assert re.search(rf"\[{v.name}\].*Sense Key : Medium Error", log), log
    assert re.search(rf"\[{v.name}\].*Add\. Sense: Unrecovered read error", log), log

    # everything else reads back: the rest of that segment, v's other segments, w
    (r_rest,) = v.scsi(Lun.read(SEG + 512 * 1024, 4096))
    assert good(r_rest), r_rest
    ref1 = g.run(["od", "-An", "-v", "-tx1", "-j", str(512 * 1024), "-N", "4096", v_refs[1]])
    assert r_rest.data.hex() == "".join(ref1.stdout.split())
    for i in (0, 2, 3):
        v.dd_cmp(v_refs[i], i)
    w.dd_cmp(w_refs[0], 0)

    # writes: in place in v works; a new segment in pf (its only container failed) is
    # refused as a full pool; a new segment in pq is taken
    inplace, fresh = b"\x5a" * 4096, b"\xa5" * 4096
    r_in, r_new, r_back = v.scsi(Lun.write(0, inplace), Lun.write(10 * SEG, fresh),
                                 Lun.read(0, 4096))  # fmt: skip
    assert good(r_in), r_in
    assert (r_new.status, r_new.sense) == (CHECK_CONDITION, SPACE_ALLOCATION_FAILED), r_new
    assert good(r_back) and r_back.data == inplace, r_back
    (r_w,) = w.scsi(Lun.write(5 * SEG, fresh))
    assert good(r_w) and r_w.uas == [], r_w
    # pf can take no new data: past its soft threshold; v's LUN told its initiator (seen
    # by SG_IO, or by the kernel when a block-layer command met it), w's LUN did not
    log = kernel_log_since(g, mark)
    v_addr, w_addr = scsi_address(g, v), scsi_address(g, w)
    seen = [u for r in (r_rest, r_in, r_new, r_back) for u in r.uas]
    assert SOFT_THRESHOLD in seen or threshold_logged(log, v_addr), (seen, log)
    assert not threshold_logged(log, w_addr), log

    # the medium repaired (the linear table back), the operator clears the mark
    mapper.load(mapper.linear())
    out = s.tv("/pools/pf/0", "clear").stdout
    assert out.startswith("Container 0 of pool pf is online again"), out
    assert "state: online" in container_info(s, "pf")
    r_old, r_new, r_back = v.scsi(Lun.read(SEG, 4096), Lun.write(10 * SEG, fresh),
                                  Lun.read(10 * SEG, 4096))  # fmt: skip
    ref1 = g.run(["od", "-An", "-v", "-tx1", "-N", "4096", v_refs[1]])
    assert good(r_old) and r_old.data.hex() == "".join(ref1.stdout.split()), r_old
    assert good(r_new) and good(r_back) and r_back.data == fresh, (r_new, r_back)
    v.dd_cmp(v_refs[2], 2)
    assert s.tv("check").stdout.endswith("clean\n")


# --- the guest side ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if argv[:1] == ["scsi"] and len(argv) == 3:
        print(json.dumps(sgio(argv[1], json.loads(argv[2]))))
        return 0
    if argv[:1] == ["locate"] and len(argv) >= 3:
        print(json.dumps(locate(argv[1], argv[2:])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
