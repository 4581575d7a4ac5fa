import struct
from collections.abc import Sequence

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from targetvirt.errors import ContainerIOError, LeaseExpired, PoolFull
from tcmu_handler.scsi import LunState, handle
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.common import COMPLETED
from tcmu_handler.scsi.sbc import FUA, plain_transfer

from .helpers import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_INFORMATION_UNIT,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    MISCOMPARE,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    Device,
    caw,
    cdb10,
    cdb12,
    cdb16,
    unmap_cdb,
    unmap_list,
)

N = 8192  # blocks; 4 MiB at 512 (two 2048-block segments... four), 32 MiB at 4096


@pytest.fixture(params=[512, 4096])
def dev(request: pytest.FixtureRequest) -> Device:
    return Device(num_blocks=N, block_size=request.param)


def read_cdb(size: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if size == 6:
        return bytes((0x08, lba >> 16 & 0x1F, lba >> 8 & 0xFF, lba & 0xFF, blocks & 0xFF, 0))
    return {10: cdb10, 12: cdb12, 16: cdb16}[size](
        {10: 0x28, 12: 0xA8, 16: 0x88}[size], lba, blocks, flags
    )


def write_cdb(size: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if size == 6:
        return bytes((0x0A, lba >> 16 & 0x1F, lba >> 8 & 0xFF, lba & 0xFF, blocks & 0xFF, 0))
    return {10: cdb10, 12: cdb12, 16: cdb16}[size](
        {10: 0x2A, 12: 0xAA, 16: 0x8A}[size], lba, blocks, flags
    )


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# --- READ / WRITE ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_back(dev: Device, size: int) -> None:
    data = pattern(3 * dev.bs, size)
    assert dev.run(write_cdb(size, 5, 3), data).good
    r = dev.run(read_cdb(size, 5, 3), in_len=3 * dev.bs)
    assert r.good and r.completion.read_len is None and r.data == data


def test_read_of_never_written_blocks_is_zeros_in_every_iovec(dev: Device) -> None:
    r = dev.run(cdb10(0x28, 100, 4), in_len=4 * dev.bs, split=dev.bs // 2)
    assert r.good and r.raw == bytes(4 * dev.bs)


def test_scattered_iovecs_both_ways(dev: Device) -> None:
    data = pattern(4 * dev.bs)
    assert dev.run(cdb16(0x8A, 9, 4), data, split=333).good
    assert dev.run(cdb16(0x88, 9, 4), in_len=4 * dev.bs, split=1000).data == data


def test_read6_and_write6_zero_means_256_blocks(dev: Device) -> None:
    data = pattern(256 * dev.bs)
    assert dev.run(write_cdb(6, 0, 0), data).good
    assert dev.run(read_cdb(6, 0, 0), in_len=256 * dev.bs).data == data


@pytest.mark.parametrize("size", [10, 12, 16])
def test_zero_blocks_is_good_and_transfers_nothing(dev: Device, size: int) -> None:
    assert dev.run(write_cdb(size, 0, 0)).good
    r = dev.run(read_cdb(size, 0, 0), in_len=dev.bs)
    assert r.good and r.completion.read_len == 0


@pytest.mark.parametrize("size", [10, 16])
@pytest.mark.parametrize(
    ("lba", "blocks"),
    [(N, 1), (N - 1, 2), (N + 1, 0), (0x80000000, 1), (0xFFFFFFFF, 1), (N - 256 + 1, 256)],
)
def test_lba_out_of_range(dev: Device, size: int, lba: int, blocks: int) -> None:
    r = dev.run(read_cdb(size, lba, blocks), in_len=blocks * dev.bs)
    assert r.status == 2 and r.sense.triple == LBA_OUT_OF_RANGE and r.completion.read_len == 0
    assert (
        dev.run(write_cdb(size, lba, blocks), bytes(blocks * dev.bs)).sense.triple
        == LBA_OUT_OF_RANGE
    )


def test_64_bit_lba_wrap_around_is_out_of_range(dev: Device) -> None:
    r = dev.run(cdb16(0x88, 2**64 - 1, 2), in_len=2 * dev.bs)
    assert r.sense.triple == LBA_OUT_OF_RANGE


def test_last_blocks_are_reachable(dev: Device) -> None:
    dev.write(N - 2, pattern(2 * dev.bs))
    assert dev.read(N - 2, 2) == pattern(2 * dev.bs)


@pytest.mark.parametrize("protect", range(1, 8))
@pytest.mark.parametrize(("op", "size"), [(0x28, 10), (0xA8, 12), (0x88, 16)])
def test_rdprotect_is_refused(dev: Device, protect: int, op: int, size: int) -> None:
    r = dev.run(read_cdb(size, 0, 1, protect << 5), in_len=dev.bs)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xCF, 0, 1))


@pytest.mark.parametrize("protect", range(1, 8))
def test_wrprotect_is_refused(dev: Device, protect: int) -> None:
    r = dev.run(write_cdb(10, 0, 1, protect << 5), bytes(dev.bs))
    assert r.sense.triple == INVALID_FIELD_IN_CDB


@pytest.mark.parametrize("flags", [0x10, 0x08, 0x18, 0x02, 0x04])
def test_dpo_fua_and_obsolete_bits_are_accepted(dev: Device, flags: int) -> None:
    assert dev.run(write_cdb(16, 0, 1, flags), bytes(dev.bs)).good
    assert dev.run(read_cdb(16, 0, 1, flags), in_len=dev.bs).good


def test_fua_reaches_the_backend(dev: Device) -> None:
    dev.run(write_cdb(10, 0, 1, 0x08), bytes(dev.bs))
    dev.run(write_cdb(10, 0, 1), bytes(dev.bs))
    assert dev.backend.fua_writes == 1


def test_write_through_when_the_cache_is_off(dev: Device) -> None:
    dev.lun.write_cache_enabled = False
    dev.run(write_cdb(10, 0, 1), bytes(dev.bs))
    assert dev.backend.fua_writes == 1


def test_read_into_a_larger_buffer_reports_an_underflow(dev: Device) -> None:
    dev.write(0, pattern(dev.bs))
    r = dev.run(cdb10(0x28, 0, 1), in_len=10000)
    assert r.good and r.completion.read_len == dev.bs and r.data == pattern(dev.bs)
    assert r.raw[dev.bs :] == bytes([0xA5]) * (10000 - dev.bs)  # never touched


@pytest.mark.parametrize("have", [0, 200, 1])
def test_read_into_a_smaller_buffer_fills_what_fits(dev: Device, have: int) -> None:
    dev.write(0, pattern(2 * dev.bs))
    r = dev.run(cdb10(0x28, 0, 2), in_len=have)
    assert r.good and r.data == pattern(2 * dev.bs)[:have]


def test_write_with_more_data_out_writes_what_the_cdb_says(dev: Device) -> None:
    dev.write(0, b"a" * 2 * dev.bs)
    assert dev.run(cdb10(0x2A, 0, 1), b"b" * 2 * dev.bs).good
    assert dev.read(0, 2) == b"b" * dev.bs + b"a" * dev.bs


@pytest.mark.parametrize("have", [0, 200])
def test_write_with_less_data_out_is_refused(dev: Device, have: int) -> None:
    dev.write(0, b"a" * 2 * dev.bs)
    r = dev.run(cdb10(0x2A, 0, 2), b"b" * have)
    assert r.sense.triple == INVALID_FIELD_IN_INFORMATION_UNIT
    assert dev.read(0, 2) == b"a" * 2 * dev.bs


def test_writes_are_refused_on_a_read_only_lun(dev: Device) -> None:
    dev.lun.read_only = True
    assert dev.run(cdb10(0x2A, 0, 1), bytes(dev.bs)).sense.triple == WRITE_PROTECTED
    assert dev.run(cdb10(0x28, 0, 1), in_len=dev.bs).good


@pytest.mark.parametrize(
    ("error", "triple"),
    [
        (PoolFull("pool p is full"), (0x07, 0x27, 0x07)),
        (ContainerIOError("eio"), (0x03, 0x11, 0x00)),
        (LeaseExpired("lease"), (0x02, 0x04, 0x0A)),
    ],
)
def test_backend_errors_become_their_sense(
    dev: Device, error: Exception, triple: tuple[int, int, int]
) -> None:
    dev.backend.fail_next(error)
    r = dev.run(cdb10(0x2A, 0, 1), bytes(dev.bs))
    assert r.status == 2 and r.sense.triple == triple


def test_an_unexpected_backend_error_is_an_internal_target_failure(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    dev.backend.fail_next(ZeroDivisionError("bug"))
    r = dev.run(cdb10(0x28, 0, 1), in_len=dev.bs)
    assert r.sense.triple == (0x04, 0x44, 0x00)
    assert "internal error" in caplog.text and "ZeroDivisionError" in caplog.text


# --- READ CAPACITY -----------------------------------------------------------------------------


def test_read_capacity_10(dev: Device) -> None:
    r = dev.run([0x25] + [0] * 9, in_len=8)
    assert r.data == struct.pack(">II", N - 1, dev.bs)


def test_read_capacity_10_of_a_huge_lun(dev: Device) -> None:
    dev.lun.num_blocks = 1 << 33
    assert dev.run([0x25] + [0] * 9, in_len=8).data[:4] == b"\xff\xff\xff\xff"


def rc16(alloc: int) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def test_read_capacity_16(dev: Device) -> None:
    r = dev.run(rc16(32), in_len=32)
    assert r.data == struct.pack(">QI", N - 1, dev.bs) + bytes((0, 0, 0xC0)) + bytes(17)


@pytest.mark.parametrize("alloc", range(16))
def test_read_capacity_16_short_allocation(dev: Device, alloc: int) -> None:
    r = dev.run(rc16(alloc), in_len=alloc)
    assert r.good and len(r.data) == alloc


def test_read_capacity_16_reports_lbppbe(dev: Device) -> None:
    dev.lun.physical_block_exponent = 3
    dev.lun.lbprz = False
    assert dev.run(rc16(32), in_len=32).data[13:15] == bytes((0x03, 0x80))


def test_other_service_action_in_points_at_the_service_action(dev: Device) -> None:
    r = dev.run(struct.pack(">BBQIBB", 0x9E, 0x13, 0, 32, 0, 0), in_len=32)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xCC, 0, 1))


