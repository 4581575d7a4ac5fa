"""A small driver for ``handle()``: builds buffers the way TCMU does and decodes sense."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tcmu_handler.scsi import Completion, LunState, RamBackend, handle

UUID = "12345678-9abc-4def-8123-456789abcdef"
GARBAGE = 0xA5  # what a reused TCMU data area holds before the handler writes it


@dataclass
class Sense:
    key: int
    asc: int
    ascq: int
    information: int | None
    sks: bytes | None  # the 3 SENSE-KEY SPECIFIC bytes when SKSV is set

    @property
    def triple(self) -> tuple[int, int, int]:
        return (self.key, self.asc, self.ascq)

    @property
    def field_pointer(self) -> int | None:
        return None if self.sks is None else struct.unpack(">H", self.sks[1:])[0]


def parse_sense(data: bytes) -> Sense:
    """Decode fixed (70h) or descriptor (72h) current sense, checking its structure."""
    code = data[0] & 0x7F
    if code == 0x70:
        assert len(data) >= 18 and data[7] == len(data) - 8
        info = struct.unpack(">I", data[3:7])[0] if data[0] & 0x80 else None
        sks = bytes(data[15:18]) if data[15] & 0x80 else None
        return Sense(data[2] & 0x0F, data[12], data[13], info, sks)
    assert code == 0x72, f"unknown sense response code {code:#x}"
    assert data[7] == len(data) - 8
    info, sks, pos = None, None, 8
    while pos < len(data):
        kind, length = data[pos], data[pos + 1]
        if kind == 0x00:
            info = struct.unpack(">Q", data[pos + 4 : pos + 12])[0]
        elif kind == 0x02:
            sks = bytes(data[pos + 4 : pos + 7])
        pos += 2 + length
    assert pos == len(data)
    return Sense(data[1] & 0x0F, data[2], data[3], info, sks)


@dataclass
class Result:
    completion: Completion
    data: bytes  # the valid part of data-in (read_len honoured)
    raw: bytearray  # the whole data-in buffer

    @property
    def status(self) -> int:
        return self.completion.status

    @property
    def sense(self) -> Sense:
        return parse_sense(self.completion.sense)

    @property
    def good(self) -> bool:
        return self.completion.status == 0 and self.completion.sense == b""


class Device:
    """One LUN over a RamBackend."""

    def __init__(self, num_blocks: int = 4096, block_size: int = 512, **kw: object) -> None:
        self.lun = LunState.for_vdisk(UUID, num_blocks, block_size=block_size, **kw)  # type: ignore[arg-type]
        granule = self.lun.unmap_granularity * block_size
        self.backend = RamBackend(num_blocks * block_size, granule)

    @property
    def bs(self) -> int:
        return self.lun.block_size

    def run(
        self, cdb: bytes | list[int], out: bytes = b"", in_len: int = 0, *, split: int = 0
    ) -> Result:
        """Run a CDB; ``split`` cuts the buffers into iovecs of that many bytes."""
        buf = bytearray([GARBAGE]) * in_len
        data_in = _iovecs(memoryview(buf), split) if in_len else []
        data_out = _iovecs(memoryview(bytearray(out)), split) if out else []
        done = handle(self.lun, bytes(cdb), data_out, data_in, self.backend)
        n = in_len if done.read_len is None else done.read_len
        return Result(done, bytes(buf[:n]), buf)

    def write(self, lba: int, data: bytes) -> None:
        blocks = len(data) // self.bs
        assert self.run(cdb16(0x8A, lba, blocks), data).good

    def read(self, lba: int, blocks: int) -> bytes:
        r = self.run(cdb16(0x88, lba, blocks), in_len=blocks * self.bs)
        assert r.good, r.completion
        return r.data


def _iovecs(view: memoryview, split: int) -> list[memoryview]:
    if not split:
        return [view]
    return [view[i : i + split] for i in range(0, len(view), split)]


def cdb10(op: int, lba: int, blocks: int, flags: int = 0, group: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, group, blocks, 0)


def cdb12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def cdb16(op: int, lba: int, blocks: int, flags: int = 0, byte14: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, byte14, 0)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 1 if anchor else 0, 0, length, 0)


ILLEGAL = 0x05
INVALID_OPCODE = (ILLEGAL, 0x20, 0x00)
LBA_OUT_OF_RANGE = (ILLEGAL, 0x21, 0x00)
INVALID_FIELD_IN_CDB = (ILLEGAL, 0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (ILLEGAL, 0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (ILLEGAL, 0x1A, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT = (ILLEGAL, 0x0E, 0x03)
WRITE_PROTECTED = (0x07, 0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x07, 0x27, 0x02)
MISCOMPARE = (0x0E, 0x1D, 0x00)
