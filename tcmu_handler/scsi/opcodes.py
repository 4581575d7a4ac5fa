"""Operation codes, and what REPORT SUPPORTED OPERATION CODES says about each one.

The CDB usage data marks the bits the device server looks at (SPC-4 6.35.3); it is what
initiators (and libiscsi's DPO/FUA tests) read to learn, for instance, that DPO and FUA
are honoured on READ and WRITE.
"""

from __future__ import annotations

from dataclasses import dataclass

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
FORMAT_UNIT = 0x04
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
SEND_DIAGNOSTIC = 0x1D
PREVENT_ALLOW = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
PRE_FETCH_10 = 0x34
SYNCHRONIZE_CACHE_10 = 0x35
READ_DEFECT_DATA_10 = 0x37
WRITE_SAME_10 = 0x41
UNMAP = 0x42
SANITIZE = 0x48
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
EXTENDED_COPY = 0x83
RECEIVE_COPY_RESULTS = 0x84
READ_16 = 0x88
COMPARE_AND_WRITE = 0x89
WRITE_16 = 0x8A
ORWRITE_16 = 0x8B
WRITE_VERIFY_16 = 0x8E
VERIFY_16 = 0x8F
PRE_FETCH_16 = 0x90
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ_12 = 0xA8
WRITE_12 = 0xAA
WRITE_VERIFY_12 = 0xAE
VERIFY_12 = 0xAF
READ_DEFECT_DATA_12 = 0xB7

# service actions
SAI_READ_CAPACITY_16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_TARGET_PGS = 0x0A
MI_REPORT_SUPPORTED_OPCODES = 0x0C
XCOPY_LID1 = 0x00
RCR_COPY_STATUS = 0x00
RCR_OPERATING_PARAMETERS = 0x03
SANITIZE_OVERWRITE = 0x01
SANITIZE_BLOCK_ERASE = 0x02
SANITIZE_CRYPTO_ERASE = 0x03
SANITIZE_EXIT_FAILURE_MODE = 0x1F

# Commands that change the medium: refused with DATA PROTECT on a write-protected LUN.
WRITE_TYPE = frozenset(
    {
        FORMAT_UNIT,
        WRITE_6,
        WRITE_10,
        WRITE_12,
        WRITE_16,
        WRITE_VERIFY_10,
        WRITE_VERIFY_12,
        WRITE_VERIFY_16,
        WRITE_SAME_10,
        WRITE_SAME_16,
        UNMAP,
        SANITIZE,
        COMPARE_AND_WRITE,
        ORWRITE_16,
        EXTENDED_COPY,
    }
)

# SAM-5 5.14: a pending unit attention is not reported to these.
UA_EXEMPT = frozenset({INQUIRY, REPORT_LUNS, REQUEST_SENSE})
# SBC-4 4.33 / 4.34: what a LUN being formatted or sanitized still answers.
NOT_READY_EXEMPT = UA_EXEMPT


@dataclass(frozen=True)
class CommandInfo:
    """One line of REPORT SUPPORTED OPERATION CODES."""

    opcode: int
    service_action: int | None  # None: the opcode has no service actions
    usage: bytes  # CDB usage data; its length is the CDB length
    timeout: int = 30  # recommended command timeout, seconds (0: unspecified)


def _u(*data: int) -> bytes:
    return bytes(data)


_FF4 = (0xFF,) * 4
_FF8 = (0xFF,) * 8


def _rw10(op: int, b1: int) -> CommandInfo:
    return CommandInfo(op, None, _u(op, b1, *_FF4, 0x1F, 0xFF, 0xFF, 0x00))


def _rw12(op: int, b1: int) -> CommandInfo:
    return CommandInfo(op, None, _u(op, b1, *_FF4, *_FF4, 0x1F, 0x00))


def _rw16(op: int, b1: int) -> CommandInfo:
    return CommandInfo(op, None, _u(op, b1, *_FF8, *_FF4, 0x1F, 0x00))


DPO_FUA = 0x18
DPO_BYTCHK = 0x16  # VERIFY: DPO, BYTCHK 00b/01b/11b
DPO_BYTCHK1 = 0x12  # WRITE AND VERIFY: DPO, BYTCHK 00b/01b

