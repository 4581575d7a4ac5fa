"""SBC-4 commands: the data path and the thin-provisioning commands.

LIO checks nothing for a user backstore (no LBA range, no transfer length against the
data-out or data-in length, no maximum transfer length), so the range checks are here.
MAXIMUM TRANSFER LENGTH is advertised but not enforced (see ``LunState``).

Buffer length rules, the same for every command with data:

- data-in longer than the transfer (an underflow): fill what the CDB asks for and
  report it with ``read_len``, so LIO returns an underflow residual;
- data-in shorter (an overflow, which TCMU cannot report): fill what fits, GOOD;
- data-out longer than the transfer: use its first part (the CDB governs);
- data-out shorter: refuse with INVALID FIELD IN INFORMATION UNIT (what LIO answers for
  its own backstores) rather than write part of what the initiator believes it wrote.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from targetvirt.errors import (
    ABORTED_COMMAND,
    ILLEGAL_REQUEST,
    ScsiError,
    Sense,
    invalid_field_in_cdb,
    invalid_field_in_information_unit,
    invalid_field_in_parameter_list,
    lba_out_of_range,
    miscompare,
    parameter_list_length_error,
)
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.common import (
    COMPLETED,
    GOOD,
    Completion,
    check_range,
    clip,
    gather,
    reject_protect,
    respond,
    scatter,
    total_length,
)
from tcmu_handler.scsi.lun import LunState

Buffers = Sequence[memoryview]

_CDB10 = struct.Struct(">BBIBHB")  # op, flags, LBA, group, transfer length, control
_CDB12 = struct.Struct(">BBIIBB")
_CDB16 = struct.Struct(">BBQIBB")
_CAW = struct.Struct(">BBQ3xBBB")  # op, flags, LBA, NUMBER OF LOGICAL BLOCKS, group, control
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_UNMAP_DESC = struct.Struct(">QI4x")
_LBA_STATUS = struct.Struct(">QIB3x")

CHUNK = 1 << 20  # bytes per backend call when the emulation itself loops over a range
ORWRITE_RETRIES = 64
FUA = 0x08


def require_writable(lun: LunState) -> None:
    why = lun.write_protect
    if why is not None:
        raise ScsiError("the logical unit is write protected", why)


def _data_out(bufs: Buffers, length: int) -> Buffers:
    """The first ``length`` bytes of the data-out buffers (see module doc)."""
    have = total_length(bufs)
    if have == length:
        return bufs
    if have > length:
        return clip(bufs, length)
    raise invalid_field_in_information_unit(f"data-out holds {have} of {length} bytes")


def _contiguous(bufs: Buffers, length: int) -> memoryview:
    if len(bufs) == 1:
        return bufs[0][:length]
    return memoryview(gather(bufs, length))


# --- READ / WRITE: the hot path ----------------------------------------------------------


def plain_transfer(lun: LunState, cdb: bytes, length: int) -> int:
    """The byte offset of a READ or WRITE (10)/(16) whose answer can only be GOOD once its
    data has moved; -1 for every other command.

    Plain means: no unit attention or long operation pending, no protection bits, no FUA
    on a write, at least one block and all of them in range, a data buffer of exactly
    ``length`` bytes = the transfer, and for a write a writable LUN with its write cache
    on.  The device loop moves such a command's data itself (one backend call), skipping
    :func:`~tcmu_handler.scsi.command.handle`, which answers everything else -- so this
    function may say -1 for anything it is unsure of, never 0+ for a command ``handle``
    would answer differently.
    """
    if lun.gate:
        return -1
    lba: int
    op = cdb[0]
    if op in {0x28, 0x2A}:  # READ (10), WRITE (10)
        if len(cdb) < 10:
            return -1
        _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    elif op in {0x88, 0x8A}:  # READ (16), WRITE (16)
        if len(cdb) < 16:
            return -1
        _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    else:
        return -1
    write = op & 2
    if flags & (0xE0 | FUA if write else 0xE0) or not blocks or lba + blocks > lun.num_blocks:
        return -1
    bs = lun.block_size
    if blocks * bs != length:
        return -1
    if write and (lun.read_only or lun.swp or not lun.write_cache_enabled):
        return -1
    return lba * bs


def _read(
    lun: LunState, lba: int, blocks: int, data_in: Buffers, backend: BlockBackend
) -> Completion:
    if lba + blocks > lun.num_blocks:
        raise lba_out_of_range(lba, blocks)
    bs = lun.block_size
    length = blocks * bs
    have = len(data_in[0]) if len(data_in) == 1 else total_length(data_in)
    if have == length:
        if length:
            backend.read_into(lba * bs, data_in)
        return COMPLETED
    if have > length:
        if length:
            backend.read_into(lba * bs, clip(data_in, length))
        return Completion(GOOD, b"", length)
    return _read_short(lba * bs, have, bs, data_in, backend)


def _read_short(
    offset: int, have: int, bs: int, data_in: Buffers, backend: BlockBackend
) -> Completion:
    """The data-in buffer is smaller than the transfer: return the part that fits.

    The backend only sees whole blocks, so a partial last block goes through a copy.
    """
    if have % bs == 0:
        if have:
            backend.read_into(offset, data_in)
        return COMPLETED
    tmp = bytearray(-(-have // bs) * bs)
    backend.read_into(offset, [memoryview(tmp)])
    scatter(tmp, data_in)
    return COMPLETED


def _write(
    lun: LunState,
    lba: int,
    blocks: int,
    data_out: Buffers,
    backend: BlockBackend,
    *,
    fua: int,
) -> Completion:
    if lun.read_only or lun.swp:
        require_writable(lun)
    if lba + blocks > lun.num_blocks:
        raise lba_out_of_range(lba, blocks)
    bs = lun.block_size
    length = blocks * bs
    have = len(data_out[0]) if len(data_out) == 1 else total_length(data_out)
    if length:
        bufs = data_out if have == length else _data_out(data_out, length)
        backend.write_from(lba * bs, bufs, True if fua else not lun.write_cache_enabled)
    return COMPLETED


def read_6(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, be: BlockBackend
) -> Completion:
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return _read(lun, lba, cdb[4] or 256, data_in, be)  # SBC: 0 means 256 blocks


def write_6(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return _write(lun, lba, cdb[4] or 256, data_out, be, fua=0)


def read_10(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _read(lun, lba, blocks, data_in, be)


def read_12(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _read(lun, lba, blocks, data_in, be)


def read_16(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _read(lun, lba, blocks, data_in, be)


def write_10(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _write(lun, lba, blocks, data_out, be, fua=flags & FUA)


def write_12(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _write(lun, lba, blocks, data_out, be, fua=flags & FUA)


def write_16(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    if flags & 0xE0:
        reject_protect(flags)
    return _write(lun, lba, blocks, data_out, be, fua=flags & FUA)


# --- comparisons ---------------------------------------------------------------------------


def first_difference(a: memoryview | bytes, b: memoryview | bytes) -> int | None:
    """Offset of the first differing byte of two equal-length buffers, or None."""
    if a == b:
        return None
    step = 4096
    for start in range(0, len(a), step):
        x, y = a[start : start + step], b[start : start + step]
        if x != y:
            return start + next(i for i in range(len(x)) if x[i] != y[i])
    return None


def _compare_range(
    backend: BlockBackend, offset: int, expected: memoryview, length: int
) -> int | None:
    """Compare ``length`` bytes at ``offset`` with ``expected`` (repeated if it is shorter).

    Returns the offset in the range of the first difference, or None.
    """
    unit = len(expected)
    chunk = max(unit, CHUNK // unit * unit)
    pattern = expected if unit == length else memoryview(bytes(expected) * (chunk // unit))
    buf = bytearray(min(chunk, length))
    done = 0
    while done < length:
        n = min(chunk, length - done)
        view = memoryview(buf)[:n]
        backend.read_into(offset + done, [view])
        want = expected[done : done + n] if unit == length else pattern[:n]
        diff = first_difference(view, want)
        if diff is not None:
            return done + diff
        done += n
    return None


def _read_range(backend: BlockBackend, offset: int, length: int) -> None:
    """Read a range and throw the data away: a medium verification on a virtual disk."""
    buf = bytearray(min(CHUNK, length))
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        backend.read_into(offset + done, [memoryview(buf)[:n]])
        done += n


# --- VERIFY, WRITE AND VERIFY ------------------------------------------------------------


def _verify(
    lun: LunState, lba: int, blocks: int, data_out: Buffers, be: BlockBackend, *, flags: int
) -> Completion:
    reject_protect(flags)
    bytchk = (flags >> 1) & 0x03
    if bytchk == 2:
        raise invalid_field_in_cdb(1, 2, "BYTCHK 10b is reserved")
    check_range(lba, blocks, lun.num_blocks)
    if not blocks:
        return COMPLETED
    bs = lun.block_size
    length = blocks * bs
    if bytchk == 0:
        _read_range(be, lba * bs, length)
        return COMPLETED
    # BYTCHK 01b: the data-out holds the whole range; 11b: one block for every LBA.
    expected = _contiguous(_data_out(data_out, length if bytchk == 1 else bs), length)
    diff = _compare_range(be, lba * bs, expected, length)
    if diff is not None:
        raise miscompare(diff)
    return COMPLETED


def verify_10(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    return _verify(lun, lba, blocks, data_out, be, flags=flags)


def verify_12(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cdb)
    return _verify(lun, lba, blocks, data_out, be, flags=flags)


def verify_16(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    return _verify(lun, lba, blocks, data_out, be, flags=flags)


def _write_verify(
    lun: LunState,
    lba: int,
    blocks: int,
    data_out: Buffers,
    be: BlockBackend,
    *,
    flags: int,
) -> Completion:
    reject_protect(flags)
    bytchk = (flags >> 1) & 0x03
    if bytchk >= 2:
        raise invalid_field_in_cdb(1, 2, "BYTCHK must be 00b or 01b")
    # Verification is against the medium, so the write goes through the cache (FUA).
    _write(lun, lba, blocks, data_out, be, fua=FUA)
    if not blocks:
        return COMPLETED
    bs = lun.block_size
    length = blocks * bs
    if bytchk == 0:
        _read_range(be, lba * bs, length)
        return COMPLETED
    diff = _compare_range(be, lba * bs, _contiguous(_data_out(data_out, length), length), length)
    if diff is not None:
        raise miscompare(diff)
    return COMPLETED


def write_verify_10(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    return _write_verify(lun, lba, blocks, data_out, be, flags=flags)


def write_verify_12(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cdb)
    return _write_verify(lun, lba, blocks, data_out, be, flags=flags)


def write_verify_16(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    return _write_verify(lun, lba, blocks, data_out, be, flags=flags)


# --- WRITE SAME, UNMAP ---------------------------------------------------------------------


def _write_same(
    lun: LunState,
    cdb: bytes,
    data_out: Buffers,
    be: BlockBackend,
    *,
    lba: int,
    blocks: int,
    tl: int,
    unmap_allowed: bool,
) -> Completion:
    flags = cdb[1]
    reject_protect(flags)
    if flags & 0x06:
        raise invalid_field_in_cdb(1, 2, "PBDATA and LBDATA are not supported")
    if flags & 0x10:
        why = "ANCHOR needs UNMAP" if not flags & 0x08 else "anchored LBAs are not supported"
        raise invalid_field_in_cdb(1, 4, why)
    require_writable(lun)
    if not blocks:  # WSNZ=0: zero blocks means up to the end of the medium
        if lba > lun.num_blocks:
            raise lba_out_of_range(lba, 0)
        blocks = lun.num_blocks - lba
    if blocks > lun.max_write_same_length:
        raise invalid_field_in_cdb(tl, why="more than MAXIMUM WRITE SAME LENGTH")
    check_range(lba, blocks, lun.num_blocks)
    bs = lun.block_size
    ndob = cdb[0] == 0x93 and flags & 0x01
    block = bytes(bs) if ndob else _one_block(data_out, bs)
    if not blocks:
        return COMPLETED
    if flags & 0x08 and unmap_allowed:
        # SBC-4 table "ANCHOR bit, UNMAP bit and ANC_SUP bit": UNMAP=1 asks for
        # deallocation whatever the block holds; with LBPRZ the range then reads zeros.
        be.write_zeroes(lba * bs, blocks * bs, True)
        if not lun.write_cache_enabled:
            be.flush()
    else:
        _fill(lun, be, lba * bs, blocks * bs, block)
    return COMPLETED


def _one_block(data_out: Buffers, bs: int) -> bytes:
    if total_length(data_out) != bs:
        raise ScsiError(
            f"WRITE SAME needs exactly one {bs}-byte block of data-out",
            Sense(ILLEGAL_REQUEST, 0x24, 0x00),
        )
    return gather(data_out, bs)


def _fill(lun: LunState, be: BlockBackend, offset: int, length: int, block: bytes) -> None:
    """Write ``block`` over a range; a block of zeros becomes one mapped write_zeroes."""
    fua = not lun.write_cache_enabled
    if block.count(0) == len(block):
        be.write_zeroes(offset, length, False)
        if fua:
            be.flush()
        return
    per = max(1, CHUNK // len(block))
    chunk = memoryview(block * min(per, length // len(block)))
    done = 0
    while done < length:
        n = min(len(chunk), length - done)
        be.write_from(offset + done, [chunk[:n]], fua)
        done += n


def write_same_10(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    return _write_same(
        lun, cdb, data_out, be, lba=lba, blocks=blocks, tl=7, unmap_allowed=lun.lbpws10
    )


def write_same_16(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    return _write_same(
        lun, cdb, data_out, be, lba=lba, blocks=blocks, tl=10, unmap_allowed=lun.lbpws
    )


def unmap(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    if cdb[1] & 0x01:
        raise invalid_field_in_cdb(1, 0, "anchored LBAs are not supported")
    require_writable(lun)
    length = _U16.unpack_from(cdb, 7)[0]
    if not length:
        return COMPLETED
    data = gather(data_out, length)
    if len(data) < 8:
        raise parameter_list_length_error("an UNMAP parameter list has an 8-byte header")
    ranges = _unmap_ranges(lun, data)
    bs = lun.block_size
    for lba, blocks in ranges:
        be.write_zeroes(lba * bs, blocks * bs, True)
    if ranges and not lun.write_cache_enabled:
        be.flush()
    return COMPLETED


def _unmap_ranges(lun: LunState, data: bytes) -> list[tuple[int, int]]:
    """Validate every descriptor before unmapping anything (no partial UNMAP on error)."""
    # A descriptor length beyond the data, or not a multiple of 16, is truncated (SBC-4).
    count = min(_U16.unpack_from(data, 2)[0], len(data) - 8) // 16
    if count > lun.max_unmap_descriptors:
        raise invalid_field_in_parameter_list(
            2, why="more than MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT"
        )
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        pos = 8 + 16 * i
        lba, blocks = _UNMAP_DESC.unpack_from(data, pos)
        check_range(lba, blocks, lun.num_blocks)
        total += blocks
        if total > lun.max_unmap_lba_count:
            raise invalid_field_in_parameter_list(pos + 8, why="more than MAXIMUM UNMAP LBA COUNT")
        if blocks:
            ranges.append((lba, blocks))
    return ranges


# --- COMPARE AND WRITE, ORWRITE ------------------------------------------------------------


def compare_and_write(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, flags, lba, blocks, _, _ = _CAW.unpack_from(cdb)
    reject_protect(flags)
    require_writable(lun)
    if blocks > lun.max_compare_and_write_length:
        raise invalid_field_in_cdb(13, why="more than MAXIMUM COMPARE AND WRITE LENGTH")
    bs = lun.block_size
    half = blocks * bs
    if total_length(data_out) != 2 * half:
        raise invalid_field_in_cdb(13, why="data-out is not 2 x NUMBER OF LOGICAL BLOCKS")
    check_range(lba, blocks, lun.num_blocks)
    if not blocks:
        return COMPLETED
    data = _contiguous(data_out, 2 * half)
    diff = be.compare_and_write(lba * bs, data[:half], data[half:])
    if diff is not None:
        raise miscompare(diff)
    if flags & FUA or not lun.write_cache_enabled:
        be.flush()  # the backend's compare_and_write has no FUA of its own
    return COMPLETED


def orwrite_16(
    lun: LunState, cdb: bytes, data_out: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    """ORWRITE(16): OR the data-out into the medium, atomically.

    Built on compare_and_write: read, OR, then write only if nothing changed meanwhile;
    a concurrent write to the range makes it retry.
    """
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    reject_protect(flags)
    require_writable(lun)
    check_range(lba, blocks, lun.num_blocks)
    bs = lun.block_size
    length = blocks * bs
    mask = int.from_bytes(_contiguous(_data_out(data_out, length), length), "big")
    if not length:
        return COMPLETED
    old = bytearray(length)
    for _ in range(ORWRITE_RETRIES):
        be.read_into(lba * bs, [memoryview(old)])
        new = (int.from_bytes(old, "big") | mask).to_bytes(length, "big")
        if be.compare_and_write(lba * bs, memoryview(old), memoryview(new)) is None:
            break
    else:
        raise ScsiError("ORWRITE kept racing with other writes", Sense(ABORTED_COMMAND, 0, 0))
    if flags & FUA or not lun.write_cache_enabled:
        be.flush()
    return COMPLETED


# --- cache, capacity, provisioning status ------------------------------------------------


def synchronize_cache_10(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    check_range(lba, blocks, lun.num_blocks)
    be.flush()
    return COMPLETED


def synchronize_cache_16(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    check_range(lba, blocks, lun.num_blocks)
    be.flush()
    return COMPLETED


def pre_fetch_10(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    # There is no cache to load: GOOD (not CONDITION MET) says the blocks were not cached.
    _, _, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
    check_range(lba, blocks, lun.num_blocks)
    return COMPLETED


def pre_fetch_16(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    _, _, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    check_range(lba, blocks, lun.num_blocks)
    return COMPLETED


def read_capacity_10(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    # LBA and PMI are obsolete in SBC-4: ignored, as most targets do.
    last = min(lun.num_blocks - 1, 0xFFFFFFFF) if lun.num_blocks else 0
    return respond(struct.pack(">II", last, lun.block_size), 8, data_in)


def read_capacity_16(lun: LunState, cdb: bytes, data_in: Buffers) -> Completion:
    alloc = _U32.unpack_from(cdb, 10)[0]
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, max(lun.num_blocks - 1, 0), lun.block_size)
    data[13] = lun.physical_block_exponent & 0x0F
    data[14] = (0x80 if lun.lbpme else 0) | (0x40 if lun.lbprz else 0)
    return respond(data, alloc, data_in)


def get_lba_status(lun: LunState, cdb: bytes, data_in: Buffers, be: BlockBackend) -> Completion:
    start = struct.unpack_from(">Q", cdb, 2)[0]
    alloc = _U32.unpack_from(cdb, 10)[0]
    if cdb[14] & 0x07:
        raise invalid_field_in_cdb(14, 2, "only REPORT TYPE 0 (all LBAs) is supported")
    if start >= lun.num_blocks:
        raise lba_out_of_range(start, 1)
    descriptors = lba_status(lun, be, start, max(1, (alloc - 8) // 16))
    data = bytearray(8 + 16 * len(descriptors))
    _U32.pack_into(data, 0, 4 + 16 * len(descriptors))
    for i, (lba, blocks, mapped) in enumerate(descriptors):
        _LBA_STATUS.pack_into(data, 8 + 16 * i, lba, blocks, 0 if mapped else 1)
    return respond(data, alloc, data_in)


def lba_status(
    lun: LunState, be: BlockBackend, start: int, wanted: int
) -> list[tuple[int, int, bool]]:
    """Up to ``wanted`` (lba, blocks, mapped) runs from ``start`` on, merged and split at
    the 32-bit NUMBER OF LOGICAL BLOCKS limit.

    The backend is asked about a window that doubles until enough runs are known to be
    final, so a fragmented 64 TiB LUN costs a few calls, not one per segment.
    """
    bs = lun.block_size
    runs: list[tuple[int, int, bool]] = []
    pos, window = start, max(1, (64 << 20) // bs)
    while pos < lun.num_blocks and len(runs) <= wanted:
        end = min(lun.num_blocks, pos + window)
        for offset, length, mapped in be.mapped_ranges(pos * bs, (end - pos) * bs):
            _append_run(runs, offset // bs, -(-(offset + length) // bs), mapped)
        pos, window = end, window * 2
    return runs[:wanted]


def _append_run(runs: list[tuple[int, int, bool]], first: int, end: int, mapped: bool) -> None:
    if runs and runs[-1][2] == mapped and runs[-1][0] + runs[-1][1] == first:
        first = runs[-1][0]
        runs.pop()
    while end - first > 0xFFFFFFFF:
        runs.append((first, 0xFFFFFFFF, mapped))
        first += 0xFFFFFFFF
    if end > first:
        runs.append((first, end - first, mapped))


# --- the rest of SBC ----------------------------------------------------------------------


def start_stop_unit(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, be: BlockBackend
) -> Completion:
    """A virtual disk does not spin: START and power conditions are accepted as no-ops.

    STOP flushes the cache unless NO_FLUSH is set, as SBC-4 asks before stopping.
    """
    power_condition = cdb[4] >> 4
    if power_condition not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
        raise invalid_field_in_cdb(4, 7, "reserved POWER CONDITION")
    if power_condition == 0 and cdb[4] & 0x02:
        raise invalid_field_in_cdb(4, 1, "the medium is not removable (LOEJ)")
    if power_condition == 0 and not cdb[4] & 0x01 and not cdb[4] & 0x04:
        be.flush()
    return COMPLETED


def read_defect_data_10(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    """An empty list in whatever format was asked for: a virtual disk has no defects."""
    alloc = _U16.unpack_from(cdb, 7)[0]
    return respond(bytes((0, cdb[2] & 0x1F, 0, 0)), alloc, data_in)


def read_defect_data_12(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    alloc = _U32.unpack_from(cdb, 6)[0]
    return respond(bytes((0, cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0)), alloc, data_in)