# --- VERIFY ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "mk"), [(0x2F, cdb10), (0xAF, cdb12), (0x8F, cdb16)])
def test_verify_bytchk_1_compares_and_reports_the_offset(dev: Device, op: int, mk: object) -> None:
    data = pattern(3 * dev.bs)
    dev.write(7, data)
    assert dev.run(mk(op, 7, 3, 0x02), data).good  # type: ignore[operator]
    bad = bytearray(data)
    bad[dev.bs + 17] ^= 0x58
    r = dev.run(mk(op, 7, 3, 0x02), bytes(bad))  # type: ignore[operator]
    assert r.sense.triple == MISCOMPARE and r.sense.information == dev.bs + 17


def test_verify_bytchk_0_only_reads(dev: Device) -> None:
    assert dev.run(cdb10(0x2F, 0, 16)).good
    dev.backend.fail_next(ContainerIOError("bad sector"))
    assert dev.run(cdb10(0x2F, 0, 16)).sense.triple == (0x03, 0x11, 0x00)


def test_verify_bytchk_3_compares_one_block_against_each(dev: Device) -> None:
    block = pattern(dev.bs)
    dev.write(0, block * 4)
    assert dev.run(cdb16(0x8F, 0, 4, 0x06), block).good
    dev.write(2, bytes(dev.bs))
    r = dev.run(cdb16(0x8F, 0, 4, 0x06), block)
    assert r.sense.triple == MISCOMPARE and r.sense.information == 2 * dev.bs


