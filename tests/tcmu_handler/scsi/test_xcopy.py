"""EXTENDED COPY (LID1), RECEIVE COPY RESULTS and the Third-party Copy VPD page."""

import struct
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from targetvirt.errors import PoolFull
from tcmu_handler.scsi import lun as lunmod
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import xcopy

from .helpers import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    PARAMETER_LIST_LENGTH_ERROR,
    SOFTWARE_WRITE_PROTECTED,
    WRITE_PROTECTED,
    Device,
    Result,
)

NAA = bytes.fromhex("6001405dbe662833a579f441f33a7af6")  # naa_from_uuid(helpers.UUID)
OTHER_NAA = bytes.fromhex("6001405000000000000000000000000a")
TOO_MANY_TARGETS = (0x05, 0x26, 0x06)
UNSUPPORTED_TARGET = (0x05, 0x26, 0x07)
TOO_MANY_SEGMENTS = (0x05, 0x26, 0x08)
UNSUPPORTED_SEGMENT = (0x05, 0x26, 0x09)
INLINE_DATA_LENGTH_EXCEEDED = (0x05, 0x26, 0x0B)
OPERATION_IN_PROGRESS = (0x05, 0x00, 0x16)
NOT_REACHABLE = (0x0A, 0x0D, 0x02)
INCORRECT_DEVICE_TYPE = (0x0A, 0x0D, 0x03)
COPY_ABORTED = (0x0A, 0x00, 0x00)

# The literal command the rest of the file varies: list identifier 1 (LIST ID USAGE 00b,
# hold), one identification CSCD descriptor naming this LUN by its NAA, and one block to
# block segment copying 16 blocks from LBA 0 to LBA 256.
XCOPY_CDB = bytes.fromhex("83 00 0000 0000 0000 0000 004c 00 00")
PARAMETERS = bytes.fromhex(
    "01 00 0020 00000000 0000001c 00000000"  # header: CSCD list 32, segment list 28 bytes
    "e4 00 0000 01 03 00 10 6001405dbe662833a579f441f33a7af6 00000000 00 000200"
    "02 00 0018 0000 0000 0000 0010 0000000000000000 0000000000000100"
)
TARGET_AT, SEGMENT_AT = 16, 48  # offsets in the parameter list, for sense field pointers


@pytest.fixture
def dev() -> Device:
    return Device(num_blocks=4096)


def cdb(length: int, action: int = 0) -> bytes:
    return struct.pack(">BB8xIBB", 0x83, action, length, 0, 0)


def header(
    tdll: int, sdll: int, *, list_id: int = 1, usage: int = 0, inline: int = 0, flags: int = 0
) -> bytes:
    return struct.pack(">BBH4xII", list_id, flags | usage << 3, tdll, sdll, inline)


def target(
    designator: bytes = NAA,
    *,
    kind: int = 0xE4,
    byte1: int = 0,
    code_set: int = 0x01,
    designator_type: int = 0x03,
    block_length: int = 512,
) -> bytes:
    ident = bytes((code_set, designator_type, 0, len(designator))) + designator
    return bytes((kind, byte1, 0, 0)) + ident.ljust(24, b"\0") + block_length.to_bytes(4, "big")


def segment(
    blocks: int, src_lba: int, dst_lba: int, src: int = 0, dst: int = 0, *, kind: int = 0x02
) -> bytes:
    return struct.pack(">BBHHH2xHQQ", kind, 0, 0x18, src, dst, blocks, src_lba, dst_lba)


def plist(targets: list[bytes], segments: list[bytes], **kw: int) -> bytes:
    t, s = b"".join(targets), b"".join(segments)
    return header(len(t), len(s), **kw) + t + s


def run(dev: Device, params: bytes, *, length: int | None = None) -> Result:
    return dev.run(cdb(len(params) if length is None else length), params)


def fill(dev: Device, lba: int, blocks: int, seed: int) -> bytes:
    data = bytes((seed + i * 13) & 0xFF for i in range(blocks * dev.bs))
    dev.write(lba, data)
    return data


