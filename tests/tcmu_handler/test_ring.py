"""The ring against the kernel emulator: fetch, out-of-order completion, PAD, TMR,
READ_LEN, sense, malformed entries and misuse."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from targetvirt.errors import InvalidArgument, ProtocolError
from tcmu_handler import abi
from tcmu_handler.ring import Command, Ring, RingError, recovery_steps
from tests.tcmu_handler.kernel_emulator import (
    KernelCommand,
    KernelEmulator,
    round_up,
)

READ10 = bytes.fromhex("28000000000000000800")
WRITE10 = bytes.fromhex("2a000000000000000800")
TUR = bytes(6)
CHECK = abi.SAM_STAT_CHECK_CONDITION
GOOD = abi.SAM_STAT_GOOD


def fresh(**kw: int) -> tuple[KernelEmulator, Ring]:
    emu = KernelEmulator(**kw)
    return emu, Ring(emu.buf)


def fetch_all(ring: Ring) -> list[Command]:
    got = ring.fetch()
    assert got.broken is None, got.broken
    return got.commands


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 31 + i) & 0xFF for i in range(n))


def fill(cmd: Command, data: bytes) -> None:
    pos = 0
    for view in cmd.views():
        view[:] = data[pos : pos + len(view)].ljust(len(view), b"\0")
        pos += len(view)


# --- mailbox validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "words"),
    [
        (0, "<H", 1, "version is 1"),
        (2, "<H", 0x0E, "lack CAP_OOOC"),
        (4, "<I", 64, "cmdr_off 64"),
        (4, "<I", 132, "cmdr_off 132"),
        (8, "<I", 100, "cmdr_size 100"),
        (8, "<I", 1 << 20, "runs past"),
        (12, "<I", 4, "cmd_head 4"),
        (12, "<I", 3968, "cmd_head 3968"),
        (64, "<I", 4000, "cmd_tail 4000"),
    ],
)
def test_bad_mailbox_is_refused_with_a_clear_error(
    offset: int, fmt: str, value: int, words: str
) -> None:
    emu = KernelEmulator()
    struct.pack_into(fmt, emu.buf, offset, value)
    with pytest.raises(RingError, match=words) as err:
        Ring(emu.buf)
    assert isinstance(err.value, ProtocolError)


def test_tiny_or_readonly_buffers_are_refused() -> None:
    with pytest.raises(RingError, match="cannot hold"):
        Ring(bytearray(64))
    with pytest.raises(RingError, match="read-only"):
        Ring(memoryview(bytes(KernelEmulator().buf)))


# --- basic data path -------------------------------------------------------------------


def test_read_is_fetched_filled_and_gathered_by_the_kernel() -> None:
    emu, ring = fresh()
    k = emu.submit(READ10, data_in=3 * 4096)
    assert k is not None
    (cmd,) = fetch_all(ring)
    assert cmd.cmd_id == k.cmd_id
    assert cmd.cdb == READ10 + bytes(6)  # CDB slice runs to the entry end (8-aligned)
    assert cmd.iovs == ((emu.data_off, 3 * 4096),)  # adjacent blocks merged
    assert cmd.data_length == 3 * 4096
    fill(cmd, pattern(1, 3 * 4096))
    ring.complete(cmd.cmd_id, GOOD)
    assert ring.outstanding == 0
    (done,) = emu.notify()
    assert (done.tag, done.status, done.sense, done.data_in) == (
        k.tag,
        GOOD,
        None,
        pattern(1, 3 * 4096),
    )
    assert emu.blocks_in_use() == 0 and emu.broken is None


def test_write_data_out_views_hold_the_kernel_data_without_copy() -> None:
    emu, ring = fresh()
    data = pattern(7, 5000)
    emu.submit(WRITE10, data_out=data)
    (cmd,) = fetch_all(ring)
    views = cmd.views()
    assert b"".join(bytes(v) for v in views) == data
    assert all(isinstance(v, memoryview) and not v.readonly for v in views)
    views[0][0] = 0x99  # same memory as the buffer: no copy was made
    assert emu.buf[cmd.iovs[0][0]] == 0x99


def test_no_data_command_has_no_iovs() -> None:
    emu, ring = fresh()
    emu.submit(TUR)
    (cmd,) = fetch_all(ring)
    assert (cmd.iovs, cmd.bidi_iovs, cmd.views(), cmd.cdb) == ((), (), [], bytes(8))
    ring.complete(cmd.cmd_id, GOOD)
    assert emu.notify()[0].status == GOOD


def test_fragmented_data_area_gives_several_iovs() -> None:
    emu, ring = fresh()
    a, b, c = (emu.submit(READ10, data_in=4096) for _ in range(3))  # blocks 0, 1, 2
    assert a and b and c
    fetch_all(ring)
    ring.complete(b.cmd_id, GOOD)  # lands in a's slot (the tail), frees block 1
    assert [d.tag for d in emu.notify()] == [b.tag]
    d = emu.submit(WRITE10, data_out=pattern(3, 3 * 4096))
    assert d is not None
    (cmd,) = fetch_all(ring)
    base = emu.data_off
    assert cmd.iovs == ((base + 4096, 4096), (base + 3 * 4096, 8192)) == tuple(d.iovs)
    assert b"".join(bytes(v) for v in cmd.views()) == pattern(3, 3 * 4096)
    for cid in (cmd.cmd_id, a.cmd_id, c.cmd_id):
        ring.complete(cid, GOOD)
    assert sorted(x.tag for x in emu.notify()) == [a.tag, c.tag, d.tag]
    assert emu.broken is None and not emu.commands and emu.blocks_in_use() == 0


def test_bidi_command_splits_data_out_and_data_in() -> None:
    emu, ring = fresh()
    k = emu.submit(bytes([0x53]) + bytes(9), data_out=pattern(2, 4096), data_in=4096)
    assert k is not None and k.bidi
    (cmd,) = fetch_all(ring)
    assert len(cmd.iovs) == 1 and len(cmd.bidi_iovs) == 1
    assert bytes(cmd.views()[0]) == pattern(2, 4096)
    cmd.bidi_views()[0][:] = pattern(9, 4096)
    assert cmd.data_in_iovs() == cmd.bidi_iovs
    ring.complete(cmd.cmd_id, GOOD)
    assert emu.notify()[0].data_in == pattern(9, 4096)


# --- out-of-order completion, batches and wrap-around ----------------------------------


def test_out_of_order_completion_in_random_order_with_batches() -> None:
    rng = random.Random(5)
    emu, ring = fresh(cmdr_size=2048 - 128, data_blocks=64)
    expected: dict[int, tuple[int, bytes]] = {}
    done_tags: list[int] = []
    for _round in range(60):
        for _ in range(rng.randint(0, 6)):  # several entries per wake-up
            k = emu.submit(READ10, data_in=rng.choice([0, 512, 4096, 9000]))
            if k is None:
                break
        fetched = ring.fetch()
        assert fetched.broken is None
        pending = fetched.commands
        for cmd in pending:
            data = pattern(cmd.cmd_id + _round, cmd.data_length)
            fill(cmd, data)
            tag = emu.commands[cmd.cmd_id].tag
            expected[tag] = (rng.choice([GOOD, abi.SAM_STAT_BUSY]), data)
        rng.shuffle(pending)
        for cmd in pending:
            tag = emu.commands[cmd.cmd_id].tag
            ring.complete(cmd.cmd_id, expected[tag][0])
        for done in emu.notify():  # one notify for the whole batch
            status, data = expected[done.tag]
            assert done.status == status
            assert done.data_in == (data if data else None)
            done_tags.append(done.tag)
        assert emu.broken is None
        assert ring.cmd_tail == emu.cmd_tail == emu.last_cleaned
    assert sorted(done_tags) == sorted(expected)  # each exactly once
    assert len(expected) > 100


def test_held_commands_complete_later_across_many_wraps() -> None:
    rng = random.Random(11)
    emu, ring = fresh(cmdr_size=1000, data_blocks=8)  # not a multiple of 128: PADs
    held: list[Command] = []
    completed = 0
    pads = 0
    for _ in range(400):
        if emu.cmd_head + 128 > emu.cmdr_size:
            pads += 1
        emu.submit(WRITE10, data_out=b"w" * rng.choice([0, 100, 4096]))
        held += ring.fetch().commands
        rng.shuffle(held)
        while held and (len(held) > 3 or rng.random() < 0.3):
            ring.complete(held.pop().cmd_id, GOOD)
            completed += 1
        emu.notify()
        assert emu.broken is None
    assert pads > 10  # the PAD path really ran
    assert completed + len(held) == len(emu.completions) + len(emu.commands)


def test_pad_at_ring_end_is_skipped_and_tail_steps_over_it() -> None:
    emu, ring = fresh(cmdr_size=320)  # two 128-byte READs, then 64 bytes: a PAD
    a = emu.submit(READ10, data_in=512)
    b = emu.submit(READ10, data_in=512)
    assert a and b and emu.cmd_head == 256
    for cmd in fetch_all(ring):
        ring.complete(cmd.cmd_id, GOOD)
    emu.notify()
    c = emu.submit(READ10, data_in=512)  # 64 bytes left: PAD of 64, entry at 0
    assert c is not None and c.ring_offset == 0
    assert struct.unpack_from("<I", emu.buf, 128 + 256)[0] == 64 | abi.OP_PAD
    (cmd,) = fetch_all(ring)
    assert cmd.cmd_id == c.cmd_id
    ring.complete(cmd.cmd_id, GOOD)
    assert ring.cmd_tail == emu.cmd_head == 128
    assert emu.notify()[0].tag == c.tag


def test_tail_moves_past_a_trailing_pad_right_after_a_completion() -> None:
    emu, ring = fresh(cmdr_size=320)
    var_cdb = bytes([0x7F]) + bytes(6) + bytes([24]) + bytes(24)  # 32-byte CDB
    a = emu.submit(var_cdb)  # 144 bytes at 0
    b = emu.submit(READ10, data_in=512)  # 128 bytes at 144, head 272
    assert a and b
    fetch_all(ring)
    ring.complete(a.cmd_id, GOOD)
    emu.notify()
    c = emu.submit(TUR)  # 48 bytes left: PAD at 272, c at 0
    assert c is not None and c.ring_offset == 0
    fetch_all(ring)
    ring.complete(b.cmd_id, GOOD)  # slot at 144; the PAD behind it is skipped too
    assert ring.cmd_tail == 0
    assert [d.cmd_id for d in emu.notify()] == [b.cmd_id]


# --- responses ------------------------------------------------------------------------


def test_check_condition_sense_is_padded_to_96_bytes() -> None:
    emu, ring = fresh()
    emu.submit(READ10, data_in=4096)
    (cmd,) = fetch_all(ring)
    sense = bytes.fromhex("700005000000000a00000000240000000000")
    ring.complete(cmd.cmd_id, CHECK, sense)
    (done,) = emu.notify()
    assert done.status == CHECK and done.sense == sense + bytes(96 - len(sense))
    assert done.data_in is None  # no READ_LEN: the kernel returns no data


def test_read_len_returns_short_data_with_sense() -> None:
    emu, ring = fresh()
    k = emu.submit(READ10, data_in=8192)
    (cmd,) = fetch_all(ring)
    fill(cmd, pattern(4, 100))
    ring.complete(cmd.cmd_id, CHECK, b"\x70\x00\x05", read_len=100)
    (done,) = emu.notify()
    assert done.read_len == 100 and done.data_in == pattern(4, 100)
    assert done.sense is not None and done.sense[:3] == b"\x70\x00\x05"
    assert k is not None and done.tag == k.tag


def test_read_len_zero_or_unsupported_zero_fills_stale_bytes() -> None:
    for flags, read_len in ((0x0F, 0), (abi.CAP_OOOC, 10)):
        emu, ring = fresh(flags=flags)
        emu.submit(WRITE10, data_out=b"\xab" * 8192)  # leaves stale bytes behind
        ring.complete(fetch_all(ring)[0].cmd_id, GOOD)
        emu.notify()
        emu.submit(READ10, data_in=6000)
        (cmd,) = fetch_all(ring)
        assert bytes(cmd.views()[0][:4]) == b"\xab" * 4  # stale from the WRITE
        cmd.views()[0][:10] = b"0123456789"
        ring.complete(cmd.cmd_id, GOOD, read_len=read_len)
        (done,) = emu.notify()
        assert done.read_len is None
        assert done.data_in == (b"0123456789"[:read_len] + bytes(6000 - read_len))


def test_complete_of_unknown_or_completed_id_raises_and_changes_nothing() -> None:
    emu, ring = fresh()
    emu.submit(TUR)
    emu.submit(TUR)
    a, b = fetch_all(ring)
    ring.complete(a.cmd_id, GOOD)
    before = bytes(emu.buf)
    for bad in (a.cmd_id, 999, 0):
        with pytest.raises(RingError, match=f"command {bad}: it is not outstanding"):
            ring.complete(bad, GOOD)
    for kwargs in ({"status": 256}, {"status": -1}, {"sense": bytes(97)}, {"read_len": -1}):
        args = {"status": GOOD} | kwargs
        with pytest.raises(InvalidArgument):
            ring.complete(b.cmd_id, args.pop("status"), **args)  # type: ignore[arg-type]
    assert bytes(emu.buf) == before and ring.is_outstanding(b.cmd_id)
    ring.complete(b.cmd_id, GOOD)
    assert len(emu.notify()) == 2 and emu.broken is None


def test_complete_good_stops_at_an_unknown_id_with_the_ones_before_it_published() -> None:
    emu, ring = fresh()
    for _ in range(3):
        emu.submit(TUR)
    a, b, c = fetch_all(ring)
    with pytest.raises(RingError, match="command 999: it is not outstanding"):
        ring.complete_good([b.cmd_id, 999, a.cmd_id])
    assert ring.outstanding_ids() == [a.cmd_id, c.cmd_id]
    assert ring.cmd_tail == emu.cmd_tail  # b's response is visible to the kernel
    assert [d.status for d in emu.notify()] == [GOOD]
    ring.complete_good([c.cmd_id, a.cmd_id])
    assert len(emu.notify()) == 2 and emu.broken is None and not emu.commands


def test_fail_outstanding_completes_everything_with_busy() -> None:
    emu, ring = fresh()
    for _ in range(5):
        emu.submit(READ10, data_in=512)
    fetch_all(ring)
    assert ring.fail_outstanding() == 5
    assert [d.status for d in emu.notify()] == [abi.SAM_STAT_BUSY] * 5


def test_has_new_entries_peeks_without_fetching() -> None:
    emu, ring = fresh()
    assert not ring.has_new_entries()
    emu.submit(TUR)
    assert ring.has_new_entries()
    fetch_all(ring)
    assert not ring.has_new_entries()


# --- TMR ------------------------------------------------------------------------------


def test_tmr_reports_aborted_ids_that_are_still_outstanding() -> None:
    emu, ring = fresh()
    ks = [emu.submit(READ10, data_in=512) for _ in range(3)]
    cmds = fetch_all(ring)
    ring.complete(cmds[0].cmd_id, GOOD)  # done here, not yet seen by the kernel
    ids = [k.cmd_id for k in ks if k]
    assert emu.submit_tmr(abi.TMR_LUN_RESET, ids)
    emu.submit(TUR)
    got = ring.fetch()
    assert got.broken is None and len(got.commands) == 1
    assert got.tmrs == ((abi.TMR_LUN_RESET, (ids[1], ids[2])),)
    for cid in (ids[2], got.commands[0].cmd_id, ids[1]):
        ring.complete(cid, abi.SAM_STAT_TASK_ABORTED)
    assert len(emu.notify()) == 4 and emu.broken is None
    assert ring.cmd_tail == emu.cmd_head


# --- malformed entries ------------------------------------------------------------------


def cmd_entry(
    cmd_id: int,
    cdb: bytes,
    iovs: list[tuple[int, int]],
    *,
    length: int | None = None,
    op: int = abi.OP_CMD,
    cdb_at: int | None = None,
    iov_cnt: int | None = None,
) -> tuple[int, Callable[[int], bytes]]:
    base = max(48 + 16 * len(iovs), 112)
    size = base + round_up(len(cdb), 8)
    length = size if length is None else length

    def build(ent: int) -> bytes:
        raw = bytearray(size)
        struct.pack_into("<IHBB", raw, 0, length | op, cmd_id, 0, 0)
        n = len(iovs) if iov_cnt is None else iov_cnt
        struct.pack_into("<IIIxxxxQ", raw, 8, n, 0, 0, ent + (base if cdb_at is None else cdb_at))
        for i, iov in enumerate(iovs):
            struct.pack_into("<QQ", raw, 48 + 16 * i, *iov)
        raw[base : base + len(cdb)] = cdb
        return bytes(raw)

    return size, build


def broken_after(
    build: tuple[int, Callable[[int], bytes]], words: str, *, size: int | None = None
) -> tuple[KernelEmulator, Ring]:
    emu, ring = fresh()
    good = emu.submit(READ10, data_in=4096)
    emu.inject(size or build[0], build[1])
    got = ring.fetch()
    assert got.broken is not None and words in got.broken
    assert [c.cmd_id for c in got.commands] == [good.cmd_id if good else 0]
    assert ring.broken == got.broken and ring.fetch().commands == []
    # The good command before the bad entry can still be completed cleanly.
    ring.complete(got.commands[0].cmd_id, GOOD)
    assert len(emu.notify()) == 1 and emu.broken is None
    return emu, ring


def test_entry_shorter_than_a_response_is_broken() -> None:
    broken_after(cmd_entry(9, TUR, [], length=64), "below 112", size=120)


def test_entry_longer_than_published_is_broken() -> None:
    size, build = cmd_entry(9, TUR, [], length=400)
    broken_after((size, build), "length 400")


def test_zero_length_entry_is_broken() -> None:
    broken_after(cmd_entry(9, TUR, [], length=0), "length 0")


def test_cdb_off_outside_entry_is_broken() -> None:
    broken_after(cmd_entry(9, TUR, [], cdb_at=120), "cdb_off")
    broken_after(cmd_entry(9, TUR, [], cdb_at=-8), "cdb_off")
    broken_after(cmd_entry(9, TUR, [(4096, 10)], cdb_at=40), "cdb_off")  # over the iovs


def test_iov_outside_data_area_is_broken() -> None:
    total = len(KernelEmulator().buf)
    for iov in [(100, 8), (4096 - 8, 16), (total - 8, 16), (2**64 - 1, 2)]:
        broken_after(cmd_entry(9, READ10, [iov]), "outside the data area")
    broken_after(cmd_entry(9, READ10, [(4096, 8), (total, 1)]), "outside the data area")


def test_iov_count_overrunning_entry_is_broken() -> None:
    broken_after(cmd_entry(9, READ10, [(4096, 8)], iov_cnt=2**32 - 1), "overrun")


def test_duplicate_or_zero_cmd_id_is_broken() -> None:
    emu, ring = fresh()
    k = emu.submit(TUR)
    assert k is not None
    emu.inject(*cmd_entry(k.cmd_id, TUR, []))
    got = ring.fetch()
    assert got.broken is not None and "already outstanding" in got.broken
    broken_after(cmd_entry(0, TUR, []), "zero")


def test_short_tmr_is_broken() -> None:
    def tmr(ent: int) -> bytes:
        return struct.pack("<IHBBBxxxI", 40 | abi.OP_TMR, 0, 0, 0, 1, 5) + bytes(24)

    broken_after((40, tmr), "lists 5 ids")

    def tiny(ent: int) -> bytes:
        return struct.pack("<IHBB", 8 | abi.OP_TMR, 0, 0, 0)

    broken_after((8, tiny), "below 32")


def test_bad_cmd_head_is_broken() -> None:
    emu, ring = fresh()
    emu.cmd_head = 5
    got = ring.fetch()
    assert got.broken is not None and "cmd_head 5" in got.broken


def test_unknown_op_is_flagged_and_skipped() -> None:
    emu, ring = fresh()
    a = emu.submit(TUR)
    at = emu.inject(*cmd_entry(77, TUR, [], op=5))
    # In 6.1 the kernel looks the slot's id up like a CMD: let it know id 77.
    emu.commands[77] = KernelCommand(99, 77, TUR, b"", 0, False, [], at, 120, [])
    b = emu.submit(TUR)
    assert a and b
    got = ring.fetch()
    assert got.broken is None and [c.cmd_id for c in got.commands] == [a.cmd_id, b.cmd_id]
    assert emu.buf[128 + at + 7] == abi.UFLAG_UNKNOWN_OP
    ring.complete(b.cmd_id, GOOD)
    ring.complete(a.cmd_id, GOOD)
    done = emu.notify()
    assert [(d.cmd_id, d.unknown_op) for d in done] == [
        (b.cmd_id, False),
        (77, True),
        (a.cmd_id, False),
    ]
    assert emu.broken is None


def test_recovery_after_broken_ring_via_reset() -> None:
    emu, ring = broken_after(cmd_entry(9, TUR, [], length=0), "length 0")
    assert [s.attribute for s in recovery_steps()] == ["action/block_dev", "action/reset_ring"]
    emu.reset_ring()
    ring.release()
    ring = Ring(emu.buf)
    emu.submit(TUR)
    (cmd,) = fetch_all(ring)
    ring.complete(cmd.cmd_id, GOOD)
    assert len(emu.notify()) == 1


# --- never touch unallocated data pages ---------------------------------------------------


def test_ring_never_touches_unmapped_data_pages(tmp_path: object) -> None:
    """Data pages the kernel did not allocate SIGBUS. Model them with a file mmap whose
    file is then truncated to the ring: a read past it kills the child process."""
    code = textwrap.dedent(
        """
        import mmap, os, sys, tempfile
        sys.path.insert(0, os.getcwd())
        from tests.tcmu_handler.kernel_emulator import KernelEmulator
        from tcmu_handler.ring import Ring
        emu = KernelEmulator(cmdr_size=4096 - 128, data_blocks=4)
        # 120-byte entries: 33 fill 3960 bytes, so an 8-byte PAD sits at the ring
        # end, right before the data area
        while emu.submit(bytes(6)) is not None:
            pass
        with tempfile.TemporaryFile() as f:
            f.write(emu.buf)
            f.flush()
            mm = mmap.mmap(f.fileno(), len(emu.buf))
            f.truncate(4096)  # the data area is now "unallocated": SIGBUS on touch
            ring = Ring(mm)
            n = 0
            for _ in range(50):
                got = ring.fetch()
                assert got.broken is None, got.broken
                for cmd in got.commands:
                    assert cmd.views() == []
                    ring.complete(cmd.cmd_id, 0)
                    n += 1
                emu.buf[:4096] = mm[:4096]
                emu.notify()
                assert emu.broken is None, emu.broken
                while emu.submit(bytes(6)) is not None:
                    pass
                mm[:4096] = emu.buf[:4096]
            pad = int.from_bytes(mm[128 + 3960 : 128 + 3964], "little")
            assert pad == 8, pad  # the 8-byte PAD at the ring end was really read
            print("ok", n)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