def test_verify_unmapped_blocks_compare_as_zeros(dev: Device) -> None:
    assert dev.run(cdb10(0x2F, 50, 2, 0x02), bytes(2 * dev.bs)).good


def test_verify_flags_and_ranges(dev: Device) -> None:
    assert dev.run(cdb10(0x2F, 0, 1, 0x04), bytes(dev.bs)).sense.triple == INVALID_FIELD_IN_CDB
    assert (
        dev.run(cdb10(0x2F, 0, 1, 0x20 | 0x02), bytes(dev.bs)).sense.triple == INVALID_FIELD_IN_CDB
    )
    assert dev.run(cdb10(0x2F, N + 1, 0, 0x02)).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(cdb10(0x2F, 0, 0, 0x02)).good
    assert dev.run(cdb10(0x2F, 0, 1, 0x12), bytes(dev.bs)).good  # DPO
    short = dev.run(cdb10(0x2F, 0, 2, 0x02), bytes(dev.bs))
    assert short.sense.triple == INVALID_FIELD_IN_INFORMATION_UNIT


# --- WRITE AND VERIFY ---------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "mk"), [(0x2E, cdb10), (0xAE, cdb12), (0x8E, cdb16)])
def test_write_and_verify(dev: Device, op: int, mk: object) -> None:
    data = pattern(2 * dev.bs, op)
    assert dev.run(mk(op, 3, 2, 0x02), data).good  # type: ignore[operator]
    assert dev.read(3, 2) == data
    assert dev.backend.fua_writes == 1
    assert dev.run(mk(op, 3, 2, 0x00), data).good  # type: ignore[operator]


