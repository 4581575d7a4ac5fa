import struct

import pytest

from .helpers import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    PARAMETER_LIST_LENGTH_ERROR,
    SOFTWARE_WRITE_PROTECTED,
    WRITE_PROTECTED,
    Device,
    cdb10,
    parse_sense,
)

RW_RECOVERY = bytes((0x01, 0x0A)) + bytes(10)
CACHING_WCE = bytes((0x08, 0x12, 0x04)) + bytes(17)
CONTROL = bytes.fromhex("0a0a02100040 0000ffff0000".replace(" ", ""))
IEC = bytes((0x1C, 0x0A, 0x08)) + bytes(9)
ALL_PAGES = RW_RECOVERY + CACHING_WCE + CONTROL + IEC


@pytest.fixture
def dev() -> Device:
    return Device(num_blocks=4096)


def sense6(dbd: int = 0, pc: int = 0, page: int = 0x3F, sub: int = 0, alloc: int = 255) -> bytes:
    return bytes((0x1A, dbd << 3, pc << 6 | page, sub, alloc, 0))


def sense10(
    dbd: int = 0, llbaa: int = 0, pc: int = 0, page: int = 0x3F, sub: int = 0, alloc: int = 512
) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, llbaa << 4 | dbd << 3, pc << 6 | page, sub, alloc, 0)


def test_mode_sense6_all_pages_with_block_descriptor(dev: Device) -> None:
    r = dev.run(sense6(), in_len=255)
    bd = struct.pack(">IxBH", 4096, 0, 512)
    assert r.data == bytes((4 + 8 + len(ALL_PAGES) - 1, 0, 0x10, 8)) + bd + ALL_PAGES
    assert r.completion.read_len == 68  # underflow residual, no stale bytes


def test_mode_sense6_dbd(dev: Device) -> None:
    r = dev.run(sense6(dbd=1), in_len=255)
    assert r.data == bytes((3 + len(ALL_PAGES), 0, 0x10, 0)) + ALL_PAGES


def test_mode_sense6_residual_on_tiny_allocation(dev: Device) -> None:
    r = dev.run(sense6(alloc=4), in_len=4)
    assert r.good and r.data == bytes((67, 0, 0x10, 8))


def test_mode_sense_one_page_equals_its_copy_in_all_pages(dev: Device) -> None:
    r = dev.run(sense6(dbd=1, page=0x0A), in_len=255)
    assert r.data == bytes((3 + 12, 0, 0x10, 0)) + CONTROL
    r = dev.run(sense6(dbd=1, page=0x08, sub=0xFF), in_len=255)
    assert r.data[4:] == CACHING_WCE


def test_mode_sense_changeable_values(dev: Device) -> None:
    r = dev.run(sense6(dbd=1, pc=1), in_len=255)
    pages = r.data[4:]
    assert pages[12:32] == bytes((0x08, 0x12, 0x04)) + bytes(17)  # WCE
    assert pages[32:44] == bytes((0x0A, 0x0A, 0x04, 0, 0x08)) + bytes(7)  # D_SENSE, SWP
    assert pages[:12] == RW_RECOVERY and pages[44:] == bytes((0x1C, 0x0A)) + bytes(10)


def test_mode_sense_changeable_block_descriptor_is_zero(dev: Device) -> None:
    r = dev.run(sense6(pc=1, page=0x01), in_len=255)
    assert r.data[4:12] == bytes(8)


def test_mode_sense_default_values_follow_the_configured_wce(dev: Device) -> None:
    dev.lun.write_cache_enabled = False
    r = dev.run(sense6(dbd=1, pc=2, page=0x08), in_len=255)
    assert r.data[6] == 0x04  # default WCE stays what the LUN was created with
    r = dev.run(sense6(dbd=1, pc=0, page=0x08), in_len=255)
    assert r.data[6] == 0x00


def test_mode_sense_saved_values_are_not_supported(dev: Device) -> None:
    r = dev.run(sense6(pc=3), in_len=255)
    assert r.sense.triple == (0x05, 0x39, 0x00) and r.sense.sks == bytes((0xCF, 0, 2))


@pytest.mark.parametrize(("page", "sub", "byte"), [(0x02, 0, 2), (0x0A, 0x01, 3), (0x3F, 0x05, 3)])
def test_mode_sense_unknown_page_or_subpage(dev: Device, page: int, sub: int, byte: int) -> None:
    r = dev.run(sense6(page=page, sub=sub), in_len=255)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == byte


def test_mode_sense_wp_bit_when_write_protected(dev: Device) -> None:
    dev.lun.read_only = True
    assert dev.run(sense6(), in_len=255).data[2] == 0x90


def test_mode_sense10_with_long_lba_descriptor(dev: Device) -> None:
    r = dev.run(sense10(llbaa=1, page=0x1C), in_len=512)
    bd = struct.pack(">Q4xI", 4096, 512)
    assert r.data == struct.pack(">HBBBxH", 6 + 16 + 12, 0, 0x10, 1, 16) + bd + IEC


def test_mode_sense10_short_descriptor_and_dbd(dev: Device) -> None:
    assert dev.run(sense10(page=0x1C), in_len=512).data[:8] == struct.pack(
        ">HBBBxH", 6 + 8 + 12, 0, 0x10, 0, 8
    )
    assert dev.run(sense10(dbd=1, page=0x1C), in_len=512).data[8:] == IEC


def test_mode_sense_block_descriptor_of_a_huge_lun(dev: Device) -> None:
    dev.lun.num_blocks = 1 << 33
    assert dev.run(sense6(page=0x01), in_len=255).data[4:8] == b"\xff\xff\xff\xff"