def status_of(dev: Device, list_id: int) -> Result:
    return dev.run(struct.pack(">BBB7xIBB", 0x84, 0x00, list_id, 64, 0, 0), in_len=64)


# --- EXTENDED COPY: the copy -----------------------------------------------------------------


def test_literal_copy_within_the_lun(dev: Device) -> None:
    data = fill(dev, 0, 16, 3)
    r = dev.run(XCOPY_CDB, PARAMETERS)
    assert r.good
    assert dev.read(256, 16) == data and dev.read(0, 16) == data


@pytest.mark.parametrize("block_size", [512, 4096])
def test_copy_with_several_segments_in_order(block_size: int) -> None:
    dev = Device(num_blocks=1024, block_size=block_size)
    a, b = fill(dev, 0, 8, 1), fill(dev, 100, 4, 2)
    params = plist(
        [target(block_length=block_size), target(block_length=block_size)],
        [segment(8, 0, 500, 0, 1), segment(4, 100, 504, 1, 0), segment(4, 500, 600, 1, 1)],
    )
    assert run(dev, params).good
    half = a[: 4 * block_size]  # the second segment overwrites the second half of the first
    assert dev.read(500, 8) == half + b and dev.read(600, 4) == half


def test_a_zero_block_segment_copies_nothing(dev: Device) -> None:
    assert run(dev, plist([target()], [segment(0, 4095, 4096)])).good
    assert dev.backend.mapped == bytearray(len(dev.backend.mapped))


def test_parameter_list_length_zero_is_not_an_error(dev: Device) -> None:
    r = dev.run(cdb(0))
    assert r.good and dev.lun.copy_status(1) is None


def test_no_segments_is_a_copy_of_nothing(dev: Device) -> None:
    assert run(dev, plist([target()], [])).good


@pytest.mark.parametrize(("src", "dst"), [(1000, 1100), (1100, 1000), (1000, 1000)])
def test_overlapping_ranges_copy_as_if_read_first(src: int, dst: int) -> None:
    dev = Device(num_blocks=8192)
    data = fill(dev, src, 3000, 9)  # 3000 blocks: more than one 1 MiB chunk
    assert run(dev, plist([target()], [segment(3000, src, dst)])).good
    assert dev.read(dst, 3000) == data


def test_segments_are_bounded_by_the_maximum_segment_length(dev: Device) -> None:
    dev.lun.max_copy_segment_bytes = 64 * 512
    assert run(dev, plist([target()], [segment(64, 0, 64)])).good
    r = run(dev, plist([target()], [segment(65, 0, 64)]))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.field_pointer == SEGMENT_AT + 10


def test_writes_honour_a_disabled_write_cache(dev: Device) -> None:
    dev.lun.write_cache_enabled = False
    assert dev.run(XCOPY_CDB, PARAMETERS).good
    assert dev.backend.fua_writes == 1


def test_a_longer_data_out_is_cut_to_the_parameter_list_length(dev: Device) -> None:
    assert dev.run(XCOPY_CDB, PARAMETERS + bytes(100)).good


def test_a_data_out_shorter_than_the_lists_is_a_length_error(dev: Device) -> None:
    r = dev.run(XCOPY_CDB, PARAMETERS[:-1])
    assert r.sense.triple == PARAMETER_LIST_LENGTH_ERROR


def test_lid4_is_not_supported(dev: Device) -> None:
    r = dev.run(cdb(len(PARAMETERS), action=0x01), PARAMETERS)
    assert r.sense.triple == INVALID_FIELD_IN_CDB
    assert r.sense.sks == bytes((0xCC, 0, 1))  # CDB byte 1, bit 4: the service action


def test_a_write_protected_lun_refuses_the_copy(dev: Device) -> None:
    dev.lun.read_only = True
    assert dev.run(XCOPY_CDB, PARAMETERS).sense.triple == WRITE_PROTECTED
    dev.lun.read_only, dev.lun.swp = False, True
    assert dev.run(XCOPY_CDB, PARAMETERS).sense.triple == SOFTWARE_WRITE_PROTECTED
    assert dev.lun.copy_status(1) is None