def test_write_and_verify_errors(dev: Device) -> None:
    assert dev.run(cdb10(0x2E, 0, 1, 0x06), bytes(dev.bs)).sense.triple == INVALID_FIELD_IN_CDB
    assert dev.run(cdb10(0x2E, 0, 1, 0x40), bytes(dev.bs)).sense.triple == INVALID_FIELD_IN_CDB
    assert dev.run(cdb10(0x2E, N, 1, 0x02), bytes(dev.bs)).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(cdb10(0x2E, 0, 0, 0x02)).good
    dev.lun.read_only = True
    assert dev.run(cdb10(0x2E, 0, 1, 0x02), bytes(dev.bs)).sense.triple == WRITE_PROTECTED


# --- WRITE SAME ----------------------------------------------------------------------------------


def ws10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb10(0x41, lba, blocks, flags)


def ws16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdb16(0x93, lba, blocks, flags)


@pytest.mark.parametrize("mk", [ws10, ws16])
def test_write_same_replicates_the_block(dev: Device, mk: object) -> None:
    block = pattern(dev.bs, 3)
    assert dev.run(mk(10, 300), block).good  # type: ignore[operator]
    assert dev.read(10, 300) == block * 300
    assert dev.read(9, 1) == bytes(dev.bs) and dev.read(310, 1) == bytes(dev.bs)


def test_write_same_of_zeros_keeps_the_range_mapped(dev: Device) -> None:
    assert dev.run(ws16(0, 16), bytes(dev.bs)).good
    assert dev.backend.mapped_ranges(0, dev.bs)[0][2]


@pytest.mark.parametrize(("mk", "flags"), [(ws10, 0x08), (ws16, 0x08)])
def test_write_same_unmap_deallocates_whatever_the_block(
    dev: Device, mk: object, flags: int
) -> None:
    seg = dev.lun.unmap_granularity
    dev.write(0, pattern(2 * seg * dev.bs))
    assert dev.run(mk(0, seg, flags), b"\xff" * dev.bs).good  # type: ignore[operator]
    assert dev.read(0, seg) == bytes(seg * dev.bs)
    assert dev.backend.mapped_ranges(0, 2 * seg * dev.bs) == [
        (0, seg * dev.bs, False),
        (seg * dev.bs, seg * dev.bs, True),
    ]


def test_write_same16_ndob_writes_zeros_without_data_out(dev: Device) -> None:
    dev.write(0, pattern(4 * dev.bs))
    assert dev.run(ws16(0, 4, 0x01)).good
    assert dev.read(0, 4) == bytes(4 * dev.bs)


def test_write_same_zero_blocks_means_to_the_end(dev: Device) -> None:
    dev.write(N - 3, pattern(3 * dev.bs))
    assert dev.run(ws10(N - 2, 0), bytes(dev.bs)).good
    assert dev.read(N - 3, 3) == pattern(3 * dev.bs)[: dev.bs] + bytes(2 * dev.bs)
    assert dev.run(ws10(N, 0), bytes(dev.bs)).good
    assert dev.run(ws10(N + 1, 0), bytes(dev.bs)).sense.triple == LBA_OUT_OF_RANGE


def test_write_same_above_the_maximum_length(dev: Device) -> None:
    dev.lun.max_write_same_length = 100
    r = dev.run(ws16(0, 101), bytes(dev.bs))
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 10
    assert dev.run(ws16(0, 100), bytes(dev.bs)).good
    assert dev.run(ws10(N - 101, 0), bytes(dev.bs)).sense.field_pointer == 7
    assert dev.run(ws10(N - 100, 0), bytes(dev.bs)).good


@pytest.mark.parametrize("mk", [ws10, ws16])
def test_write_same_field_checks(dev: Device, mk: object) -> None:
    run = lambda cdb, out=bytes(dev.bs): dev.run(cdb, out)  # noqa: E731
    assert run(mk(0, 1, 0x10)).sense.sks == bytes((0xCC, 0, 1))  # type: ignore[operator]  # ANCHOR
    assert run(mk(0, 1, 0x18)).sense.triple == INVALID_FIELD_IN_CDB  # type: ignore[operator]
    assert run(mk(0, 1, 0x04)).sense.triple == INVALID_FIELD_IN_CDB  # type: ignore[operator]  # PBDATA
    assert run(mk(0, 1, 0x02)).sense.triple == INVALID_FIELD_IN_CDB  # type: ignore[operator]  # LBDATA
    assert run(mk(0, 1, 0x20)).sense.triple == INVALID_FIELD_IN_CDB  # type: ignore[operator]
    assert run(mk(N - 1, 2)).sense.triple == LBA_OUT_OF_RANGE  # type: ignore[operator]