# --- MODE SELECT -------------------------------------------------------------------------------


def select6(params: bytes, pf: int = 1, sp: int = 0) -> tuple[bytes, bytes]:
    return bytes((0x15, pf << 4 | sp, 0, 0, len(params), 0)), params


def select10(params: bytes, pf: int = 1) -> tuple[bytes, bytes]:
    return struct.pack(">BB5xHB", 0x55, pf << 4, len(params), 0), params


def caching(wce: bool) -> bytes:
    return bytes((0x08, 0x12, 0x04 if wce else 0)) + bytes(17)


def test_mode_select_turns_the_write_cache_off_and_flushes(dev: Device) -> None:
    cdb, params = select6(bytes(4) + caching(False))
    assert dev.run(cdb, params).good
    assert not dev.lun.write_cache_enabled
    assert dev.backend.flushes == 1
    assert dev.lun.pending_unit_attentions == ()  # the initiator that changed it knows
    dev.run(cdb10(0x2A, 0, 1), b"x" * 512)
    assert dev.backend.fua_writes == 1  # write-through from now on


def test_mode_select10_with_block_descriptor(dev: Device) -> None:
    bd = struct.pack(">IxBH", 4096, 0, 512)
    cdb, params = select10(struct.pack(">HBBBxH", 0, 0, 0, 0, 8) + bd + caching(False))
    assert dev.run(cdb, params).good
    assert not dev.lun.write_cache_enabled


def test_mode_select_sets_swp_then_writes_are_refused(dev: Device) -> None:
    control = bytearray(CONTROL)
    control[4] |= 0x08
    assert dev.run(*select6(bytes(4) + bytes(control))).good
    assert dev.lun.swp
    r = dev.run(cdb10(0x2A, 0, 1), b"x" * 512)
    assert r.sense.triple == SOFTWARE_WRITE_PROTECTED
    assert dev.run(sense6(), in_len=255).data[2] & 0x80
    dev.lun.read_only = True
    assert dev.run(cdb10(0x2A, 0, 1), b"x" * 512).sense.triple == WRITE_PROTECTED


def test_mode_select_d_sense_switches_to_descriptor_sense(dev: Device) -> None:
    control = bytearray(CONTROL)
    control[2] |= 0x04
    assert dev.run(*select6(bytes(4) + bytes(control))).good
    r = dev.run(cdb10(0x28, 1 << 20, 1), in_len=512)
    assert r.completion.sense[0] == 0x72
    assert parse_sense(r.completion.sense).triple == (0x05, 0x21, 0x00)


def test_mode_select_refuses_unchangeable_bits_and_applies_nothing(dev: Device) -> None:
    control = bytearray(CONTROL)
    control[3] = 0x00  # QAM is not changeable
    params = bytes(4) + caching(False) + bytes(control)
    r = dev.run(*select6(params))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST
    assert r.sense.sks == bytes((0x8C, 0, 4 + 20 + 3))  # parameter list byte 27, bit 4
    assert dev.lun.write_cache_enabled  # the caching page was fine, but not applied


def test_mode_select_wrong_page_length(dev: Device) -> None:
    page = bytes((0x08, 0x10)) + bytes(16)
    r = dev.run(*select6(bytes(4) + page))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 5


def test_mode_select_unknown_page(dev: Device) -> None:
    r = dev.run(*select6(bytes(4) + bytes((0x02, 0x0E)) + bytes(14)))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 4


def test_mode_select_truncated_page(dev: Device) -> None:
    r = dev.run(*select6(bytes(4) + caching(True)[:10]))
    assert r.sense.triple == PARAMETER_LIST_LENGTH_ERROR


def test_mode_select_cannot_change_the_block_size(dev: Device) -> None:
    bd = struct.pack(">IxBH", 0, 0, 4096)
    r = dev.run(*select6(bytes((0, 0, 0, 8)) + bd))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 9


def test_mode_select_cannot_change_the_capacity(dev: Device) -> None:
    bd = struct.pack(">IxBH", 77, 0, 512)
    assert dev.run(*select6(bytes((0, 0, 0, 8)) + bd)).sense.field_pointer == 4


def test_mode_select_save_pages_is_refused(dev: Device) -> None:
    r = dev.run(*select6(bytes(4) + caching(True), sp=1))
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xC8, 0, 1))


def test_mode_select_needs_page_format(dev: Device) -> None:
    assert dev.run(*select6(bytes(4) + caching(True), pf=0)).sense.triple == INVALID_FIELD_IN_CDB


def test_mode_select_empty_list_is_a_no_op(dev: Device) -> None:
    assert dev.run(bytes((0x15, 0x10, 0, 0, 0, 0))).good


def test_mode_select_short_data_out(dev: Device) -> None:
    r = dev.run(bytes((0x15, 0x10, 0, 0, 24, 0)), bytes(4) + caching(True)[:4])
    assert r.sense.triple == PARAMETER_LIST_LENGTH_ERROR


def test_mode_select_medium_type_must_be_zero(dev: Device) -> None:
    r = dev.run(*select6(bytes((0, 1, 0, 0)) + caching(True)))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 1


def test_mode_select_subpage_format_is_refused(dev: Device) -> None:
    r = dev.run(*select6(bytes(4) + bytes((0x48, 0x01, 0x00, 0x10)) + bytes(16)))
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST


def test_mode_select_ignores_the_ps_bit(dev: Device) -> None:
    page = bytearray(caching(False))
    page[0] |= 0x80
    assert dev.run(*select6(bytes(4) + bytes(page))).good