def test_a_backend_error_ends_the_copy_with_its_sense(dev: Device) -> None:
    params = plist([target()], [segment(4, 0, 100), segment(4, 0, 200)])
    dev.backend.fail_next(PoolFull("no free segment"))
    r = run(dev, params)
    assert r.sense.triple == (0x07, 0x27, 0x07)
    assert status_of(dev, 1).data == bytes.fromhex("00000008 02 0000 00 00000000")


# --- EXTENDED COPY: the parameter list header -------------------------------------------


def test_a_header_shorter_than_16_bytes(dev: Device) -> None:
    r = dev.run(cdb(15), PARAMETERS[:15])
    assert r.sense.triple == PARAMETER_LIST_LENGTH_ERROR


def test_reserved_list_id_usage(dev: Device) -> None:
    r = run(dev, plist([target()], [segment(1, 0, 1)], usage=0b01))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.sks == bytes((0x8C, 0, 1))  # parameter list byte 1, bit 4


def test_no_list_identifier_needs_list_identifier_zero(dev: Device) -> None:
    r = run(dev, plist([target()], [segment(1, 0, 1)], usage=0b11, list_id=3))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 0
    assert run(dev, plist([target()], [segment(1, 0, 1)], usage=0b11, list_id=0)).good
    assert dev.lun.copy_status(0) is None  # nothing to report without a list identifier


def test_str_and_priority_are_accepted(dev: Device) -> None:
    assert run(dev, plist([target()], [segment(1, 0, 1)], flags=0x27)).good


def test_descriptor_lists_longer_than_the_maximum(dev: Device) -> None:
    # 9 CSCD and 17 segment descriptors: over both counts, and over the length, which
    # is checked first (libiscsi's ExtendedCopy.DescrLimits).
    params = plist([target()] * 9, [segment(1, 0, 1)] * 17)
    assert run(dev, params).sense.triple == PARAMETER_LIST_LENGTH_ERROR


def test_inline_data_is_not_supported(dev: Device) -> None:
    t, s = target(), segment(1, 0, 1)
    params = header(32, 28, inline=4) + t + s + bytes(4)
    r = run(dev, params)
    assert r.sense.triple == INLINE_DATA_LENGTH_EXCEEDED and r.sense.field_pointer == 12


@pytest.mark.parametrize("cut", [1, 28, 29, 60])
def test_lists_cut_short_by_the_parameter_list_length(dev: Device, cut: int) -> None:
    r = dev.run(cdb(len(PARAMETERS) - cut), PARAMETERS[:-cut])
    assert r.sense.triple == PARAMETER_LIST_LENGTH_ERROR


# --- EXTENDED COPY: CSCD descriptors ----------------------------------------------------


def test_too_many_cscd_descriptors(dev: Device) -> None:
    assert run(dev, plist([target()] * 8, [segment(1, 0, 1)])).good
    r = run(dev, plist([target()] * 9, [segment(1, 0, 1)]))
    assert r.sense.triple == TOO_MANY_TARGETS and r.sense.field_pointer == 2


@pytest.mark.parametrize("kind", [0xE0, 0xE5, 0xEA, 0x02, 0xFF])
def test_unsupported_cscd_descriptor_types(dev: Device, kind: int) -> None:
    r = run(dev, plist([target(), target(kind=kind)], [segment(1, 0, 1)]))
    assert r.sense.triple == UNSUPPORTED_TARGET
    assert r.sense.sks == bytes((0x8F, 0, TARGET_AT + 32))  # the type code, bit 7


def test_a_cscd_list_that_ends_inside_a_descriptor(dev: Device) -> None:
    t = target()
    params = header(33, 28) + t + b"\xe4" + segment(1, 0, 1)
    r = run(dev, params)
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 2


def test_the_nul_bit_is_refused(dev: Device) -> None:
    r = run(dev, plist([target(byte1=0x20)], [segment(1, 0, 1)]))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.sks == bytes((0x8D, 0, TARGET_AT + 1))


def test_lu_id_type_is_ignored(dev: Device) -> None:
    assert run(dev, plist([target(byte1=0xC0)], [segment(1, 0, 1)])).good


