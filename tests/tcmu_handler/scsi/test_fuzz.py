"""Arbitrary CDBs and buffer sizes: handle() never raises, always answers GOOD or CHECK
CONDITION with well-formed sense, never writes outside the data-in buffers nor into the
data-out ones, and never asks the backend for bytes outside the LUN (RamBackend raises,
which would show as an internal failure). Scale with TV_FUZZ_SCALE (tests/fuzzing.py)."""

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given
from hypothesis import strategies as st

from tcmu_handler.scsi import Completion, handle
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import sense as sn
from tests.fuzzing import fuzz_settings

from .helpers import Device, parse_sense
from .test_alua import StaticAlua, two_gateways

GUARD = 64
KNOWN = sorted({c.opcode for c in op.SUPPORTED} | {0x7F, 0x83, 0x84, 0x9C})

opcodes = st.one_of(st.sampled_from(KNOWN), st.integers(0, 255))
small_ints = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    """Mostly plausible CDBs (known opcode, small LBAs and lengths), sometimes noise."""
    code = draw(opcodes)
    length = draw(st.sampled_from([0, 1, 5, 6, 10, 12, 16, 32]))
    body = bytearray(draw(st.binary(min_size=max(0, length - 1), max_size=max(0, length - 1))))
    if draw(st.booleans()) and length >= 10:
        body[1:9] = draw(st.integers(0, 300)).to_bytes(8, "big")  # an LBA near the LUN
    return (bytes([code]) + bytes(body))[:length]


def split(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({c % (total + 1) for c in cuts} | {0, total})
    return list(itertools.pairwise(points)) or [(0, 0)]


@contextmanager
def quiet() -> Iterator[None]:
    """Internal errors are logged; the fuzzer looks at results."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def check_completion(done: Completion, cdb: bytes, in_len: int) -> None:
    """GOOD without sense, or CHECK CONDITION with well-formed sense that is not the
    catch-all internal failure."""
    assert done.status in (0x00, 0x02)
    if done.status == 0x02:
        sense = parse_sense(done.sense)
        assert sense.key != 0 and done.read_len == 0
        assert sense.triple != (0x04, 0x44, 0x00), f"internal failure for {cdb.hex()}"
    else:
        assert done.sense == b""
        assert done.read_len is None or 0 <= done.read_len <= in_len


def make_device(block_size: int, gate: str | None) -> Device:
    dev = Device(num_blocks=256, block_size=block_size, segment_size=8 * block_size)
    if gate == "ua":
        dev.lun.resize(256)
    elif gate == "d_sense":
        dev.lun.d_sense = True
    elif gate == "formatting":
        dev.lun.begin_operation(sn.FORMAT_IN_PROGRESS)
    elif gate == "read_only":
        dev.lun.read_only = True
    elif gate == "alua":  # INQUIRY, VPD 83h, RTPG and RSOC answer from target port groups
        dev.lun.alua = StaticAlua(two_gateways())
    return dev


@fuzz_settings(600)
@given(
    cdb=cdbs(),
    out_len=st.one_of(st.integers(0, 64), st.sampled_from([512, 1024, 4096, 8192])),
    in_len=st.one_of(st.integers(0, 64), st.sampled_from([18, 96, 255, 512, 4096, 10000])),
    cuts_in=st.lists(st.integers(0, 10000), max_size=3),
    cuts_out=st.lists(st.integers(0, 10000), max_size=3),
    block_size=st.sampled_from([512, 4096]),
    gate=st.sampled_from([None, "ua", "d_sense", "formatting", "read_only", "alua"]),
    as_view=st.booleans(),
)
def test_handle_never_raises_and_stays_in_its_buffers(
    cdb: bytes,
    out_len: int,
    in_len: int,
    cuts_in: list[int],
    cuts_out: list[int],
    block_size: int,
    gate: str | None,
    as_view: bool,
) -> None:
    dev = make_device(block_size, gate)
    arena = bytearray(b"\x5a" * (in_len + 2 * GUARD * (len(cuts_in) + 1)))
    data_in = []
    pos = GUARD
    for start, end in split(in_len, cuts_in):
        data_in.append(memoryview(arena)[pos : pos + end - start])
        pos += end - start + 2 * GUARD
    out_bytes = bytearray(range(256)) * (out_len // 256 + 1)
    out = memoryview(out_bytes)[:out_len]
    data_out = [out[a:b] for a, b in split(out_len, cuts_out)]
    sent = bytes(out_bytes)

    with quiet():
        # the device loop may pass a view of the ring entry rather than bytes
        done = handle(dev.lun, memoryview(cdb) if as_view else cdb, data_out, data_in, dev.backend)

    check_completion(done, cdb, in_len)
    assert out_bytes == sent  # Data-Out is the initiator's: never written
    # the guard bytes around every data-in iovec are untouched
    pos = 0
    for view in data_in:
        start = pos + GUARD
        assert arena[pos:start] == b"\x5a" * GUARD
        pos = start + len(view) + GUARD
        assert arena[start + len(view) : pos] == b"\x5a" * GUARD


@fuzz_settings(100)
@given(
    body=st.binary(min_size=31, max_size=31),
    out_len=st.sampled_from([0, 7, 512, 4096]),
    in_len=st.sampled_from([0, 7, 512, 4096]),
    cdb_len=st.sampled_from([1, 6, 10, 12, 16, 32]),
)
def test_every_opcode_with_random_fields(
    body: bytes, out_len: int, in_len: int, cdb_len: int
) -> None:
    """All 256 opcodes with the same random fields and buffer sizes that the CDB's
    transfer length rarely matches: a well-formed answer for each, buffers untouched
    outside data-in."""
    for code in range(256):
        dev = Device(num_blocks=256, block_size=512, segment_size=4096)
        cdb = (bytes([code]) + body)[:cdb_len]
        arena = bytearray(b"\x5a" * (in_len + 2 * GUARD))
        data_in = [memoryview(arena)[GUARD : GUARD + in_len]] if in_len else []
        out = bytes(range(256)) * (out_len // 256 + 1)
        out_buf = bytearray(out[:out_len])
        data_out = [memoryview(out_buf)] if out_len else []
        with quiet():
            done = handle(dev.lun, cdb, data_out, data_in, dev.backend)
        check_completion(done, cdb, in_len)
        assert arena[:GUARD] == arena[GUARD + in_len :] == b"\x5a" * GUARD
        assert out_buf == out[:out_len]
