from __future__ import annotations

from pathlib import Path

import pytest

from targetvirt.errors import InvalidArgument, LeaseExpired, ReadOnly, ScsiError
from tests.targetvirt.engine_model import SEG, open_catalog


@pytest.fixture
def catalog(tmp_path: Path):  # type: ignore[no-untyped-def]
    cat = open_catalog(str(tmp_path / "meta.db"))
    cat.create_pool(
        "p", str(tmp_path / "c0"), (1 << 20) + 32 * SEG, segment_size=SEG, preallocate=True
    )
    yield cat
    cat.close()


def test_a_reused_segment_never_shows_its_previous_data(catalog) -> None:  # type: ignore[no-untyped-def]
    v = catalog.create_vdisk("v", "p", 4 * SEG)
    v.write(0, b"x" * SEG)
    v.unmap(0, SEG)
    catalog.commit()  # the freed segment becomes reusable (preallocated: its bytes stay)
    v.write(SEG, b"y")
    assert v.read(SEG, SEG) == b"y" + bytes(SEG - 1)


def test_unaligned_size_and_straddling_io(catalog) -> None:  # type: ignore[no-untyped-def]
    v = catalog.create_vdisk("v", "p", 3 * SEG + 777)
    data = bytes(range(256)) * 1024
    v.write(SEG - 100, data[: 2 * SEG])
    assert v.read(SEG - 100, 2 * SEG) == data[: 2 * SEG]
    assert v.read(0, SEG - 100) == bytes(SEG - 100)
    v.write(3 * SEG + 700, b"z" * 77)
    assert v.read(3 * SEG + 700, 77) == b"z" * 77
    with pytest.raises(ScsiError):
        v.write(3 * SEG + 700, b"z" * 78)
    with pytest.raises(ScsiError):
        v.read(-1, 2)


def test_extents_point_straight_into_containers(catalog) -> None:  # type: ignore[no-untyped-def]
    v = catalog.create_vdisk("v", "p", 4 * SEG)
    assert [(c, n) for c, _, n in v.map_read(SEG - 10, 20)] == [(None, 10), (None, 10)]
    v.write(SEG - 10, b"a" * 20)
    extents = v.map_read(SEG - 10, 20)
    assert [n for _, _, n in extents] == [10, 10]
    for c, off, n in extents:
        assert c is not None
        buf = bytearray(n)
        c.readv([buf], off)
        assert buf == b"a" * n


def test_partial_unmap_zeroes_and_whole_unmap_frees(catalog) -> None:  # type: ignore[no-untyped-def]
    v = catalog.create_vdisk("v", "p", 4 * SEG)
    v.write(0, b"q" * (4 * SEG))
    free = v.pool.free_segments()
    v.unmap(SEG // 2, 2 * SEG)  # half of seg 0, all of seg 1, half of seg 2
    catalog.commit()
    assert v.pool.free_segments() == free + 1
    assert v.read(0, 4 * SEG) == b"q" * (SEG // 2) + bytes(2 * SEG) + b"q" * (3 * SEG // 2)
    assert v.mapped_ranges(0, 4 * SEG) == [
        (0, SEG, True),
        (SEG, SEG, False),
        (2 * SEG, 2 * SEG, True),
    ]


def test_snapshots_are_read_only_and_accounting(catalog) -> None:  # type: ignore[no-untyped-def]
    v = catalog.create_vdisk("v", "p", 4 * SEG)
    v.write(0, b"1" * (2 * SEG))
    s = catalog.snapshot("v", "s")
    with pytest.raises(ReadOnly):
        s.write(0, b"x")
    assert v.exclusive_bytes() == 0 and s.exclusive_bytes() == 0
    v.write(0, b"2")
    assert v.allocated_bytes() == 2 * SEG
    assert v.exclusive_bytes() == SEG and s.exclusive_bytes() == SEG
    assert s.read(0, 1) == b"1"


def test_names_and_sizes_are_validated(catalog) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="name"):
        catalog.create_vdisk("../etc", "p", SEG)
    with pytest.raises(InvalidArgument, match="positive"):
        catalog.create_vdisk("v", "p", 0)
    with pytest.raises(InvalidArgument, match="COW mode"):
        catalog.create_vdisk("v", "p", SEG, "sideways")  # type: ignore[arg-type]
    assert LeaseExpired.sense is not None
