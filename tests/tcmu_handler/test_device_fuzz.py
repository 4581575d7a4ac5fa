"""Fuzz target: the device loop (ring + SCSI + workers) fed malformed ring entries by the
byte-exact kernel emulator.

Each example queues well-formed commands with arbitrary CDBs and data lengths that
rarely match them, then one malformed entry (bad length, iovecs outside the data area,
too many iovecs, a CDB offset outside the entry, a zero or duplicate id, a short TMR, an
unknown opcode, or a bad ``cmd_head``), then more commands, and runs a real
:class:`Device` over it. The device must fail cleanly: every command before the bad
entry completes exactly once as the kernel expects, nothing after it is touched, the
device reports the ring broken once (an unknown opcode is skipped instead), no thread
dies, and no byte of the mapping changes outside the tail, the response fields of the
fetched commands and their own data buffers. Scale with TV_FUZZ_SCALE.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import event, given
from hypothesis import strategies as st

from tcmu_handler import abi
from tcmu_handler.device import Device
from tcmu_handler.ring import Ring
from tcmu_handler.scsi.backend import RamBackend
from tcmu_handler.scsi.lun import LunState
from tests.fuzzing import fuzz_settings, one_line
from tests.tcmu_handler.kernel_emulator import (
    MAILBOX_SIZE,
    KernelCommand,
    KernelEmulator,
    round_up,
)
from tests.tcmu_handler.test_device import EmulatedUio

BLOCK = 512
BLOCKS = 256
TUR = bytes(6)


@dataclass(frozen=True)
class Good:
    cdb: bytes
    data_out: int
    data_in: int


read_write = st.builds(
    lambda op, lba, n: struct.pack(">BBIBHB", op, 0, lba, 0, n, 0),
    st.sampled_from([0x28, 0x2A, 0x2F, 0x35]),  # READ, WRITE, VERIFY, SYNCHRONIZE CACHE
    st.integers(0, BLOCKS + 2),
    st.integers(0, 20),
)
any_cdb = st.builds(
    lambda op, rest: bytes([op]) + rest,
    st.integers(0, 255).filter(lambda op: op != 0x7F),  # variable-length: see CDB lengths
    st.binary(min_size=15, max_size=15),
)
goods = st.builds(
    Good,
    st.one_of(read_write, any_cdb, st.just(TUR), st.just(bytes([0x12, 0, 0, 0, 96, 0]))),
    st.one_of(st.just(0), st.integers(1, 9000)),
    st.one_of(st.just(0), st.integers(1, 9000)),
)

DEFECTS = [
    "len_zero", "len_short", "len_past_head", "iov_below", "iov_above", "iov_huge",
    "iov_count", "cdb_before", "cdb_after", "id_zero", "id_duplicate", "tmr_short",
    "unknown_op", "bad_head",
]  # fmt: skip


@dataclass
class Built:
    size: int
    build: Callable[[int], bytes]
    known_id: int | None = None  # unknown op: an id the kernel will look up in its slot


def malformed(
    kind: str, emu: KernelEmulator, data: st.DataObject, outstanding: list[int]
) -> Built | None:
    """The bytes of one malformed entry of ``kind`` (None: corrupt cmd_head instead)."""
    lo, hi = emu.data_off, len(emu.buf)
    cmd_id = data.draw(st.integers(0x1000, 0xFFFF))  # the emulator uses the lowest free ids
    iovs = [(lo, BLOCK)]
    cdb = TUR
    length: int | None = None
    op = abi.OP_CMD
    cdb_at: int | None = None
    iov_cnt: int | None = None
    if kind == "bad_head":
        return None
    if kind == "len_zero":
        length = 0
    elif kind == "len_short":
        length = data.draw(st.integers(1, 13)) * 8
    elif kind == "len_past_head":
        length = 120 + data.draw(st.integers(1, 64)) * 8
    elif kind == "iov_below":
        iovs = [(data.draw(st.integers(0, lo - 1)), data.draw(st.integers(0, 2 * BLOCK)))]
    elif kind == "iov_above":
        base = data.draw(st.integers(lo, hi))
        iovs = [(base, hi - base + data.draw(st.integers(1, 2**40)))]
    elif kind == "iov_huge":
        iovs = [(lo, BLOCK), (data.draw(st.integers(2**63, 2**64 - 1)), 1)]
    elif kind == "iov_count":
        iov_cnt = data.draw(st.integers(2, 2**32 - 1))
    elif kind == "cdb_before":
        cdb_at = data.draw(st.integers(-4096, 48 + 16 * len(iovs) - 1))
    elif kind == "cdb_after":
        cdb_at = data.draw(st.integers(128, 8192))
    elif kind == "id_zero":
        cmd_id = 0
    elif kind == "id_duplicate":
        cmd_id = data.draw(st.sampled_from(outstanding)) if outstanding else 0
    elif kind == "tmr_short":
        count = data.draw(st.integers(1, 2**32 - 1))

        def tmr(ent: int) -> bytes:
            return struct.pack("<IHBBBxxxI", 32 | abi.OP_TMR, 0, 0, 0, 1, count) + bytes(16)

        return Built(32, tmr)
    elif kind == "unknown_op":
        op = data.draw(st.integers(3, 7))
    size, build = cmd_entry(cmd_id, cdb, iovs, length=length, op=op, cdb_at=cdb_at, iov_cnt=iov_cnt)
    if kind == "len_short":
        size = max(size, length or 0)
    return Built(size, build, cmd_id if kind == "unknown_op" else None)


def cmd_entry(
    cmd_id: int,
    cdb: bytes,
    iovs: list[tuple[int, int]],
    *,
    length: int | None,
    op: int,
    cdb_at: int | None,
    iov_cnt: int | None,
) -> tuple[int, Callable[[int], bytes]]:
    """A CMD entry with chosen fields (the same layout as test_ring.cmd_entry)."""
    base = max(48 + 16 * len(iovs), 112)
    size = base + round_up(len(cdb), 8)
    len_field = size if length is None else length

    def build(ent: int) -> bytes:
        raw = bytearray(size)
        struct.pack_into("<IHBB", raw, 0, len_field | op, cmd_id, 0, 0)
        n = len(iovs) if iov_cnt is None else iov_cnt
        cdb_off = max(0, ent + (base if cdb_at is None else cdb_at))
        struct.pack_into("<IIIxxxxQ", raw, 8, n, 0, 0, cdb_off)
        for i, iov in enumerate(iovs):
            struct.pack_into("<QQ", raw, 48 + 16 * i, *iov)
        raw[base : base + len(cdb)] = cdb
        return bytes(raw)

    return size, build


@contextmanager
def thread_failures() -> Iterator[list[BaseException]]:
    """Exceptions that escape any thread while inside (the device loop, workers)."""
    failures: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        failures.append(args.exc_value or RuntimeError(str(args.exc_type)))

    threading.excepthook = hook
    try:
        yield failures
    finally:
        threading.excepthook = previous


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def allowed_changes(emu: KernelEmulator, fetched: list[KernelCommand]) -> set[int]:
    """The tail, the response part of each fetched CMD slot (any slot may carry any
    fetched command's response) and the fetched commands' own data blocks."""
    allowed = set(range(64, 68))
    for k in fetched:
        ent = MAILBOX_SIZE + k.ring_offset
        allowed |= set(range(ent + 4, ent + 112))
        for base, length in k.iovs:
            allowed |= set(range(base, base + length))
    return allowed


@fuzz_settings(300)
@given(
    before=st.lists(goods, max_size=5),
    after=st.lists(goods, min_size=1, max_size=3),
    kind=st.sampled_from(DEFECTS),
    warmup=st.integers(0, 12),
    data=st.data(),
)
def test_malformed_entries_fail_the_device_cleanly(
    before: list[Good], after: list[Good], kind: str, warmup: int, data: st.DataObject
) -> None:
    emu = KernelEmulator(cmdr_size=2048, data_blocks=8)
    # Move head and tail away from 0 first, so entries also meet the ring's end.
    ring0 = Ring(emu.buf)
    for _ in range(warmup):
        emu.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
        for cmd in ring0.fetch().commands:
            ring0.complete(cmd.cmd_id, abi.SAM_STAT_GOOD)
        emu.notify()
    ring0.release()
    ring = Ring(emu.buf)  # before a bad cmd_head, which the mailbox check would refuse
    reaped = len(emu.completions)

    def queue(g: Good) -> KernelCommand | None:
        return emu.submit(g.cdb, data_out=bytes([0xC3]) * g.data_out, data_in=g.data_in)

    first = [k for k in map(queue, before) if k is not None]
    bad = malformed(kind, emu, data, [k.cmd_id for k in first])
    if bad is None:
        emu.cmd_head = data.draw(
            st.integers(0, 2**32 - 1).filter(lambda h: h >= emu.cmdr_size or h % 8)
        )
        bad_at = None
    else:
        if not emu._space_for(bad.size):
            return
        bad_at = emu.inject(bad.size, bad.build)
        if bad.known_id is not None:
            # 6.1 looks any non-PAD, non-TMR slot up by id: let it find this one
            emu.commands[bad.known_id] = KernelCommand(
                0, bad.known_id, TUR, b"", 0, False, [], bad_at, bad.size, []
            )
    # Entries after one whose length runs past the head would be read as part of it.
    more = kind not in ("bad_head", "len_past_head")
    rest = [k for k in map(queue, after) if k is not None] if more else []
    fetched = [] if kind == "bad_head" else first + rest if kind == "unknown_op" else first
    event(f"{kind}, {len(first)} before, {len(rest)} after")

    snapshot = bytes(emu.buf)
    uio = EmulatedUio(emu)
    lun = LunState(block_size=BLOCK, num_blocks=BLOCKS, serial="f", naa=bytes([0x60]) + bytes(15))
    reported: list[str] = []
    device = Device(
        "fuzz", uio, ring, lun, RamBackend(BLOCKS * BLOCK),  # type: ignore[arg-type]
        workers=2, on_broken=lambda _d, why: reported.append(why),
    )  # fmt: skip
    with thread_failures() as failures:
        device.start()
        try:
            if kind == "unknown_op":
                wait_for(lambda: device.completed == len(fetched), "every command")
            else:
                wait_for(lambda: bool(reported), "the ring to be found broken")
                wait_for(lambda: device.completed == len(fetched), "the commands before it")
        finally:
            device.stop()
        assert not failures, failures

    if kind == "unknown_op":
        assert device.broken is None and not reported
        assert bad_at is not None and emu.buf[MAILBOX_SIZE + bad_at + 7] & abi.UFLAG_UNKNOWN_OP
    else:
        assert device.broken is not None and reported == [device.broken]
        assert one_line(device.broken)
    assert device.completed == len(fetched)
    # the kernel got every fetched command back once, with a status it accepts, and
    # nothing else
    assert emu.broken is None, emu.broken
    done = {c.tag: c.status for c in emu.completions[reaped:] if c.tag}
    assert set(done) == {k.tag for k in fetched}
    assert set(done.values()) <= {abi.SAM_STAT_GOOD, abi.SAM_STAT_CHECK_CONDITION}
    # and nothing outside what those commands own was written
    allowed = allowed_changes(emu, fetched)
    if bad_at is not None and kind == "unknown_op":
        allowed.add(MAILBOX_SIZE + bad_at + 7)
    after_bytes = bytes(emu.buf)
    changed = {i for i in range(len(after_bytes)) if after_bytes[i] != snapshot[i]}
    assert changed <= allowed, sorted(changed - allowed)[:10]