@pytest.mark.parametrize("size_factor", [0, 0.5, 2])
def test_write_same_needs_exactly_one_block(dev: Device, size_factor: float) -> None:
    r = dev.run(ws10(0, 1), bytes(int(dev.bs * size_factor)))
    assert r.status == 2 and r.sense.key == 0x05


def test_write_same_on_a_read_only_lun_checks_protection_first(dev: Device) -> None:
    dev.lun.read_only = True
    assert dev.run(ws10(0, 1, 0x08)).sense.triple == WRITE_PROTECTED


def test_write_same_unmap_without_lbpws_writes(dev: Device) -> None:
    dev.lun.lbpws10 = False
    block = pattern(dev.bs)
    assert dev.run(ws10(0, 2, 0x08), block).good
    assert dev.read(0, 2) == block * 2


# --- UNMAP ---------------------------------------------------------------------------------------


def test_unmap_deallocates_and_reads_zeros(dev: Device) -> None:
    seg = dev.lun.unmap_granularity
    dev.write(0, pattern(2 * seg * dev.bs))
    params = unmap_list((0, seg), (seg + 1, 1))
    assert dev.run(unmap_cdb(len(params)), params).good
    data, old = dev.read(0, 2 * seg), pattern(2 * seg * dev.bs)
    bs = dev.bs
    assert data[: seg * bs] == bytes(seg * bs)
    assert data[seg * bs : (seg + 1) * bs] == old[seg * bs : (seg + 1) * bs]
    assert data[(seg + 1) * bs : (seg + 2) * bs] == bytes(bs)
    assert data[(seg + 2) * bs :] == old[(seg + 2) * bs :]
    assert dev.backend.mapped_ranges(0, bs)[0][2] is False


def test_unmap_of_nothing(dev: Device) -> None:
    assert dev.run(unmap_cdb(0)).good
    assert dev.run(unmap_cdb(8), unmap_list()).good
    params = unmap_list((N, 0), (5, 0))
    assert dev.run(unmap_cdb(len(params)), params).good


def test_unmap_validates_everything_before_unmapping_anything(dev: Device) -> None:
    dev.write(0, pattern(dev.bs))
    params = unmap_list((0, 1), (N - 1, 2))
    r = dev.run(unmap_cdb(len(params)), params)
    assert r.sense.triple == LBA_OUT_OF_RANGE
    assert dev.read(0, 1) == pattern(dev.bs)


def test_unmap_limits(dev: Device) -> None:
    dev.lun.max_unmap_descriptors = 2
    params = unmap_list((0, 1), (1, 1), (2, 1))
    r = dev.run(unmap_cdb(len(params)), params)
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 2
    dev.lun.max_unmap_lba_count = 10
    params = unmap_list((0, 6), (100, 5))
    r = dev.run(unmap_cdb(len(params)), params)
    assert r.sense.triple == INVALID_FIELD_IN_PARAMETER_LIST and r.sense.field_pointer == 24 + 8


def test_unmap_parameter_list_problems(dev: Device) -> None:
    assert dev.run(unmap_cdb(7), bytes(7)).sense.triple == PARAMETER_LIST_LENGTH_ERROR
    assert dev.run(unmap_cdb(24), bytes(4)).sense.triple == PARAMETER_LIST_LENGTH_ERROR
    assert dev.run(unmap_cdb(24, anchor=True), unmap_list((0, 1))).sense.sks == bytes((0xC8, 0, 1))
    # a descriptor length beyond the list, or not a multiple of 16, is truncated
    params = struct.pack(">HH4x", 0, 40) + struct.pack(">QI4x", 0, 1) + bytes(7)
    assert dev.run(unmap_cdb(len(params)), params).good


def test_unmap_on_a_read_only_lun(dev: Device) -> None:
    dev.lun.swp = True
    params = unmap_list((0, 1))
    assert dev.run(unmap_cdb(len(params)), params).sense.triple == (0x07, 0x27, 0x02)


def test_unmap_flushes_when_the_cache_is_off(dev: Device) -> None:
    dev.lun.write_cache_enabled = False
    params = unmap_list((0, 1))
    dev.run(unmap_cdb(len(params)), params)
    assert dev.backend.flushes == 1


