"""Property tests of the ring: a stateful kernel/handler interleaving against the
emulator, and arbitrary corruption of ring bytes (a fuzz target; both scale with
TV_FUZZ_SCALE)."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tcmu_handler import abi
from tcmu_handler.ring import Command, Ring, RingError
from tests.fuzzing import examples
from tests.tcmu_handler.kernel_emulator import KernelCommand, KernelEmulator, round_up

GOOD, CHECK, BUSY = abi.SAM_STAT_GOOD, abi.SAM_STAT_CHECK_CONDITION, abi.SAM_STAT_BUSY
OPCODES = [0x00, 0x28, 0x2A, 0x88, 0xA8, 0x7F]  # CDB lengths 6, 10, 10, 16, 12, variable


def make_cdb(opcode: int, tag_hint: int, var_len: int) -> bytes:
    if opcode == 0x7F:
        cdb = bytearray(8 + var_len)
        cdb[0], cdb[7] = 0x7F, var_len
    else:
        cdb = bytearray(16)
        cdb[0] = opcode
    cdb[1] = tag_hint & 0xFF  # makes CDBs of different commands differ
    return bytes(cdb)


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 7 + i * 13) & 0xFF for i in range(n))


@dataclass
class Expected:
    status: int
    sense: bytes | None
    data_in: bytes | None
    read_len: int | None


def expected_completion(
    k: KernelCommand, status: int, sense: bytes, read_len: int | None, written: bytes
) -> Expected:
    """What the 6.1 kernel hands LIO for this response (tcmu_handle_completion)."""
    padded_sense = sense.ljust(96, b"\0") if status == CHECK else None
    is_read = k.data_in_len > 0 and not k.bidi
    if k.bidi:
        data = written[: min(len(k.data_out), k.data_in_len)]
        return Expected(status, padded_sense, None if status == CHECK else data, None)
    if not is_read:
        return Expected(status, padded_sense, None, None)
    if read_len == 0:  # the ring zero-fills; the kernel returns everything
        written = bytes(k.data_in_len)
    if read_len:
        n = min(read_len, k.data_in_len)
        return Expected(status, padded_sense, written[:n], n)
    return Expected(status, padded_sense, None if status == CHECK else written, None)


class RingMachine(RuleBasedStateMachine):
    """Kernel submits and TMRs, handler fetches and completes in random order, the
    kernel reaps on notify; every command must complete exactly once, as sent."""

    def __init__(self) -> None:
        super().__init__()
        self.emu = KernelEmulator(cmdr_size=1000, data_blocks=12)
        self.ring = Ring(self.emu.buf)
        self.held: list[tuple[Command, KernelCommand]] = []
        self.expected: dict[int, Expected] = {}
        self.submitted: dict[int, KernelCommand] = {}
        self.completed: list[int] = []

    @rule(
        opcode=st.sampled_from(OPCODES),
        kind=st.sampled_from(["none", "read", "write", "bidi"]),
        size=st.integers(1, 3 * 4096 + 7),
        var_len=st.sampled_from([8, 16, 24]),
    )
    def kernel_submits(self, opcode: int, kind: str, size: int, var_len: int) -> None:
        cdb = make_cdb(opcode, len(self.submitted), var_len)
        out = pattern(len(self.submitted), size) if kind in ("write", "bidi") else b""
        data_in = size // 2 + 1 if kind == "bidi" else (size if kind == "read" else 0)
        k = self.emu.submit(cdb, data_out=out, data_in=data_in)
        if k is not None:
            self.submitted[k.tag] = k

    @rule(data=st.data(), tmr_type=st.sampled_from([abi.TMR_ABORT_TASK, abi.TMR_LUN_RESET]))
    def kernel_sends_tmr(self, data: st.DataObject, tmr_type: int) -> None:
        ids = sorted(self.emu.commands)
        chosen = data.draw(st.lists(st.sampled_from(ids), unique=True) if ids else st.just([]))
        self.emu.submit_tmr(tmr_type, chosen)

    @rule()
    def handler_fetches(self) -> None:
        got = self.ring.fetch()
        assert got.broken is None, got.broken
        for cmd in got.commands:
            k = self.emu.commands[cmd.cmd_id]
            assert cmd.cdb == k.cdb.ljust(round_up(len(k.cdb), 8), b"\0")
            assert list(cmd.iovs + cmd.bidi_iovs) == k.iovs
            if k.data_out:
                assert b"".join(bytes(v) for v in cmd.views()) == k.data_out
            self.held.append((cmd, k))
        owned = set(self.ring.outstanding_ids())
        for tmr in got.tmrs:
            assert set(tmr.cmd_ids) <= owned

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def handler_completes_some(self, data: st.DataObject) -> None:
        order = data.draw(st.permutations(range(len(self.held))))
        count = data.draw(st.integers(1, len(self.held)))
        together = data.draw(st.booleans())  # GOOD ones through complete_good, at the end
        good: list[int] = []
        for i in sorted(order[:count], reverse=True):
            cmd, k = self.held.pop(i)
            status = data.draw(st.sampled_from([GOOD, CHECK, BUSY]))
            sense = data.draw(st.binary(max_size=96)) if status == CHECK else b""
            reads = k.data_in_len > 0 and not k.bidi
            read_len = data.draw(st.none() | st.integers(0, k.data_in_len + 10)) if reads else None
            written = pattern(k.tag + 100, k.data_in_len)
            views = cmd.bidi_views() if k.bidi else (cmd.views() if reads else [])
            pos = 0
            for view in views:
                view[:] = written[pos : pos + len(view)]
                pos += len(view)
            self.expected[k.tag] = expected_completion(k, status, sense, read_len, written)
            if together and status == GOOD and read_len is None:
                good.append(cmd.cmd_id)
            else:
                self.ring.complete(cmd.cmd_id, status, sense, read_len)
        if good:
            self.ring.complete_good(good)

    @rule()
    def kernel_reaps(self) -> None:
        for done in self.emu.notify():
            exp = self.expected.pop(done.tag)
            assert (done.status, done.sense, done.data_in, done.read_len) == (
                exp.status,
                exp.sense,
                exp.data_in,
                exp.read_len,
            )
            self.completed.append(done.tag)
        assert not self.expected  # everything completed before the reap was reaped

    @invariant()
    def ring_and_kernel_agree(self) -> None:
        assert self.emu.broken is None, self.emu.broken
        assert self.ring.broken is None
        assert self.ring.cmd_tail == self.emu.cmd_tail
        assert self.ring.outstanding == len(self.held)
        assert {c.cmd_id for c, _ in self.held} <= set(self.emu.commands)
        assert len(self.completed) == len(set(self.completed))

    def teardown(self) -> None:
        self.handler_fetches()
        self.kernel_reaps()
        for cmd, _ in self.held:
            self.ring.complete(cmd.cmd_id, BUSY)
        self.held.clear()
        for done in self.emu.notify():
            assert (done.status, done.sense) == (BUSY, None)
            self.completed.append(done.tag)
        assert sorted(self.completed) == sorted(self.submitted)
        assert not self.emu.commands and self.emu.blocks_in_use() == 0
        assert self.ring.cmd_tail == self.emu.cmd_head


RingMachine.TestCase.settings = settings(
    max_examples=examples(60),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingStateful = RingMachine.TestCase


# --- corruption fuzz --------------------------------------------------------------------

ring_words = st.integers(32, 281).map(lambda i: i * 4)  # 4-aligned offsets in the ring
corruption = st.one_of(
    st.tuples(st.integers(0, 1127), st.just("<B"), st.integers(0, 0xFF)),
    st.tuples(ring_words, st.just("<I"), st.integers(0, 2**32 - 1)),
    st.tuples(st.integers(16, 140).map(lambda i: i * 8), st.just("<Q"), st.integers(0, 2**64 - 1)),
    # small values in header, count and offset fields are the interesting ones
    st.tuples(ring_words, st.just("<I"), st.integers(0, 1200)),
    st.tuples(ring_words, st.just("<I"), st.integers(4096, 4096 + 9 * 4096)),
    st.tuples(st.just(12), st.just("<I"), st.integers(0, 124).map(lambda i: i * 8)),  # head
)


def allowed_changes(snapshot: bytes, ring: Ring, start: int, cmds: list[Command]) -> set[int]:
    """Bytes the ring may write: the tail, response fields of fetched CMD slots, the
    flag byte of unknown ops, and (zero-fill) the fetched commands' own iovecs."""
    allowed = set(range(64, 68))
    # The ring as the (maybe corrupted) mailbox places it: a cmdr_off other than 128 made
    # this walk read zero lengths at the wrong place, for ever (TV_FUZZ_SCALE=3 found it).
    cmdr_off = struct.unpack_from("<I", snapshot, 4)[0]
    off = start
    while off != ring.fetch_cursor:
        ent = cmdr_off + off
        len_op = struct.unpack_from("<I", snapshot, ent)[0]
        if len_op & 7 == abi.OP_CMD:
            allowed |= set(range(ent + 4, ent + 112))
        elif len_op & 7 not in (abi.OP_PAD, abi.OP_TMR):
            allowed.add(ent + 7)
        off = (off + (len_op & ~7)) % ring.cmdr_size
    for cmd in cmds:
        for base, length in cmd.iovs + cmd.bidi_iovs:
            allowed |= set(range(base, base + length))
    return allowed


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
    done_first=st.integers(0, 6),
    hits=st.lists(corruption, min_size=1, max_size=12),
    seed=st.integers(0, 2**32),
)
def test_corrupted_ring_never_escapes_or_writes_outside_its_slots(
    sizes: list[int], done_first: int, hits: list[tuple[int, str, int]], seed: int
) -> None:
    rng = random.Random(seed)
    emu = KernelEmulator(cmdr_size=1000, data_blocks=8)
    # Move head and tail away from 0 first, so corruption also meets wrapped rings.
    ring0 = Ring(emu.buf)
    for _ in range(done_first):
        emu.submit(bytes(6))
        for cmd in ring0.fetch().commands:
            ring0.complete(cmd.cmd_id, GOOD)
        emu.notify()
    ring0.release()
    for n in sizes:
        emu.submit(bytes([0x28]) + bytes(9), data_in=n) or emu.submit(bytes(6))
    for at, fmt, value in hits:
        if at + struct.calcsize(fmt) <= 128 + emu.cmdr_size:
            struct.pack_into(fmt, emu.buf, at, value)
    snapshot = bytes(emu.buf)
    try:
        ring = Ring(emu.buf)
    except RingError:
        event("mailbox refused")
        assert bytes(emu.buf) == snapshot
        return
    start = ring.fetch_cursor
    got = ring.fetch()
    lo, hi = ring.data_area
    for cmd in got.commands:
        assert 128 + ring.cmdr_size <= lo and hi == len(emu.buf)
        assert all(lo <= b and b + n <= hi for b, n in cmd.iovs + cmd.bidi_iovs)
        assert [len(v) for v in cmd.views()] == [n for _, n in cmd.iovs]
    rng.shuffle(got.commands)
    for cmd in got.commands:
        ring.complete(cmd.cmd_id, rng.choice([GOOD, CHECK]), b"\x70", rng.choice([None, 0, 5]))
    again = ring.fetch()
    assert again.broken == got.broken
    event("broken" if got.broken else f"clean, {min(len(got.commands), 3)}+ commands")
    if got.broken is None:
        assert ring.cmd_tail == ring.fetch_cursor or not got.commands
    after = bytes(emu.buf)
    allowed = allowed_changes(snapshot, ring, start, got.commands + again.commands)
    changed = {i for i in range(len(after)) if after[i] != snapshot[i]}
    assert changed <= allowed, sorted(changed - allowed)[:10]


