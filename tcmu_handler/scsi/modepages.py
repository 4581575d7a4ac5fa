"""MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5; SBC-4 6.5).

Pages: read-write error recovery (01h), caching (08h, WCE changeable), control (0Ah,
SWP and D_SENSE changeable) and informational exceptions control (1Ch). Nothing can be
saved. MODE SELECT accepts a page only if every bit outside the changeable mask equals
the current value, and applies nothing unless every page is acceptable.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from targetvirt.errors import (
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
    saving_parameters_not_supported,
)
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.common import COMPLETED, Completion, gather, respond
from tcmu_handler.scsi.lun import LunState

Buffers = Sequence[memoryview]

CURRENT, CHANGEABLE, DEFAULT, SAVED = 0, 1, 2, 3
WP = 0x80
DPOFUA = 0x10


def _rw_error_recovery(lun: LunState, pc: int) -> bytearray:
    return bytearray((0x01, 0x0A)) + bytearray(10)


def _caching(lun: LunState, pc: int) -> bytearray:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    if pc == CHANGEABLE:
        page[2] = 0x04
    else:
        wce = lun.write_cache_enabled if pc == CURRENT else lun.wce_default
        page[2] = 0x04 if wce else 0
    return page


def _control(lun: LunState, pc: int) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 0x0A
    if pc == CHANGEABLE:
        page[2], page[4] = 0x04, 0x08  # D_SENSE, SWP
        return page
    current = pc == CURRENT
    # GLTSD (no saved log parameters); QAM=1: commands run in parallel and complete
    # out of order; TAS as LIO reports it; BUSY TIMEOUT PERIOD unlimited.
    page[2] = 0x02 | (0x04 if current and lun.d_sense else 0)
    page[3] = 0x10
    page[4] = 0x08 if current and lun.swp else 0
    page[5] = 0x40
    struct.pack_into(">H", page, 8, 0xFFFF)
    return page


def _informational_exceptions(lun: LunState, pc: int) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = 0x1C, 0x0A
    if pc != CHANGEABLE:
        page[2] = 0x08  # DEXCPT: no informational exceptions are ever reported
    return page


PAGES: dict[int, Callable[[LunState, int], bytearray]] = {
    0x01: _rw_error_recovery,
    0x08: _caching,
    0x0A: _control,
    0x1C: _informational_exceptions,
}


def _select_pages(code: int, subpage: int) -> list[Callable[[LunState, int], bytearray]]:
    if code == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_field_in_cdb(3, 7, "no subpages are supported")
        return list(PAGES.values())
    build = PAGES.get(code)
    if build is None:
        raise invalid_field_in_cdb(2, 5, f"mode page {code:#04x} is not supported")
    if subpage not in (0x00, 0xFF):
        raise invalid_field_in_cdb(3, 7, "no subpages are supported")
    return [build]


def _block_descriptor(lun: LunState, long_lba: bool, pc: int) -> bytes:
    if pc == CHANGEABLE:
        return bytes(16 if long_lba else 8)
    if long_lba:
        return struct.pack(">Q4xI", lun.num_blocks, lun.block_size)
    blocks = min(lun.num_blocks, 0xFFFFFFFF)
    return struct.pack(">IxBH", blocks, lun.block_size >> 16, lun.block_size & 0xFFFF)


def mode_sense_data(lun: LunState, cdb: bytes, ten: bool) -> bytes:
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == SAVED:
        raise saving_parameters_not_supported(2, 7)
    pages = b"".join(build(lun, pc) for build in _select_pages(code, subpage))
    long_lba = ten and bool(cdb[1] & 0x10)
    bd = b"" if cdb[1] & 0x08 else _block_descriptor(lun, long_lba, pc)
    dsp = (WP if lun.write_protect else 0) | DPOFUA
    if ten:
        total = 8 + len(bd) + len(pages)
        head = struct.pack(">HBBBxH", total - 2, 0, dsp, 0x01 if long_lba and bd else 0, len(bd))
    else:
        total = 4 + len(bd) + len(pages)
        head = bytes((total - 1, 0, dsp, len(bd)))
    return head + bd + pages


def mode_sense_6(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    return respond(mode_sense_data(lun, cdb, ten=False), cdb[4], data_in)


def mode_sense_10(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    alloc = struct.unpack_from(">H", cdb, 7)[0]
    return respond(mode_sense_data(lun, cdb, ten=True), alloc, data_in)


# --- MODE SELECT ------------------------------------------------------------------------


def mode_select_6(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    return _mode_select(lun, cdb, cdb[4], data_out, be, ten=False)


def mode_select_10(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    length = struct.unpack_from(">H", cdb, 7)[0]
    return _mode_select(lun, cdb, length, data_out, be, ten=True)


def _mode_select(
    lun: LunState, cdb: bytes, length: int, data_out: Buffers, be: BlockBackend, *, ten: bool
) -> Completion:
    if cdb[1] & 0x01:
        raise invalid_field_in_cdb(1, 0, "saved pages are not supported")
    if not length:
        return COMPLETED
    if not cdb[1] & 0x10:
        raise invalid_field_in_cdb(1, 4, "only the SPC page format (PF=1) is supported")
    data = gather(data_out, length)
    header = 8 if ten else 4
    if len(data) < length or length < header:
        raise parameter_list_length_error("mode parameter list is truncated")
    if data[2 if ten else 1]:
        raise invalid_field_in_parameter_list(2 if ten else 1, 7, "medium type must be 0")
    bd_len = struct.unpack_from(">H", data, 6)[0] if ten else data[3]
    long_lba = ten and bool(data[4] & 0x01)
    _check_block_descriptors(lun, data, header, bd_len, long_lba)
    changes = _parse_pages(lun, data, header + bd_len)
    _apply(lun, changes, be)
    return COMPLETED


def _check_block_descriptors(
    lun: LunState, data: bytes, start: int, bd_len: int, long_lba: bool
) -> None:
    size = 16 if long_lba else 8
    if bd_len % size or start + bd_len > len(data):
        raise parameter_list_length_error("bad block descriptor length")
    for pos in range(start, start + bd_len, size):
        if long_lba:
            blocks, block_len = struct.unpack_from(">Q4xI", data, pos)
            same = blocks in (0, lun.num_blocks)
            len_at = pos + 12
        else:
            blocks = struct.unpack_from(">I", data, pos)[0]
            block_len = int.from_bytes(data[pos + 5 : pos + 8], "big")
            same = blocks in (0, min(lun.num_blocks, 0xFFFFFFFF))
            len_at = pos + 5
        if not same:
            raise invalid_field_in_parameter_list(pos, 7, "the capacity cannot be changed")
        if block_len != lun.block_size:
            raise invalid_field_in_parameter_list(len_at, 7, "the block size cannot be changed")


def _parse_pages(lun: LunState, data: bytes, pos: int) -> list[tuple[int, bytes]]:
    changes: list[tuple[int, bytes]] = []
    while pos < len(data):
        if data[pos] & 0x40:
            raise invalid_field_in_parameter_list(pos, 6, "no subpages are supported")
        code = data[pos] & 0x3F  # PS is reserved in MODE SELECT: ignored
        build = PAGES.get(code)
        if build is None:
            raise invalid_field_in_parameter_list(pos, 5, f"mode page {code:#04x} is not supported")
        if pos + 2 > len(data) or pos + 2 + data[pos + 1] > len(data):
            raise parameter_list_length_error(f"mode page {code:#04x} is truncated")
        current, mask = build(lun, CURRENT), build(lun, CHANGEABLE)
        if data[pos + 1] != current[1]:
            raise invalid_field_in_parameter_list(pos + 1, 7, "wrong PAGE LENGTH")
        page = data[pos : pos + 2 + current[1]]
        for i in range(2, len(page)):
            bad = (page[i] ^ current[i]) & ~mask[i]
            if bad:
                raise invalid_field_in_parameter_list(
                    pos + i,
                    bad.bit_length() - 1,
                    f"mode page {code:#04x} byte {i} is not changeable",
                )
        changes.append((code, page))
        pos += len(page)
    return changes


def _apply(lun: LunState, changes: list[tuple[int, bytes]], be: BlockBackend) -> None:
    for code, page in changes:
        if code == 0x08:
            wce = bool(page[2] & 0x04)
            if lun.write_cache_enabled and not wce:
                be.flush()  # what was cached must be durable once the cache is off
            lun.write_cache_enabled = wce
        elif code == 0x0A:
            lun.d_sense = bool(page[2] & 0x04)
            lun.swp = bool(page[4] & 0x08)
    if changes and lun.on_mode_select is not None:
        lun.on_mode_select(lun)