def test_a_designator_longer_than_the_descriptor_holds(dev: Device) -> None:
    t = bytearray(target())
    t[7] = 21
    r = run(dev, plist([bytes(t)], [segment(1, 0, 1)]))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.field_pointer == TARGET_AT + 7


def test_a_short_t10_vendor_designator_names_the_lun() -> None:
    dev = Device(num_blocks=64)
    dev.lun.serial = "abc"
    t10 = target(b"TGTVIRT abc", code_set=0x02, designator_type=0x01)
    assert run(dev, plist([t10], [segment(1, 0, 1)])).good


@pytest.mark.parametrize(
    "other",
    [
        target(OTHER_NAA),
        target(NAA, code_set=0x02),  # the right bytes, but ASCII
        target(NAA, designator_type=0x13),  # target port association
        target(NAA[:8]),
    ],
)
def test_any_other_logical_unit_is_not_reachable(dev: Device, other: bytes) -> None:
    fill(dev, 0, 1, 5)
    r = run(dev, plist([target(), other], [segment(1, 0, 1, 0, 1)]))
    assert r.sense.triple == NOT_REACHABLE
    assert r.sense.sks == bytes((0x80, 0, SEGMENT_AT + 32 + 6))  # DESTINATION CSCD ID
    assert dev.read(1, 1) == bytes(512)


def test_an_unreferenced_other_cscd_descriptor_is_harmless(dev: Device) -> None:
    assert run(dev, plist([target(), target(OTHER_NAA)], [segment(1, 0, 1)])).good


def test_a_cscd_index_past_the_list(dev: Device) -> None:
    r = run(dev, plist([target()], [segment(1, 0, 1, 1, 0)]))
    assert r.sense.triple == NOT_REACHABLE
    assert r.sense.field_pointer == SEGMENT_AT + 4  # SOURCE CSCD ID


def test_the_cscd_must_be_a_block_device(dev: Device) -> None:
    r = run(dev, plist([target(byte1=0x01)], [segment(1, 0, 1)]))
    assert r.sense.triple == INCORRECT_DEVICE_TYPE


@pytest.mark.parametrize(("length", "good"), [(512, True), (0, True), (4096, False)])
def test_disk_block_length(dev: Device, length: int, good: bool) -> None:
    r = run(dev, plist([target(block_length=length)], [segment(1, 0, 1)]))
    assert r.good is good
    if not good:
        assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
        assert r.sense.field_pointer == TARGET_AT + 29


# --- EXTENDED COPY: segment descriptors ---------------------------------------------------


def test_too_many_segment_descriptors(dev: Device) -> None:
    assert run(dev, plist([target()], [segment(1, 0, 1)] * 16)).good
    r = run(dev, plist([target()], [segment(1, 0, 1)] * 17))
    assert r.sense.triple == TOO_MANY_SEGMENTS and r.sense.field_pointer == 8


@pytest.mark.parametrize("kind", [0x00, 0x01, 0x03, 0x0A, 0xBE])
def test_unsupported_segment_descriptor_types(dev: Device, kind: int) -> None:
    r = run(dev, plist([target()], [segment(1, 0, 1), segment(1, 0, 1, kind=kind)]))
    assert r.sense.triple == UNSUPPORTED_SEGMENT
    assert r.sense.field_pointer == SEGMENT_AT + 28


def test_a_block_to_block_descriptor_has_length_0018h(dev: Device) -> None:
    s = bytearray(segment(1, 0, 1))
    s[3] = 0x14
    r = run(dev, plist([target()], [bytes(s)]))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.field_pointer == SEGMENT_AT + 2


def test_a_segment_list_that_ends_inside_a_descriptor(dev: Device) -> None:
    s = segment(1, 0, 1)
    r = run(dev, header(32, 40) + target() + s + s[:12])
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 8