# --- COMPARE AND WRITE, ORWRITE ----------------------------------------------------------------


def test_compare_and_write(dev: Device) -> None:
    old, new = pattern(2 * dev.bs, 1), pattern(2 * dev.bs, 2)
    dev.write(40, old)
    assert dev.run(caw(40, 2), old + new).good
    assert dev.read(40, 2) == new


def test_compare_and_write_miscompare_reports_the_first_differing_byte(dev: Device) -> None:
    old = pattern(2 * dev.bs, 1)
    dev.write(40, old)
    wrong = bytearray(old)
    wrong[dev.bs + 5] ^= 1
    wrong[dev.bs + 9] ^= 1
    r = dev.run(caw(40, 2), bytes(wrong) + bytes(2 * dev.bs))
    assert r.sense.triple == MISCOMPARE and r.sense.information == dev.bs + 5
    assert r.completion.sense[0] == 0xF0  # VALID
    assert dev.read(40, 2) == old


def test_compare_and_write_limits(dev: Device) -> None:
    dev.lun.max_compare_and_write_length = 4
    r = dev.run(caw(0, 5), bytes(10 * dev.bs))
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 13
    assert dev.run(caw(0, 1), bytes(4 * dev.bs)).sense.field_pointer == 13
    assert dev.run(caw(0, 3), bytes(4 * dev.bs)).sense.field_pointer == 13
    assert dev.run(caw(0, 0)).good
    assert dev.run(caw(0, 0), bytes(2 * dev.bs)).sense.triple == INVALID_FIELD_IN_CDB
    assert dev.run(caw(N, 1), bytes(2 * dev.bs)).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(caw(0, 1, 0x20), bytes(2 * dev.bs)).sense.triple == INVALID_FIELD_IN_CDB


def test_compare_and_write_fua_flushes(dev: Device) -> None:
    assert dev.run(caw(0, 1, 0x18), bytes(2 * dev.bs)).good
    assert dev.backend.flushes == 1


def test_compare_and_write_in_scattered_buffers(dev: Device) -> None:
    assert dev.run(caw(3, 2), bytes(2 * dev.bs) + pattern(2 * dev.bs), split=100).good
    assert dev.read(3, 2) == pattern(2 * dev.bs)


def test_orwrite_ors_into_the_medium(dev: Device) -> None:
    dev.write(0, b"\x0f" * 2 * dev.bs)
    assert dev.run(cdb16(0x8B, 0, 2), b"\xa0" * 2 * dev.bs).good
    assert dev.read(0, 2) == b"\xaf" * 2 * dev.bs
    assert dev.run(cdb16(0x8B, 0, 0)).good
    assert dev.run(cdb16(0x8B, N, 1), bytes(dev.bs)).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(cdb16(0x8B, 0, 1, 0x20), bytes(dev.bs)).sense.triple == INVALID_FIELD_IN_CDB


def test_orwrite_retries_when_a_write_races_it(dev: Device) -> None:
    real = dev.backend.compare_and_write
    calls = []

    def racing(offset: int, verify: memoryview, write: memoryview) -> int | None:
        calls.append(offset)
        if len(calls) == 1:  # another initiator writes between our read and our write
            dev.backend.write_from(offset, [memoryview(b"\x01" * len(verify))], False)
        return real(offset, verify, write)

    dev.backend.compare_and_write = racing  # type: ignore[method-assign]
    assert dev.run(cdb16(0x8B, 0, 1), b"\x10" * dev.bs).good
    assert dev.read(0, 1) == b"\x11" * dev.bs and len(calls) == 2


def test_orwrite_gives_up_after_too_many_races(dev: Device) -> None:
    dev.backend.compare_and_write = lambda o, v, w: 0  # type: ignore[method-assign,assignment]
    r = dev.run(cdb16(0x8B, 0, 1), bytes(dev.bs))
    assert r.sense.key == 0x0B


# --- SYNCHRONIZE CACHE, PRE-FETCH -----------------------------------------------------------


def test_synchronize_cache(dev: Device) -> None:
    assert dev.run(cdb10(0x35, 0, 0)).good
    assert dev.run(cdb16(0x91, N - 1, 1)).good
    assert dev.backend.flushes == 2
    assert dev.run(cdb10(0x35, N, 1)).sense.triple == LBA_OUT_OF_RANGE


