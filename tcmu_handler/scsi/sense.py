"""Sense data (SPC-4 4.5): fixed format (70h) by default, descriptor format (72h) on request.

Sense is built from plain data (a :class:`~targetvirt.errors.Sense` triple plus the
optional INFORMATION and SENSE-KEY SPECIFIC values) so that every error path, the unit
attention gate and REQUEST SENSE share one encoder.
"""

from __future__ import annotations

import struct

from targetvirt.errors import (
    ILLEGAL_REQUEST,
    NO_SENSE,
    NOT_READY,
    UNIT_ATTENTION,
    ScsiError,
    Sense,
)

FIXED_LEN = 18  # fixed format with ADDITIONAL SENSE LENGTH 10 (SPC-4 table 45)

# Sense triples the emulation reports without an exception.
NO_ADDITIONAL_SENSE = Sense(NO_SENSE, 0x00, 0x00)
INTERNAL_TARGET_FAILURE = Sense(0x4, 0x44, 0x00)
CAPACITY_DATA_CHANGED = Sense(UNIT_ATTENTION, 0x2A, 0x09)
MODE_PARAMETERS_CHANGED = Sense(UNIT_ATTENTION, 0x2A, 0x01)
SOFT_THRESHOLD_REACHED = Sense(UNIT_ATTENTION, 0x38, 0x07)
FORMAT_IN_PROGRESS = Sense(NOT_READY, 0x04, 0x04)
SANITIZE_IN_PROGRESS = Sense(NOT_READY, 0x04, 0x1B)
INVALID_FIELD_IN_CDB = Sense(ILLEGAL_REQUEST, 0x24, 0x00)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def field_pointer_sks(field_pointer: int, bit: int | None, *, in_cdb: bool) -> bytes:
    """SENSE-KEY SPECIFIC for ILLEGAL REQUEST: SKSV, C/D, BPV + BIT POINTER, FIELD POINTER."""
    b0 = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        b0 |= 0x08 | (bit & 0x07)
    return bytes((b0, (field_pointer >> 8) & 0xFF, field_pointer & 0xFF))


def progress_sks(progress: int) -> bytes:
    """SENSE-KEY SPECIFIC progress indication: ``progress`` is a fraction of 65536."""
    progress = max(0, min(progress, 0xFFFF))
    return bytes((0x80, progress >> 8, progress & 0xFF))


def build(
    sense: Sense,
    *,
    information: int | None = None,
    sks: bytes | None = None,
    descriptor: bool = False,
) -> bytes:
    """Encode current sense data; ``sks`` is 3 bytes from one of the helpers above."""
    if descriptor:
        return _descriptor(sense, information, sks)
    return _fixed(sense, information, sks)


def _fixed(sense: Sense, information: int | None, sks: bytes | None) -> bytes:
    buf = bytearray(FIXED_LEN)
    buf[0] = 0x70
    buf[2] = sense.key & 0x0F
    buf[7] = FIXED_LEN - 8
    buf[12] = sense.asc
    buf[13] = sense.ascq
    # INFORMATION is 4 bytes here; a larger value cannot be valid (SPC-4 4.5.3).
    if information is not None and 0 <= information <= 0xFFFFFFFF:
        buf[0] |= 0x80
        _U32.pack_into(buf, 3, information)
    if sks is not None:
        buf[15:18] = sks
    return bytes(buf)


def _descriptor(sense: Sense, information: int | None, sks: bytes | None) -> bytes:
    body = bytearray()
    if information is not None and information >= 0:
        # Information descriptor (type 00h): VALID, then an 8-byte INFORMATION field.
        body += bytes((0x00, 0x0A, 0x80, 0x00)) + _U64.pack(information & (2**64 - 1))
    if sks is not None:
        body += bytes((0x02, 0x06, 0x00, 0x00)) + sks + b"\x00"
    head = bytes((0x72, sense.key & 0x0F, sense.asc, sense.ascq, 0, 0, 0, len(body)))
    return head + bytes(body)


def from_error(error: ScsiError, *, descriptor: bool = False) -> bytes:
    """Sense bytes for a :class:`ScsiError`, with its field pointer or information."""
    sks = None
    if error.field_pointer is not None:
        sks = field_pointer_sks(error.field_pointer, error.bit, in_cdb=error.in_cdb)
    return build(error.scsi_sense, information=error.information, sks=sks, descriptor=descriptor)


def to_descriptor(fixed: bytes) -> bytes:
    """Re-encode fixed-format sense as descriptor format (for REQUEST SENSE with DESC=1)."""
    info = _U32.unpack_from(fixed, 3)[0] if fixed[0] & 0x80 else None
    sks = bytes(fixed[15:18]) if fixed[15] & 0x80 else None
    return _descriptor(Sense(fixed[2] & 0x0F, fixed[12], fixed[13]), info, sks)