@pytest.mark.parametrize(
    ("src", "dst", "field"), [(4095, 0, 12), (0, 4095, 20), (2**64 - 1, 0, 12), (0, 4096, 20)]
)
def test_segments_outside_the_lun_abort_the_copy_before_it_starts(
    dev: Device, src: int, dst: int, field: int
) -> None:
    fill(dev, 0, 2, 7)
    r = run(dev, plist([target()], [segment(2, 0, 10), segment(2, src, dst)]))
    assert r.sense.triple == COPY_ABORTED
    assert r.sense.sks == bytes((0x80, 0, SEGMENT_AT + 28 + field))
    assert dev.read(10, 2) == bytes(1024)  # the first, valid, segment was not copied either


# --- list identifiers and COPY STATUS ---------------------------------------------------


def test_copy_status_of_a_held_copy(dev: Device) -> None:
    assert dev.run(XCOPY_CDB, PARAMETERS).good
    r = status_of(dev, 1)
    assert r.good and r.completion.read_len == 12
    # AVAILABLE DATA 8, completed without errors, 1 segment, 8192 bytes
    assert r.data == bytes.fromhex("00000008 01 0001 00 00002000")


def test_copy_status_with_list_id_usage_discard(dev: Device) -> None:
    assert run(dev, plist([target()], [segment(2, 0, 8)] * 3, usage=0b10, list_id=9)).good
    assert status_of(dev, 9).data == bytes.fromhex("00000008 01 0003 00 00000c00")


def test_copy_status_of_an_unknown_list_identifier(dev: Device) -> None:
    r = status_of(dev, 1)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 2


def test_a_refused_copy_leaves_no_status_and_drops_the_old_one(dev: Device) -> None:
    assert dev.run(XCOPY_CDB, PARAMETERS).good
    assert run(dev, plist([target()], [segment(2, 4095, 0)])).sense.triple == COPY_ABORTED
    assert status_of(dev, 1).sense.triple == INVALID_FIELD_IN_CDB


def test_a_list_identifier_in_use_is_refused(dev: Device) -> None:
    running = dev.lun.begin_copy(1)
    assert running is not None
    r = dev.run(XCOPY_CDB, PARAMETERS)
    assert r.sense.triple == OPERATION_IN_PROGRESS and r.sense.field_pointer == 0
    assert status_of(dev, 1).data[4] == 0x00  # still reported as running
    running.done = True
    assert dev.run(XCOPY_CDB, PARAMETERS).good


def test_only_the_newest_statuses_are_held(dev: Device) -> None:
    for list_id in range(lunmod.HELD_COPY_STATUSES + 4):
        assert run(dev, plist([target()], [segment(1, 0, 1)], list_id=list_id)).good
    assert status_of(dev, 3).sense.triple == INVALID_FIELD_IN_CDB
    assert status_of(dev, 4).good


def test_transfer_count_units_grow_past_32_bits() -> None:
    status = lunmod.CopyStatus(done=True, segments=70000, transferred=5 << 32)
    assert xcopy.copy_status(status) == bytes.fromhex("00000008 01 ffff 01 01400000")


# --- RECEIVE COPY RESULTS: OPERATING PARAMETERS -----------------------------------------


def rcr(action: int, alloc: int = 1024, list_id: int = 0) -> bytes:
    return struct.pack(">BBB7xIBB", 0x84, action, list_id, alloc, 0, 0)


def test_operating_parameters_literal(dev: Device) -> None:
    r = dev.run(rcr(0x03), in_len=1024)
    assert r.good and r.completion.read_len == 46
    assert r.data == bytes.fromhex(
        "0000002a 01 000000"  # AVAILABLE DATA, SNLID
        "0008 0010 000002c0"  # CSCD and segment descriptor counts, descriptor list length
        "01000000 00000000 00000000 00000000"  # segment length, inline, held, stream
        "0000 0001 01 09 00 00 000000"  # concurrent copies, granularities (512: 2^9)
        "02 02e4"  # implemented descriptor type codes
    )


def test_operating_parameters_follow_the_lun(dev: Device) -> None:
    lun = Device(num_blocks=64, block_size=4096).lun
    lun.max_copy_targets, lun.max_copy_segments = 2, 1
    data = xcopy.operating_parameters(lun)
    assert struct.unpack(">HHI", data[8:16]) == (2, 1, 2 * 32 + 28)
    assert data[37] == 12