# --- the one-iovec command, parsed on the fast path -------------------------------------


@settings(max_examples=examples(300), deadline=None)
@given(
    # each field mostly right, sometimes out of line, so that about half are valid
    id_kind=st.sampled_from(["fresh"] * 6 + ["zero", "outstanding"]),
    length=st.sampled_from([112, 120, 128, 400] * 3 + [64, 104]),
    cdb_at=st.one_of(st.just(112), st.just(64), st.integers(-16, 136)),
    iov_cnt=st.sampled_from([1] * 6 + [0, 2]),
    bidi=st.sampled_from([0] * 6 + [1]),
    base_delta=st.one_of(st.just(0), st.integers(-24, 24)),
    base_at=st.sampled_from(["lo", "hi"]),
    iov_len=st.sampled_from([0, 8, 512, 4096]),
)
def test_one_iovec_commands_follow_the_abi_rules(
    id_kind: str,
    length: int,
    cdb_at: int,
    iov_cnt: int,
    bidi: int,
    base_delta: int,
    base_at: str,
    iov_len: int,
) -> None:
    """A command entry built byte by byte with one field or another out of line: the
    ring takes it (id, CDB, iovec as written) exactly when the ABI's rules hold, and
    otherwise reports the ring broken without taking it.  The everyday one-iovec command
    has a parser of its own (:meth:`Ring.fetch`); this holds it to the same rules as
    every other entry."""
    emu = KernelEmulator(cmdr_size=4096 - 128, data_blocks=64)
    ring = Ring(emu.buf)
    held = emu.submit(bytes(6))  # a TEST UNIT READY left outstanding
    assert held is not None
    (first,) = ring.fetch().commands
    lo, hi = ring.data_area
    base = (lo if base_at == "lo" else hi - iov_len) + base_delta
    cmd_id = {"fresh": first.cmd_id + 1, "zero": 0, "outstanding": first.cmd_id}[id_kind]
    cdb = bytes.fromhex("28000000000000000800") + bytes(6)

    def build(ent: int) -> bytes:
        raw = bytearray(max(length, 128))
        struct.pack_into("=IHBB", raw, 0, length | abi.OP_CMD, cmd_id, 0, 0)
        struct.pack_into("=IIIxxxxQ", raw, 8, iov_cnt, bidi, 0, ent + cdb_at)
        struct.pack_into("=QQ", raw, 48, base % 2**64, iov_len)
        raw[112:128] = cdb
        return bytes(raw[:length])

    ent = 128 + emu.inject(length, build)
    got = ring.fetch()
    count = iov_cnt + bidi
    valid = (
        length >= 112
        and cmd_id != 0
        and id_kind != "outstanding"
        and 48 + 16 * count <= length
        and 48 + 16 * count <= cdb_at < length
        and (count == 0 or (lo <= base and base + iov_len <= hi))
        and count <= 1  # a second iovec is zeros: offset 0, outside the data area
    )
    event("taken" if valid else "refused")
    if not valid:
        assert got.broken is not None and got.commands == []
        return
    assert got.broken is None, got.broken
    (cmd,) = got.commands
    assert cmd.cmd_id == cmd_id
    assert cmd.cdb == bytes(emu.buf[ent + cdb_at : ent + length])
    iovs = ((base, iov_len),) if count else ()
    assert (cmd.iovs, cmd.bidi_iovs) == ((iovs, ()) if not bidi else ((), iovs))
    ring.complete(cmd.cmd_id, abi.SAM_STAT_GOOD)
    ring.complete(first.cmd_id, abi.SAM_STAT_GOOD)
    assert ring.outstanding == 0 and ring.cmd_tail == ring.fetch_cursor
