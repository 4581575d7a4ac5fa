"""FORMAT UNIT and SANITIZE: operations over the whole LUN.

Both run to completion inside the command (IMMED is accepted and ignored: returning
after the work is done is allowed). While one runs, other commands see NOT READY with
FORMAT IN PROGRESS or SANITIZE IN PROGRESS and a progress indication, as SBC-4 asks;
INQUIRY, REPORT LUNS and REQUEST SENSE still work.

On a thin vdisk, erasing is deallocating: FORMAT UNIT, SANITIZE BLOCK ERASE and
CRYPTOGRAPHIC ERASE all go through ``write_zeroes(unmap=True)``; there is no media key,
so CRYPTOGRAPHIC ERASE is the same deallocation. SANITIZE OVERWRITE writes the final
pass's pattern once: earlier passes would land in the same (or, with copy-on-write,
a new) physical segment and add nothing but time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from targetvirt.errors import (
    ScsiError,
    Sense,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.common import COMPLETED, Completion, gather, total_length
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.scsi.sbc import require_writable

Buffers = Sequence[memoryview]
Work = Callable[[LunState, BlockBackend], None]

ERASE_CHUNK = 1 << 30  # bytes per write_zeroes call: progress granularity
OVERWRITE_CHUNK = 1 << 20


def _run(lun: LunState, be: BlockBackend, sense: Sense, work: Work) -> Completion:
    if not lun.begin_operation(sense):
        raise ScsiError("another FORMAT UNIT or SANITIZE is in progress", lun_busy(lun))
    try:
        work(lun, be)
        be.flush()
    finally:
        lun.end_operation()
    return COMPLETED


def lun_busy(lun: LunState) -> Sense:
    current = lun.operation
    return current[0] if current else sn.FORMAT_IN_PROGRESS


def _erase(lun: LunState, be: BlockBackend) -> None:
    total = lun.num_blocks * lun.block_size
    done = 0
    while done < total:
        n = min(ERASE_CHUNK, total - done)
        be.write_zeroes(done, n, True)
        done += n
        lun.set_progress(done, total)


def _overwrite_with(block: bytes) -> Work:
    def work(lun: LunState, be: BlockBackend) -> None:
        if block.count(0) == len(block):
            be.write_zeroes(0, lun.num_blocks * lun.block_size, False)
            return
        chunk = memoryview(block * max(1, OVERWRITE_CHUNK // len(block)))
        total = lun.num_blocks * lun.block_size
        done = 0
        while done < total:
            n = min(len(chunk), total - done)
            be.write_from(done, [chunk[:n]], False)
            done += n
            lun.set_progress(done, total)

    return work


# --- FORMAT UNIT --------------------------------------------------------------------------


def format_unit(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    if cdb[1] & 0xC0:
        raise invalid_field_in_cdb(1, 7, "FMTPINFO: protection information is not supported")
    require_writable(lun)
    if cdb[1] & 0x10:  # FMTDATA: a parameter list header follows
        _check_format_header(
            gather(data_out, total_length(data_out)), long_list=bool(cdb[1] & 0x20)
        )
    return _run(lun, be, sn.FORMAT_IN_PROGRESS, _erase)


def _check_format_header(data: bytes, *, long_list: bool) -> None:
    size = 8 if long_list else 4
    if len(data) < size:
        raise parameter_list_length_error("FORMAT UNIT parameter list header is truncated")
    if data[1] & 0x08:
        raise invalid_field_in_parameter_list(1, 3, "initialization patterns are not supported")
    if not data[1] & 0x80 and data[1] & 0x70:
        raise invalid_field_in_parameter_list(1, 6, "DPRY, DCRT and STPF need FOV")
    if long_list and data[3]:
        raise invalid_field_in_parameter_list(3, 7, "protection information is not supported")
    defects = (
        struct.unpack_from(">I", data, 4)[0] if long_list else struct.unpack_from(">H", data, 2)[0]
    )
    if defects:
        raise invalid_field_in_parameter_list(4 if long_list else 2, 7, "there is no defect list")


# --- SANITIZE -----------------------------------------------------------------------------


def sanitize(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _check_sanitize_cdb(cdb)
    action = cdb[1] & 0x1F
    length = struct.unpack_from(">H", cdb, 7)[0]
    if action == op.SANITIZE_OVERWRITE:
        block = _overwrite_block(lun, gather(data_out, length), length)
        require_writable(lun)
        return _run(lun, be, sn.SANITIZE_IN_PROGRESS, _overwrite_with(block))
    if action not in (
        op.SANITIZE_BLOCK_ERASE,
        op.SANITIZE_CRYPTO_ERASE,
        op.SANITIZE_EXIT_FAILURE_MODE,
    ):
        raise invalid_field_in_cdb(1, 4, f"SANITIZE service action {action:#04x} is not supported")
    if length:
        raise invalid_field_in_cdb(7, 7, "this service action takes no parameter list")
    if action == op.SANITIZE_EXIT_FAILURE_MODE:
        return COMPLETED  # a sanitize never fails here, so there is no failure mode to leave
    require_writable(lun)
    return _run(lun, be, sn.SANITIZE_IN_PROGRESS, _erase)


def _check_sanitize_cdb(cdb: bytes) -> None:
    if cdb[1] & 0x40:
        raise invalid_field_in_cdb(1, 6, "reserved bit")
    for i in range(2, 7):
        if cdb[i]:
            raise invalid_field_in_cdb(i, 7, "reserved byte")


def _overwrite_block(lun: LunState, data: bytes, length: int) -> bytes:
    """The block the final OVERWRITE pass writes everywhere (SBC-4 5.30.2)."""
    bs = lun.block_size
    if length < 5 or length > bs + 4:
        raise invalid_field_in_cdb(7, 7, "OVERWRITE needs a 4-byte header and a pattern")
    if len(data) < length:
        raise parameter_list_length_error("SANITIZE parameter list is truncated")
    count = data[0] & 0x1F
    pattern_len: int = struct.unpack_from(">H", data, 2)[0]
    if data[0] & 0x60:
        raise invalid_field_in_parameter_list(0, 6, "TEST must be 0")
    if not count:
        raise invalid_field_in_parameter_list(0, 4, "OVERWRITE COUNT must not be 0")
    if not pattern_len or pattern_len > bs or pattern_len + 4 != length:
        raise invalid_field_in_parameter_list(2, 7, "bad INITIALIZATION PATTERN LENGTH")
    pattern = data[4 : 4 + pattern_len]
    block = (pattern * -(-bs // pattern_len))[:bs]
    if data[0] & 0x80 and count % 2 == 0:  # INVERT between passes: the last is inverted
        block = bytes(b ^ 0xFF for b in block)
    return block