def test_operating_parameters_allocation_length(dev: Device) -> None:
    r = dev.run(rcr(0x03, alloc=10), in_len=1024)
    assert r.good and r.completion.read_len == 10 and r.data[:4] == bytes.fromhex("0000002a")


@pytest.mark.parametrize("action", [0x01, 0x04, 0x05, 0x1F])
def test_other_receive_copy_results_actions(dev: Device, action: int) -> None:
    r = dev.run(rcr(action), in_len=1024)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xCC, 0, 1))


# --- discovery: INQUIRY, the VPD page, REPORT SUPPORTED OPERATION CODES --------------------


def test_third_party_copy_vpd_page_literal(dev: Device) -> None:
    r = dev.run([0x12, 1, 0x8F, 0, 255, 0], in_len=255)
    assert r.good
    zeros = "00000000"
    assert r.data == bytes.fromhex(
        "00 8f 0060"
        "0001 0008 07 83 01 00 84 02 00 03"  # supported commands
        f"0004 001c {zeros} 0008 0010 000002c0 {zeros} {zeros * 3}"  # parameter data
        "0008 0004 02 02 e4 00"  # supported descriptors
        "000c 0004 0000 0000"  # supported CSCD descriptor IDs: none
        f"8001 0020 00000001 00000001 01000000 09 00 {zeros * 4} 0000"  # general copy ops
    )


def test_rsoc_lists_both_commands(dev: Device) -> None:
    r = dev.run(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x83, 0x00, 512, 0, 0), in_len=512)
    assert r.data == bytes.fromhex("00030010 83 1f 0000000000000000 ffffffff 00 00")
    for action in (0x00, 0x03):
        rsoc = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x02, 0x84, action, 512, 0, 0)
        assert dev.run(rsoc, in_len=512).data[:6] == bytes.fromhex("00030010 84 1f")
    assert op.lookup(0x84, 0x01) is None


# --- property tests -----------------------------------------------------------------------