def test_pre_fetch_is_good_not_condition_met(dev: Device) -> None:
    assert dev.run(cdb10(0x34, 0, 256, 0x02)).completion.status == 0
    assert dev.run(cdb16(0x90, N - 1, 1)).good
    assert dev.run(cdb10(0x34, N, 1)).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(cdb16(0x90, 2**64 - 1, 1)).sense.triple == LBA_OUT_OF_RANGE


# --- GET LBA STATUS -----------------------------------------------------------------------------


def gls(lba: int, alloc: int = 4096, report_type: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, report_type, 0)


def descriptors(data: bytes) -> list[tuple[int, int, int]]:
    (length,) = struct.unpack(">I", data[:4])
    out = []
    for pos in range(8, 4 + length, 16):
        lba, n, status = struct.unpack(">QIB", data[pos : pos + 13])
        out.append((lba, n, status))
    return out


def test_get_lba_status_of_an_empty_lun(dev: Device) -> None:
    assert descriptors(dev.run(gls(5), in_len=4096).data) == [(5, N - 5, 1)]


def test_get_lba_status_merges_runs_and_starts_at_the_lba(dev: Device) -> None:
    seg = dev.lun.unmap_granularity
    dev.write(seg, b"x" * dev.bs)
    dev.write(2 * seg + 3, b"x" * dev.bs)
    r = dev.run(gls(1), in_len=4096)
    assert descriptors(r.data) == [(1, seg - 1, 1), (seg, 2 * seg, 0), (3 * seg, N - 3 * seg, 1)]


def test_get_lba_status_allocation_length_limits_descriptors(dev: Device) -> None:
    seg = dev.lun.unmap_granularity
    dev.write(seg, b"x" * dev.bs)
    r = dev.run(gls(0, alloc=24), in_len=24)
    assert r.completion.read_len is None
    assert descriptors(r.data) == [(0, seg, 1)]
    assert dev.run(gls(0, alloc=0)).good
    assert dev.run(gls(0, alloc=10), in_len=10).data[:4] == struct.pack(">I", 20)


def test_get_lba_status_errors(dev: Device) -> None:
    assert dev.run(gls(N), in_len=24).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(gls(2**64 - 1), in_len=24).sense.triple == LBA_OUT_OF_RANGE
    assert dev.run(gls(0, report_type=1), in_len=24).sense.field_pointer == 14


def test_get_lba_status_splits_runs_longer_than_32_bits() -> None:
    dev = Device(num_blocks=8)
    dev.lun.num_blocks = (1 << 32) + 10
    dev.backend.mapped_ranges = lambda o, n: [(o, n, False)]  # type: ignore[method-assign,assignment,misc]
    r = dev.run(gls(0), in_len=4096)
    assert descriptors(r.data) == [(0, 0xFFFFFFFF, 1), (0xFFFFFFFF, 11, 1)]


def test_get_lba_status_asks_the_backend_in_growing_windows() -> None:
    dev = Device(num_blocks=8)
    dev.lun.num_blocks = 1 << 40
    asked: list[int] = []

    def ranges(offset: int, length: int) -> list[tuple[int, int, bool]]:
        asked.append(length)
        return [(offset, length, False)]

    dev.backend.mapped_ranges = ranges  # type: ignore[method-assign,assignment]
    assert descriptors(dev.run(gls(0), in_len=4096).data)[0][:2] == (0, 0xFFFFFFFF)
    assert len(asked) < 40 and asked[1] == 2 * asked[0]


# --- START STOP UNIT, READ DEFECT DATA ---------------------------------------------------------


def test_start_stop_unit(dev: Device) -> None:
    assert dev.run([0x1B, 0, 0, 0, 0x01, 0]).good  # START
    assert dev.run([0x1B, 1, 0, 0, 0x00, 0]).good  # STOP flushes
    assert dev.run([0x1B, 0, 0, 0, 0x04, 0]).good  # STOP, NO_FLUSH
    assert dev.backend.flushes == 1
    assert dev.run([0x1B, 0, 0, 0, 0x30, 0]).good  # STANDBY
    r = dev.run([0x1B, 0, 0, 0, 0x02, 0])
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xC9, 0, 4))
    assert dev.run([0x1B, 0, 0, 0, 0x50, 0]).sense.triple == INVALID_FIELD_IN_CDB


def test_read_defect_data_is_an_empty_list(dev: Device) -> None:
    r = dev.run(struct.pack(">BBB4xHB", 0x37, 0, 0x18 | 0x05, 32, 0), in_len=32)
    assert r.data == bytes((0, 0x1D, 0, 0))
    r = dev.run(struct.pack(">BBIIBB", 0xB7, 0x10, 0, 32, 0, 0), in_len=32)
    assert r.data == bytes((0, 0x10)) + bytes(6)


