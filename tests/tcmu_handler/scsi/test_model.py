"""Data-path correctness against a bytearray reference model (hypothesis)."""

import random
import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import (
    LBA_OUT_OF_RANGE,
    MISCOMPARE,
    Device,
    caw,
    cdb10,
    cdb12,
    cdb16,
    unmap_cdb,
    unmap_list,
)

BLOCKS = 64
GRANULE = 8  # blocks per segment: small, so partial and whole segments both happen


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Model:
    dev: Device
    data: bytearray

    @property
    def bs(self) -> int:
        return self.dev.bs

    def span(self, lba: int, n: int) -> slice:
        return slice(lba * self.bs, (lba + n) * self.bs)

    def in_range(self, lba: int, n: int) -> bool:
        return lba + n <= BLOCKS


lbas = st.integers(0, BLOCKS + 2)
counts = st.integers(0, 12)
seeds = st.integers(0, 2**16)


@st.composite
def write_op(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    return "write", (
        draw(st.sampled_from([6, 10, 12, 16])),
        draw(lbas),
        draw(st.integers(1, 12)),
        draw(seeds),
        draw(st.booleans()),
    )


operations = st.one_of(
    write_op(),
    st.tuples(
        st.just("write_same"),
        st.tuples(
            st.sampled_from([10, 16]),
            lbas,
            counts,
            st.sampled_from([0, 1, 0xA5, -1]),
            st.booleans(),
            st.booleans(),
        ),
    ),
    st.tuples(st.just("unmap"), st.tuples(st.lists(st.tuples(lbas, counts), max_size=4))),
    st.tuples(st.just("caw"), st.tuples(lbas, st.integers(1, 4), st.booleans(), seeds)),
    st.tuples(st.just("orwrite"), st.tuples(lbas, st.integers(1, 6), seeds)),
    st.tuples(
        st.just("write_verify"),
        st.tuples(st.sampled_from([10, 12, 16]), lbas, st.integers(1, 6), seeds),
    ),
    st.tuples(st.just("read"), st.tuples(lbas, counts)),
    st.tuples(st.just("verify"), st.tuples(lbas, counts)),
)


def do_write(m: Model, size: int, lba: int, n: int, seed: int, fua: bool) -> None:
    if size == 6:
        cdb = bytes((0x0A, lba >> 16 & 0x1F, lba >> 8 & 0xFF, lba & 0xFF, n, 0))
    else:
        make = {10: cdb10, 12: cdb12, 16: cdb16}[size]
        cdb = make({10: 0x2A, 12: 0xAA, 16: 0x8A}[size], lba, n, 0x08 if fua else 0)
    data = payload(seed, n * m.bs)
    r = m.dev.run(cdb, data, split=m.bs // 2 + 7)
    if m.in_range(lba, n):
        assert r.good
        m.data[m.span(lba, n)] = data
    else:
        assert r.sense.triple == LBA_OUT_OF_RANGE


def do_write_same(
    m: Model, size: int, lba: int, n: int, fill: int, unmap: bool, ndob: bool
) -> None:
    block = payload(fill, m.bs) if fill < 0 else bytes([fill]) * m.bs
    flags = (0x08 if unmap else 0) | (0x01 if ndob and size == 16 else 0)
    cdb = cdb10(0x41, lba, n, flags) if size == 10 else cdb16(0x93, lba, n, flags)
    r = m.dev.run(cdb, b"" if flags & 1 else block)
    count = n or max(BLOCKS - lba, 0)  # 0 blocks: to the end of the LUN
    if lba > BLOCKS or not m.in_range(lba, count):
        assert r.sense.triple == LBA_OUT_OF_RANGE
        return
    assert r.good
    zeros = unmap or flags & 1
    m.data[m.span(lba, count)] = bytes(count * m.bs) if zeros else block * count


def do_unmap(m: Model, ranges: list[tuple[int, int]]) -> None:
    params = unmap_list(*ranges)
    r = m.dev.run(unmap_cdb(len(params)), params)
    if all(m.in_range(lba, n) for lba, n in ranges):
        assert r.good
        for lba, n in ranges:
            m.data[m.span(lba, n)] = bytes(n * m.bs)
    else:
        assert r.sense.triple == LBA_OUT_OF_RANGE


def do_caw(m: Model, lba: int, n: int, match: bool, seed: int) -> None:
    if not m.in_range(lba, n):
        assert m.dev.run(caw(lba, n), bytes(2 * n * m.bs)).sense.triple == LBA_OUT_OF_RANGE
        return
    current = bytearray(m.data[m.span(lba, n)])
    if not match:
        current[seed % len(current)] ^= 0x5A
    new = payload(seed, n * m.bs)
    r = m.dev.run(caw(lba, n), bytes(current) + new)
    if match:
        assert r.good
        m.data[m.span(lba, n)] = new
    else:
        assert r.sense.triple == MISCOMPARE and r.sense.information == seed % len(current)


def do_orwrite(m: Model, lba: int, n: int, seed: int) -> None:
    mask = payload(seed, n * m.bs)
    r = m.dev.run(cdb16(0x8B, lba, n), mask)
    if not m.in_range(lba, n):
        assert r.sense.triple == LBA_OUT_OF_RANGE
        return
    assert r.good
    old = m.data[m.span(lba, n)]
    m.data[m.span(lba, n)] = bytes(a | b for a, b in zip(old, mask, strict=True))


def do_write_verify(m: Model, size: int, lba: int, n: int, seed: int) -> None:
    make = {10: cdb10, 12: cdb12, 16: cdb16}[size]
    data = payload(seed, n * m.bs)
    r = m.dev.run(make({10: 0x2E, 12: 0xAE, 16: 0x8E}[size], lba, n, 0x02), data)
    if m.in_range(lba, n):
        assert r.good
        m.data[m.span(lba, n)] = data
    else:
        assert r.sense.triple == LBA_OUT_OF_RANGE


def do_read(m: Model, lba: int, n: int) -> None:
    r = m.dev.run(cdb16(0x88, lba, n), in_len=n * m.bs, split=m.bs * 3)
    if m.in_range(lba, n):
        assert r.good and r.data == m.data[m.span(lba, n)]
    else:
        assert r.sense.triple == LBA_OUT_OF_RANGE


def do_verify(m: Model, lba: int, n: int) -> None:
    expected = bytes(m.data[m.span(lba, n)]) if m.in_range(lba, n) else bytes(n * m.bs)
    r = m.dev.run(cdb10(0x2F, lba, n, 0x02), expected)
    assert r.good if m.in_range(lba, n) else r.sense.triple == LBA_OUT_OF_RANGE


ACTIONS = {
    "write": do_write,
    "write_same": do_write_same,
    "unmap": do_unmap,
    "caw": do_caw,
    "orwrite": do_orwrite,
    "write_verify": do_write_verify,
    "read": do_read,
    "verify": do_verify,
}


def check_provisioning(m: Model) -> None:
    """GET LBA STATUS runs tile the LUN, and deallocated runs read as zeros (LBPRZ)."""
    r = m.dev.run(struct.pack(">BBQIBB", 0x9E, 0x12, 0, 4096, 0, 0), in_len=4096)
    (length,) = struct.unpack(">I", r.data[:4])
    next_lba = 0
    for pos in range(8, 4 + length, 16):
        lba, n, status = struct.unpack(">QIB", r.data[pos : pos + 13])
        assert lba == next_lba and status in (0, 1)
        if status == 1:
            assert m.data[m.span(lba, n)] == bytes(n * m.bs)
        next_lba = lba + n
    assert next_lba == BLOCKS


@settings(max_examples=200, deadline=None)
@given(block_size=st.sampled_from([512, 4096]), ops=st.lists(operations, max_size=25))
def test_random_command_sequences_match_a_reference_model(
    block_size: int, ops: list[tuple[str, tuple[object, ...]]]
) -> None:
    dev = Device(num_blocks=BLOCKS, block_size=block_size, segment_size=GRANULE * block_size)
    m = Model(dev, bytearray(BLOCKS * block_size))
    for name, args in ops:
        ACTIONS[name](m, *args)  # type: ignore[operator]
    assert dev.read(0, BLOCKS) == m.data
    check_provisioning(m)