BLOCKS = 64
segments_strategy = st.lists(
    st.tuples(st.integers(0, 24), st.integers(0, BLOCKS - 1), st.integers(0, BLOCKS - 1)).map(
        lambda t: (t[0], min(t[1], BLOCKS - t[0]), min(t[2], BLOCKS - t[0]))
    ),
    max_size=16,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=segments_strategy,
    block_size=st.sampled_from([512, 4096]),
    chunk_blocks=st.sampled_from([1, 3, 64]),
    two_targets=st.booleans(),
)
def test_random_segment_lists_copy_like_a_bytearray(
    segments: list[tuple[int, int, int]], block_size: int, chunk_blocks: int, two_targets: bool
) -> None:
    dev = Device(num_blocks=BLOCKS, block_size=block_size)
    model = bytearray(bytes((i * 31 + i // block_size) & 0xFF for i in range(BLOCKS * block_size)))
    dev.write(0, bytes(model))
    targets = [target(block_length=block_size)] * (2 if two_targets else 1)
    descriptors = [
        segment(n, src, dst, i % len(targets), (i + 1) % len(targets))
        for i, (n, src, dst) in enumerate(segments)
    ]
    with mock.patch.object(xcopy, "CHUNK", chunk_blocks * block_size):  # many pieces
        assert run(dev, plist(targets, descriptors)).good
    for n, src, dst in segments:
        model[dst * block_size : (dst + n) * block_size] = model[
            src * block_size : (src + n) * block_size
        ]
    assert dev.read(0, BLOCKS) == model


# Each corruption of a valid list and the sense it must get. None as the field pointer:
# not checked (the sense has none).
CORRUPTIONS: dict[str, tuple[tuple[int, int, int], int | None]] = {
    "usage 01b": (INVALID_FIELD_IN_PARAMETER_LIST, 1),
    "list too long": (PARAMETER_LIST_LENGTH_ERROR, None),
    "inline data": (INLINE_DATA_LENGTH_EXCEEDED, 12),
    "truncated": (PARAMETER_LIST_LENGTH_ERROR, None),
    "target type": (UNSUPPORTED_TARGET, TARGET_AT),
    "segment type": (UNSUPPORTED_SEGMENT, None),
    "segment length": (INVALID_FIELD_IN_PARAMETER_LIST, None),
    "other lun": (NOT_REACHABLE, None),
    "index": (NOT_REACHABLE, None),
    "beyond the end": (COPY_ABORTED, None),
    "too many targets": (TOO_MANY_TARGETS, 2),
    "too many segments": (TOO_MANY_SEGMENTS, 8),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=segments_strategy.filter(bool),
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
    victim=st.integers(0, 15),
)
@example(segments=[(0, 0, 0)] * 15, corruption="too many targets", victim=0)
def test_bad_parameter_lists_get_the_right_sense_and_copy_nothing(
    segments: list[tuple[int, int, int]], corruption: str, victim: int
) -> None:
    dev = Device(num_blocks=BLOCKS)
    before = bytes((i * 7) & 0xFF for i in range(BLOCKS * 512))
    dev.write(0, before)
    targets = [target()]
    descriptors = [segment(n, src, dst) for n, src, dst in segments]
    k = victim % len(descriptors)
    kw: dict[str, int] = {}
    if corruption == "target type":
        targets = [target(kind=0xE5)]
    elif corruption == "other lun":
        targets = [target(OTHER_NAA)]
    elif corruption == "segment type":
        descriptors[k] = bytes((0x03,)) + descriptors[k][1:]
    elif corruption == "segment length":
        descriptors[k] = descriptors[k][:3] + b"\x19" + descriptors[k][4:]
    elif corruption == "index":
        descriptors[k] = segment(*segments[k], src=0, dst=1)
    elif corruption == "beyond the end":
        n, src, _ = segments[k]
        descriptors[k] = segment(n, src, BLOCKS - n + 1)
    elif corruption == "too many targets":
        targets = [target()] * 9
        # the 9th target descriptor (32 bytes) takes the room of more than one segment
        # descriptor (28): with 15 or 16 segments the lists exceed MAXIMUM DESCRIPTOR LIST
        # LENGTH, and that error (the header's, checked first) is the right answer then
        descriptors = descriptors[:14]
    elif corruption == "too many segments":
        descriptors = (descriptors * 17)[:17]
    elif corruption == "usage 01b":
        kw["usage"] = 0b01
    elif corruption == "inline data":
        kw["inline"] = 1
    params = plist(targets, descriptors, **kw)
    if corruption == "list too long":
        params = plist(targets * 8, descriptors * 17)
    if corruption == "truncated":
        params = params[: len(params) - 1 - victim]
    r = run(dev, params)
    sense, pointer = CORRUPTIONS[corruption]
    assert r.status == 2 and r.sense.triple == sense, corruption
    if pointer is not None:
        assert r.sense.field_pointer == pointer
    assert dev.read(0, BLOCKS) == before
    assert dev.lun.copy_status(1) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tdll=st.sampled_from([0, 31, 32, 33, 64, 256, 288]),
    sdll=st.sampled_from([0, 4, 27, 28, 56, 448, 476]),
    body=st.binary(max_size=800),
    seed=st.lists(st.tuples(st.integers(0, 799), st.sampled_from([0x02, 0xE4, 0x18])), max_size=8),
    usage=st.integers(0, 3),
)
def test_arbitrary_descriptor_bytes_never_crash_the_copy_manager(
    tdll: int, sdll: int, body: bytes, seed: list[tuple[int, int]], usage: int
) -> None:
    dev = Device(num_blocks=BLOCKS)
    data = bytearray(body)
    for pos, value in seed:  # plant type codes and lengths where parsing looks for them
        if pos < len(data):
            data[pos] = value
    params = header(tdll, sdll, usage=usage, list_id=0 if usage == 3 else 1) + bytes(data)
    r = run(dev, params)
    assert r.status in (0, 2)
    if r.status == 2:
        assert r.sense.triple != (0x04, 0x44, 0x00)
        assert dev.lun.copy_status(1) is None  # refused copies leave nothing behind