SUPPORTED: tuple[CommandInfo, ...] = (
    CommandInfo(TEST_UNIT_READY, None, _u(0x00, 0, 0, 0, 0, 0)),
    CommandInfo(REQUEST_SENSE, None, _u(0x03, 0x01, 0, 0, 0xFF, 0)),
    CommandInfo(FORMAT_UNIT, None, _u(0x04, 0x3F, 0, 0, 0, 0), timeout=0),
    CommandInfo(READ_6, None, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    CommandInfo(WRITE_6, None, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    CommandInfo(INQUIRY, None, _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0)),
    CommandInfo(MODE_SELECT_6, None, _u(0x15, 0x11, 0, 0, 0xFF, 0)),
    CommandInfo(MODE_SENSE_6, None, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0)),
    CommandInfo(START_STOP_UNIT, None, _u(0x1B, 0x01, 0, 0x0F, 0xF5, 0)),
    CommandInfo(SEND_DIAGNOSTIC, None, _u(0x1D, 0x04, 0, 0xFF, 0xFF, 0)),
    CommandInfo(PREVENT_ALLOW, None, _u(0x1E, 0, 0, 0, 0x03, 0)),
    CommandInfo(READ_CAPACITY_10, None, _u(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    _rw10(READ_10, DPO_FUA),
    _rw10(WRITE_10, DPO_FUA),
    _rw10(WRITE_VERIFY_10, DPO_BYTCHK1),
    _rw10(VERIFY_10, DPO_BYTCHK),
    _rw10(PRE_FETCH_10, 0x02),
    _rw10(SYNCHRONIZE_CACHE_10, 0x02),
    CommandInfo(READ_DEFECT_DATA_10, None, _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    _rw10(WRITE_SAME_10, 0x08),
    CommandInfo(UNMAP, None, _u(0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0)),
    *(
        CommandInfo(SANITIZE, sa, _u(0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), timeout=0)
        for sa in (
            SANITIZE_OVERWRITE,
            SANITIZE_BLOCK_ERASE,
            SANITIZE_CRYPTO_ERASE,
            SANITIZE_EXIT_FAILURE_MODE,
        )
    ),
    CommandInfo(MODE_SELECT_10, None, _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    CommandInfo(MODE_SENSE_10, None, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
    # A copy may move MAXIMUM SEGMENT DESCRIPTOR COUNT x MAXIMUM SEGMENT LENGTH (256 MiB).
    CommandInfo(EXTENDED_COPY, XCOPY_LID1, _u(0x83, 0x1F, *(0,) * 8, *_FF4, 0, 0), timeout=60),
    *(
        CommandInfo(RECEIVE_COPY_RESULTS, sa, _u(0x84, 0x1F, 0xFF, *(0,) * 7, *_FF4, 0, 0))
        for sa in (RCR_COPY_STATUS, RCR_OPERATING_PARAMETERS)
    ),
    _rw16(READ_16, DPO_FUA),
    CommandInfo(COMPARE_AND_WRITE, None, _u(0x89, 0x18, *_FF8, 0, 0, 0, 0xFF, 0x1F, 0)),
    _rw16(WRITE_16, DPO_FUA),
    _rw16(ORWRITE_16, DPO_FUA),
    _rw16(WRITE_VERIFY_16, DPO_BYTCHK1),
    _rw16(VERIFY_16, DPO_BYTCHK),
    _rw16(PRE_FETCH_16, 0x02),
    _rw16(SYNCHRONIZE_CACHE_16, 0x02),
    _rw16(WRITE_SAME_16, 0x09),
    CommandInfo(
        SERVICE_ACTION_IN_16,
        SAI_READ_CAPACITY_16,
        _u(0x9E, 0x1F, *(0,) * 8, *_FF4, 0, 0),
    ),
    CommandInfo(
        SERVICE_ACTION_IN_16,
        SAI_GET_LBA_STATUS,
        _u(0x9E, 0x1F, *_FF8, *_FF4, 0, 0),
    ),
    # Emulated by LIO itself for every backstore; listed so the LUN's list is complete.
    CommandInfo(REPORT_LUNS, None, _u(0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, 0)),
    CommandInfo(
        MAINTENANCE_IN,
        MI_REPORT_SUPPORTED_OPCODES,
        _u(0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0),
    ),
    _rw12(READ_12, DPO_FUA),
    _rw12(WRITE_12, DPO_FUA),
    _rw12(WRITE_VERIFY_12, DPO_BYTCHK1),
    _rw12(VERIFY_12, DPO_BYTCHK),
    CommandInfo(READ_DEFECT_DATA_12, None, _u(0xB7, 0x1F, *_FF4, *_FF4, 0, 0)),
)

# Opcodes that carry a service action field (byte 1, bits 4-0).
WITH_SERVICE_ACTION = frozenset(c.opcode for c in SUPPORTED if c.service_action is not None)


# REPORT TARGET PORT GROUPS: listed only while the LUN reports ALUA (scsi/alua.py).
# PARAMETER DATA FORMAT (byte 1, bits 7-5) is examined: reserved formats are refused.
REPORT_TARGET_PGS = CommandInfo(
    MAINTENANCE_IN, MI_REPORT_TARGET_PGS, _u(0xA3, 0xFF, 0, 0, 0, 0, *_FF4, 0, 0)
)


def supported(alua: bool) -> tuple[CommandInfo, ...]:
    """The commands of a LUN; with ALUA, REPORT TARGET PORT GROUPS too (in opcode order)."""
    if not alua:
        return SUPPORTED
    at = next(i for i, c in enumerate(SUPPORTED) if c.opcode == MAINTENANCE_IN)
    return (*SUPPORTED[:at], REPORT_TARGET_PGS, *SUPPORTED[at:])


def lookup(
    opcode: int, service_action: int | None, commands: tuple[CommandInfo, ...] = SUPPORTED
) -> CommandInfo | None:
    for info in commands:
        if info.opcode == opcode and info.service_action == service_action:
            return info
    return None
