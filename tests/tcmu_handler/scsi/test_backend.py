import pytest

from targetvirt.errors import PoolFull
from tcmu_handler.scsi import RamBackend


def mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


def test_write_then_read_across_iovecs() -> None:
    be = RamBackend(4096, granule=1024)
    be.write_from(100, [mv(b"ab"), mv(b"cde")], fua=False)
    a, b = bytearray(3), bytearray(4)
    be.read_into(99, [memoryview(a), memoryview(b)])
    assert bytes(a + b) == b"\x00abcde\x00"


def test_writes_map_granules_and_unmap_releases_whole_ones() -> None:
    be = RamBackend(4096, granule=1024)
    be.write_from(1000, [mv(b"x" * 100)], fua=True)
    assert be.fua_writes == 1
    assert be.mapped_ranges(0, 4096) == [(0, 2048, True), (2048, 2048, False)]
    be.write_zeroes(512, 1536, unmap=True)  # granule 0 only partly: stays mapped
    assert be.mapped_ranges(0, 4096) == [(0, 1024, True), (1024, 3072, False)]
    assert be.data[1000:1100] == bytes(24) + bytes(76)


def test_write_zeroes_without_unmap_maps() -> None:
    be = RamBackend(4096, granule=1024)
    be.write_zeroes(0, 4096, unmap=False)
    assert be.mapped_ranges(1, 10) == [(1, 10, True)]


def test_unmap_to_the_end_releases_a_partial_last_granule() -> None:
    be = RamBackend(3000, granule=1024)
    be.write_from(2900, [mv(b"z")], fua=False)
    be.write_zeroes(2048, 952, unmap=True)
    assert be.mapped_ranges(0, 3000) == [(0, 3000, False)]


def test_compare_and_write() -> None:
    be = RamBackend(1024, granule=512)
    be.write_from(0, [mv(b"hello")], fua=False)
    assert be.compare_and_write(0, mv(b"help!"), mv(b"XXXXX")) == 3
    assert be.data[:5] == b"hello"
    assert be.compare_and_write(0, mv(b"hello"), mv(b"world")) is None
    assert be.data[:5] == b"world"


def test_fail_next_raises_once() -> None:
    be = RamBackend(1024)
    be.fail_next(PoolFull("full"))
    with pytest.raises(PoolFull):
        be.flush()
    be.flush()
    assert be.flushes == 1


def test_out_of_range_io_is_a_bug() -> None:
    with pytest.raises(ValueError):
        RamBackend(512).read_into(0, [memoryview(bytearray(513))])


def test_resize_keeps_data() -> None:
    be = RamBackend(1024, granule=512)
    be.write_from(0, [mv(b"keep")], fua=False)
    be.resize(2048)
    assert be.size == 2048 and bytes(be.data[:4]) == b"keep"
    assert be.mapped_ranges(0, 2048) == [(0, 512, True), (512, 1536, False)]