# --- plain_transfer: the device loop's shortcut ------------------------------------------


class Recorder:
    """A backend that records the data calls ``handle`` makes and refuses any other."""

    size = 64 * 4096

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, bool]] = []

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append(("read", offset, sum(b.nbytes for b in bufs), False))

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        self.calls.append(("write", offset, sum(b.nbytes for b in bufs), fua))

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"a READ or WRITE called {name}")


def rw_cdb(op: int, flags: int, lba: int, blocks: int, group: int = 0) -> bytes:
    if op < 0x80:
        return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, group, blocks & 0xFFFF, 0)
    return struct.pack(">BBQIBB", op, flags, lba, blocks & 0xFFFFFFFF, group, 0)


# One everyday command and LUN, then at most one thing that may spoil it.
SPOILERS = [
    "none",
    "fua",
    "protect",
    "flags",
    "ua",
    "cut",
    "length",
    "read_only",
    "swp",
    "wce",
    "range",
    "zero",
]


@settings(max_examples=500)
@given(
    op=st.sampled_from([0x28, 0x2A, 0x88, 0x8A]),
    lba=st.integers(0, 60),
    blocks=st.integers(1, 8),
    block_size=st.sampled_from([512, 4096]),
    spare=st.integers(0, 8),
    spoil=st.sampled_from(SPOILERS),
    amount=st.integers(1, 2**32 - 1),
    flags=st.sampled_from(range(256)),
)
def test_a_plain_transfer_is_exactly_what_handle_would_do(
    op: int,
    lba: int,
    blocks: int,
    block_size: int,
    spare: int,
    spoil: str,
    amount: int,
    flags: int,
) -> None:
    """Whenever plain_transfer names an offset, handle() answers GOOD after one data call
    of the whole buffer at that offset, without FUA, and consumes nothing (so the loop may
    skip it); the shortcut may decline anything, but never the everyday command."""
    lun = LunState(
        block_size=block_size, num_blocks=lba + blocks + spare, serial="s", naa=b"\x60" + bytes(15)
    )
    length = blocks * block_size
    flags = {"fua": FUA, "protect": 0x20 << flags % 3, "flags": flags}.get(spoil, 0)
    cdb = rw_cdb(op, flags, lba, blocks, amount & 0x1F)
    if spoil == "ua":
        lun.queue_unit_attention(sn.CAPACITY_DATA_CHANGED)
    elif spoil == "cut":  # a truncated CDB is declined, never misread
        cdb = cdb[: max(1, len(cdb) - amount % len(cdb))]
    elif spoil == "length":
        length = max(0, length + (amount % 9 - 4) * (1 if amount & 1 else 512))
    elif spoil in ("read_only", "swp"):
        setattr(lun, spoil, True)
    elif spoil == "wce":
        lun.write_cache_enabled = False
    elif spoil == "range":
        cdb = rw_cdb(op, 0, lba + spare + 1 + (amount if op >= 0x80 else amount % 1000), blocks)
    elif spoil == "zero":
        cdb, length = rw_cdb(op, 0, lba, 0), 0
    offset = plain_transfer(lun, cdb, length)
    event(f"{spoil}: {'plain' if offset >= 0 else 'declined'}")
    if spoil == "none":
        assert offset == lba * block_size, "an everyday READ/WRITE missed the shortcut"
    if offset < 0:
        return
    backend = Recorder()
    buf = memoryview(bytearray(length))
    comp = handle(lun, cdb, [buf], [buf], backend)  # type: ignore[arg-type]
    assert comp == COMPLETED
    kind = "write" if cdb[0] & 2 else "read"
    assert backend.calls == [(kind, offset, length, False)]
    assert not lun.pending_unit_attentions and not lun.gate


@pytest.mark.parametrize("op", [0x28, 0x2A, 0x88, 0x8A])
@pytest.mark.parametrize("bit", range(8))
def test_plain_transfer_declines_protection_bits_and_a_write_fua(op: int, bit: int) -> None:
    lun = LunState(block_size=512, num_blocks=64, serial="s", naa=b"\x60" + bytes(15))
    declined = bit >= 5 or (bit == 3 and op in (0x2A, 0x8A))  # xPROTECT; FUA on a write
    assert (plain_transfer(lun, rw_cdb(op, 1 << bit, 8, 2), 1024) < 0) == declined
