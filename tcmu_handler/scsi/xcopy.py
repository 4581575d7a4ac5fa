"""Third-party copy (SPC-4 6.4, 6.18): EXTENDED COPY (LID1) and RECEIVE COPY RESULTS.

LIO emulates these for its own backstores but hands them to a user backstore, and
initiators (VMware VAAI "full copy", sg_xcopy) use them to copy blocks without moving the
data through the host. The copy manager here is the LUN itself and copies only within
it: a CSCD (target) descriptor must name this LUN by one of the designators of VPD page
83h, anything else is COPY TARGET DEVICE NOT REACHABLE. The handler cannot see other
LUNs, nor whether the initiator may reach them (tcmu-runner refuses cross-device copies
for the same reason), and a COPY ABORTED makes the initiator fall back to reads and
writes.

Supported: the identification descriptor CSCD descriptor (E4h) and the block device to
block device segment descriptor (02h); no inline or held data. The whole parameter list
is checked before anything is copied, so a refused command leaves the medium untouched.
Each segment is copied through the backend in ``sbc.CHUNK`` pieces, read then written,
back to front when the destination overlaps the end of the source (memmove semantics).

RECEIVE COPY RESULTS answers OPERATING PARAMETERS (the limits in ``LunState``, enforced
here) and COPY STATUS for commands run with a list identifier (LIST ID USAGE 00b or 10b),
kept in the ``LunState`` copy table.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from targetvirt.errors import (
    COPY_ABORTED,
    ILLEGAL_REQUEST,
    ScsiError,
    Sense,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    parameter_list_length_error,
)
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.common import COMPLETED, Completion, gather, respond, total_length
from tcmu_handler.scsi.lun import CopyStatus, LunState
from tcmu_handler.scsi.sbc import CHUNK, require_writable

Buffers = Sequence[memoryview]

HEADER_LEN = 16
CSCD_LEN = 32  # every CSCD descriptor this copy manager accepts is 32 bytes
BLOCK_TO_BLOCK = 0x02
BLOCK_TO_BLOCK_LEN = 28
IDENTIFICATION = 0xE4
DESCRIPTOR_TYPES = (BLOCK_TO_BLOCK, IDENTIFICATION)  # implemented, in ascending order
BLOCK_DEVICE = 0x00  # PERIPHERAL DEVICE TYPE of a direct-access block device

# LIST ID USAGE (parameter list byte 1, bits 4-3)
HOLD, DISCARD, NO_LIST_ID = 0b00, 0b10, 0b11

# RECEIVE COPY RESULTS service actions
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03

# Advice, not enforced: a copy holds one of the device's worker threads for as long as it
# runs, and an initiator that honours this leaves the other workers to ordinary I/O.
CONCURRENT_COPIES = 1

TOO_MANY_TARGET_DESCRIPTORS = Sense(ILLEGAL_REQUEST, 0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR = Sense(ILLEGAL_REQUEST, 0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = Sense(ILLEGAL_REQUEST, 0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR = Sense(ILLEGAL_REQUEST, 0x26, 0x09)
INLINE_DATA_LENGTH_EXCEEDED = Sense(ILLEGAL_REQUEST, 0x26, 0x0B)
OPERATION_IN_PROGRESS = Sense(ILLEGAL_REQUEST, 0x00, 0x16)
COPY_TARGET_NOT_REACHABLE = Sense(COPY_ABORTED, 0x0D, 0x02)
INCORRECT_COPY_TARGET_TYPE = Sense(COPY_ABORTED, 0x0D, 0x03)
# A segment outside the LUN: what the copy manager's own READ or WRITE of the copy target
# would have failed with is LBA OUT OF RANGE, but that is not a copy target's sense to
# report; the segment pointer says which LBA field is wrong.
SEGMENT_OUT_OF_RANGE = Sense(COPY_ABORTED, 0x00, 0x00)

_HEADER = struct.Struct(">BBH4xII")  # list id, flags, CSCD list length, segments, inline
_B2B = struct.Struct(">BBHHH2xHQQ")  # type, DC/CAT, length, src, dst, blocks, src/dst LBA
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Target:
    """One CSCD descriptor; ``offset`` is where it starts in the parameter list."""

    offset: int
    here: bool  # it names this LUN
    device_type: int
    block_length: int  # DISK BLOCK LENGTH, 0 when not given


@dataclass(frozen=True, slots=True)
class Segment:
    """One block to block segment descriptor; ``offset`` as for :class:`Target`."""

    offset: int
    source: int  # CSCD descriptor indexes
    destination: int
    blocks: int
    src_lba: int
    dst_lba: int


def _bad(sense: Sense, pointer: int | None, why: str, bit: int | None = None) -> ScsiError:
    """A parameter list error; the field pointer counts from the start of the list (the
    segment pointer of COPY ABORTED sense, with SD=0, reads the same)."""
    return ScsiError(why, sense, field_pointer=pointer, bit=bit, in_cdb=False)


def max_descriptor_list_length(lun: LunState) -> int:
    """MAXIMUM DESCRIPTOR LIST LENGTH: room for the most descriptors of each kind, no more."""
    return CSCD_LEN * lun.max_copy_targets + BLOCK_TO_BLOCK_LEN * lun.max_copy_segments


# --- EXTENDED COPY -------------------------------------------------------------------------


def extended_copy(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    if cdb[1] & 0x1F:
        # EXTENDED COPY (LID4) and the token commands of ODX (POPULATE TOKEN, WRITE USING
        # TOKEN) share the opcode: none of them is supported.
        raise invalid_field_in_cdb(1, 4, "only EXTENDED COPY (LID1) is supported")
    length = _U32.unpack_from(cdb, 10)[0]
    if not length:
        return COMPLETED  # SPC-4: no data, not an error, and no state changes
    # The CDB governs a longer data-out; a shorter one is what the initiator sent.
    available = min(length, total_length(data_out))
    data = gather(data_out, min(available, HEADER_LEN + max_descriptor_list_length(lun)))
    list_id, usage = _header(lun, data, available)
    status = None
    if usage != NO_LIST_ID:
        status = lun.begin_copy(list_id)
        if status is None:
            raise _bad(OPERATION_IN_PROGRESS, 0, f"list identifier {list_id} is in use")
    try:
        segments = _parse(lun, data)
    except BaseException:
        if status is not None:
            lun.drop_copy(list_id, status)  # refused before it started: nothing to report
        raise
    _run(lun, be, segments, status if status is not None else CopyStatus())
    return COMPLETED


def _header(lun: LunState, data: bytes, available: int) -> tuple[int, int]:
    """Check the 16-byte parameter list header; return the list identifier and usage."""
    if len(data) < HEADER_LEN:
        raise parameter_list_length_error("an EXTENDED COPY parameter list has a 16-byte header")
    list_id, flags, cscd_len, segments_len, inline_len = _HEADER.unpack_from(data)
    usage = (flags >> 3) & 0x03
    if usage == 0b01:
        raise invalid_field_in_parameter_list(1, 4, "LIST ID USAGE 01b is reserved")
    if usage == NO_LIST_ID and list_id:
        raise invalid_field_in_parameter_list(0, why="LIST ID USAGE 11b needs list identifier 0")
    # STR and PRIORITY are hints about how to schedule the copy: nothing to do with them.
    if cscd_len + segments_len > max_descriptor_list_length(lun):
        raise parameter_list_length_error("more than MAXIMUM DESCRIPTOR LIST LENGTH")
    if inline_len:
        raise _bad(INLINE_DATA_LENGTH_EXCEEDED, 12, "inline data is not supported")
    if HEADER_LEN + cscd_len + segments_len > available:
        raise parameter_list_length_error("the descriptor lists run past the parameter list")
    return list_id, usage


def _parse(lun: LunState, data: bytes) -> list[Segment]:
    """Every check that needs no I/O, in parameter list order, then the references."""
    cscd_len, segments_len = _HEADER.unpack_from(data)[2:4]
    targets = _targets(lun, data, HEADER_LEN, cscd_len)
    segments = _segments(lun, data, HEADER_LEN + cscd_len, segments_len)
    if segments:
        require_writable(lun)  # every destination is this LUN
    for segment in segments:
        _check_segment(lun, targets, segment)
    return segments


def _targets(lun: LunState, data: bytes, start: int, length: int) -> list[Target]:
    if length > CSCD_LEN * lun.max_copy_targets:
        raise _bad(TOO_MANY_TARGET_DESCRIPTORS, 2, "more than MAXIMUM CSCD DESCRIPTOR COUNT")
    targets = []
    end = start + length
    for pos in range(start, end, CSCD_LEN):
        if data[pos] != IDENTIFICATION:
            why = f"CSCD descriptor type {data[pos]:#04x} is not supported"
            raise _bad(UNSUPPORTED_TARGET_DESCRIPTOR, pos, why, 7)
        if pos + CSCD_LEN > end:
            raise invalid_field_in_parameter_list(2, why="a CSCD descriptor is cut short")
        targets.append(_identification(lun, data, pos))
    return targets


def _identification(lun: LunState, data: bytes, pos: int) -> Target:
    """An identification descriptor CSCD descriptor (E4h).

    LU ID TYPE and RELATIVE INITIATOR PORT IDENTIFIER are ignored: the designator alone
    says which logical unit it is (SPC-4), and this copy manager reaches no other.
    """
    if data[pos + 1] & 0x20:
        # NUL (SPC-3: a null device that discards writes) is obsolete; copying to or
        # from the LUN instead would not be what the initiator asked for.
        raise invalid_field_in_parameter_list(pos + 1, 5, "NUL is not supported")
    designator_len = data[pos + 7]
    if designator_len > 20:
        raise invalid_field_in_parameter_list(pos + 7, why="a designator is at most 20 bytes")
    # Compare code set, association, designator type and designator; the protocol
    # identifier and PIV only qualify port designators, which never name a LU.
    named = bytes((data[pos + 4] & 0x0F, data[pos + 5] & 0x3F, 0, designator_len))
    named += data[pos + 8 : pos + 8 + designator_len]
    block_length = int.from_bytes(data[pos + 29 : pos + 32], "big")
    return Target(pos, named in lun.designators(), data[pos + 1] & 0x1F, block_length)


def _segments(lun: LunState, data: bytes, start: int, length: int) -> list[Segment]:
    segments: list[Segment] = []
    pos, end = start, start + length
    while pos < end:
        if len(segments) == lun.max_copy_segments:
            why = "more than MAXIMUM SEGMENT DESCRIPTOR COUNT"
            raise _bad(TOO_MANY_SEGMENT_DESCRIPTORS, 8, why)
        if data[pos] != BLOCK_TO_BLOCK:
            why = f"segment descriptor type {data[pos]:#04x} is not supported"
            raise _bad(UNSUPPORTED_SEGMENT_DESCRIPTOR, pos, why, 7)
        if pos + 4 > end or int.from_bytes(data[pos + 2 : pos + 4], "big") != 0x18:
            why = "a block to block segment descriptor has DESCRIPTOR LENGTH 0018h"
            raise invalid_field_in_parameter_list(pos + 2, why=why)
        if pos + BLOCK_TO_BLOCK_LEN > end:
            raise invalid_field_in_parameter_list(8, why="a segment descriptor is cut short")
        segments.append(_block_to_block(lun, data, pos))
        pos += BLOCK_TO_BLOCK_LEN
    return segments


def _block_to_block(lun: LunState, data: bytes, pos: int) -> Segment:
    """A block device to block device segment descriptor (02h).

    Source and destination are this LUN, so their block sizes match: DC (which side
    NUMBER OF BLOCKS counts) changes nothing and CAT (what to do with a residue) never
    applies.
    """
    _, _, _, src, dst, blocks, src_lba, dst_lba = _B2B.unpack_from(data, pos)
    if blocks * lun.block_size > lun.max_copy_segment_bytes:
        raise invalid_field_in_parameter_list(pos + 10, why="more than MAXIMUM SEGMENT LENGTH")
    return Segment(pos, src, dst, blocks, src_lba, dst_lba)


def _check_segment(lun: LunState, targets: list[Target], segment: Segment) -> None:
    """The references of one segment: both CSCDs are this LUN, both ranges inside it."""
    for index, field in ((segment.source, 4), (segment.destination, 6)):
        pointer = segment.offset + field
        if index >= len(targets) or not targets[index].here:
            why = f"CSCD descriptor {index} does not name this logical unit"
            raise _bad(COPY_TARGET_NOT_REACHABLE, pointer, why)
        target = targets[index]
        if target.device_type != BLOCK_DEVICE:
            why = f"CSCD descriptor {index} is not a block device"
            raise _bad(INCORRECT_COPY_TARGET_TYPE, pointer, why)
        if target.block_length not in (0, lun.block_size):
            why = f"DISK BLOCK LENGTH is not {lun.block_size}"
            raise invalid_field_in_parameter_list(target.offset + 29, why=why)
    for lba, field in ((segment.src_lba, 12), (segment.dst_lba, 20)):
        if lba + segment.blocks > lun.num_blocks:
            why = f"LBA {lba} + {segment.blocks} blocks is outside the logical unit"
            raise _bad(SEGMENT_OUT_OF_RANGE, segment.offset + field, why)


def _run(lun: LunState, be: BlockBackend, segments: list[Segment], status: CopyStatus) -> None:
    """Copy the segments in order, keeping ``status`` current for COPY STATUS."""
    largest = max((s.blocks for s in segments), default=0) * lun.block_size
    try:
        buf = memoryview(bytearray(min(CHUNK, largest)))  # CHUNK is a multiple of any block
        for segment in segments:
            if segment.blocks:
                _copy(lun, be, segment, buf, status)
            status.segments += 1
    except BaseException:
        status.failed = True
        raise
    finally:
        status.done = True


def _copy(
    lun: LunState, be: BlockBackend, segment: Segment, buf: memoryview, status: CopyStatus
) -> None:
    """One segment, in chunks of ``buf``; a backend error (with its sense) ends the command."""
    bs = lun.block_size
    src, dst, length = segment.src_lba * bs, segment.dst_lba * bs, segment.blocks * bs
    fua = not lun.write_cache_enabled
    for start, n in _chunks(length, len(buf), backwards=src < dst < src + length):
        view = buf[:n]
        be.read_into(src + start, [view])
        be.write_from(dst + start, [view], fua)
        status.transferred += n


def _chunks(length: int, step: int, *, backwards: bool) -> Iterator[tuple[int, int]]:
    """(offset, size) pieces covering ``length``; ``backwards`` starts from the end, so a
    destination overlapping the end of its source is written only after it was read."""
    starts = range(0, length, step)
    for start in reversed(starts) if backwards else starts:
        yield start, min(step, length - start)


# --- RECEIVE COPY RESULTS ---------------------------------------------------------------


def receive_copy_results(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    action = cdb[1] & 0x1F
    alloc = _U32.unpack_from(cdb, 10)[0]
    if action == OPERATING_PARAMETERS:
        return respond(operating_parameters(lun), alloc, data_in)
    if action == COPY_STATUS:
        status = lun.copy_status(cdb[2])
        if status is None:
            raise invalid_field_in_cdb(2, why=f"no EXTENDED COPY with list identifier {cdb[2]}")
        return respond(copy_status(status), alloc, data_in)
    # RECEIVE DATA and FAILED SEGMENT DETAILS: no data or sense is ever held.
    raise invalid_field_in_cdb(1, 4, f"RECEIVE COPY RESULTS action {action:#04x} is not supported")


def operating_parameters(lun: LunState) -> bytes:
    """SPC-4 6.18.4; no inline, held or stream data, so those limits are 0."""
    body = struct.pack(
        ">B3xHHIIIII2xHBBBB3xB",
        0x01,  # SNLID: LIST ID USAGE 11b (no list identifier) is supported
        lun.max_copy_targets,
        lun.max_copy_segments,
        max_descriptor_list_length(lun),
        lun.max_copy_segment_bytes,
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
        CONCURRENT_COPIES,  # TOTAL CONCURRENT COPIES
        CONCURRENT_COPIES,  # MAXIMUM CONCURRENT COPIES
        lun.block_size.bit_length() - 1,  # DATA SEGMENT GRANULARITY (log2): one block
        0,  # INLINE DATA GRANULARITY
        0,  # HELD DATA GRANULARITY
        len(DESCRIPTOR_TYPES),
    )
    body += bytes(DESCRIPTOR_TYPES)
    return _U32.pack(len(body)) + body


def copy_status(status: CopyStatus) -> bytes:
    """SPC-4 6.18.3: COPY MANAGER STATUS 00h running, 01h done, 02h done with an error."""
    state = 0x00 if not status.done else 0x02 if status.failed else 0x01
    units, count = 0, status.transferred  # TRANSFER COUNT UNITS 00h: bytes, 01h: KiB...
    while count > 0xFFFFFFFF:
        units, count = units + 1, count >> 10
    return struct.pack(">IBHBI", 8, state, min(status.segments, 0xFFFF), units, count)


# --- the Third-party Copy VPD page -----------------------------------------------------


def _tpc_descriptor(kind: int, body: bytes) -> bytes:
    body += bytes(-(len(body) + 4) % 4)  # each descriptor is a multiple of 4 bytes
    return struct.pack(">HH", kind, len(body)) + body


def vpd_third_party_copy(lun: LunState) -> bytes:
    """VPD page 8Fh (SPC-4 7.8.17): the descriptors a copy manager of EXTENDED COPY
    (LID1) must report, with the same limits as OPERATING PARAMETERS."""
    commands = b""
    for opcode in (op.EXTENDED_COPY, op.RECEIVE_COPY_RESULTS):
        actions = [c.service_action or 0 for c in op.SUPPORTED if c.opcode == opcode]
        commands += bytes((opcode, len(actions), *actions))
    parameters = struct.pack(
        ">4xHHII12x",
        lun.max_copy_targets,
        lun.max_copy_segments,
        max_descriptor_list_length(lun),
        0,  # MAXIMUM INLINE DATA LENGTH
    )
    general = struct.pack(
        ">IIIBB18x",
        CONCURRENT_COPIES,  # TOTAL CONCURRENT COPIES
        CONCURRENT_COPIES,  # MAXIMUM IDENTIFIED CONCURRENT COPIES
        lun.max_copy_segment_bytes,
        lun.block_size.bit_length() - 1,  # DATA SEGMENT GRANULARITY (log2)
        0,  # INLINE DATA GRANULARITY
    )
    body = (
        _tpc_descriptor(0x0001, bytes((len(commands),)) + commands)  # Supported Commands
        + _tpc_descriptor(0x0004, parameters)  # Parameter Data
        + _tpc_descriptor(0x0008, bytes((len(DESCRIPTOR_TYPES), *DESCRIPTOR_TYPES)))
        + _tpc_descriptor(0x000C, bytes(2))  # Supported CSCD Descriptor IDs: none
        + _tpc_descriptor(0x8001, general)  # General Copy Operations
    )
    return struct.pack(">BBH", 0x00, 0x8F, len(body)) + body
