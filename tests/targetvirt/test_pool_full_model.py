"""Random I/O into a nearly full pool, as CDBs, against a model of which writes must fail.

The pool starts with 6 segments, its soft threshold at 50 %.  Writes (some FUA),
UNMAPs, SYNCHRONIZE CACHEs go to vdisks ``a`` (redirect on write) and ``b`` (copy on
write), their snapshots and clones; snapshots, clones, deletes and new containers happen
in between.  The model predicts every command's outcome -- GOOD, or SPACE ALLOCATION
FAILED WRITE PROTECT for exactly the writes that need a segment when none can be had --
and when the soft-threshold unit attention must be pending on every LUN of the pool.

It mirrors the engine's accounting rule for rule: references dropped since the last
commit still count (a segment is free only once the commit that dropped its last
reference is durable), commits happen at flushes, FUA, management operations,
copy-mode copy-on-write, and when the allocator finds the pool full with references
waiting to settle.  After every step every vdisk reads back as the model says and the
refcounts equal a recount.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.targetvirt.engine_model import SEG, check_refcounts, data_for
from tests.targetvirt.faults import (
    GOOD,
    SOFT_THRESHOLD,
    SPACE_ALLOCATION_FAILED,
    STACKS,
    ScsiLun,
    Stack,
    outcome,
)

SEGMENTS = 6
THRESHOLD = 50
SIZES = {"a": 5 * SEG, "b": 4 * SEG}
COW = {"a": "redirect", "b": "copy"}
MAX_DISKS = 7
MAX_SEGMENTS = 14
BLOCK = 512


class PoolModel:
    """Segments as integers; ``refs`` counts the table references, ``pend`` the ones
    dropped since the last commit (the engine still counts those)."""

    def __init__(self) -> None:
        self.total = SEGMENTS
        self.data = {n: bytearray(size) for n, size in SIZES.items()}
        self.table: dict[str, list[int | None]] = {n: [None] * (s // SEG) for n, s in SIZES.items()}
        self.mode = dict(COW)
        self.readonly: set[str] = set()
        self.refs: Counter[int] = Counter()
        self.pend: Counter[int] = Counter()
        self.next_id = 0
        self.above = False
        self.crossed = False  # the threshold was reached during the current step

    def engine_refs(self, seg: int) -> int:
        return self.refs[seg] + self.pend[seg]

    def free(self) -> int:
        used = {s for s in set(self.refs) | set(self.pend) if self.engine_refs(s) > 0}
        return self.total - len(used)

    def threshold(self) -> None:
        above = (self.total - self.free()) * 100 >= THRESHOLD * self.total
        if above and not self.above:
            self.crossed = True
        self.above = above

    def commit(self) -> None:
        self.pend.clear()
        self.refs = +self.refs  # drops zero counts
        self.threshold()

    def allocate(self) -> int | None:
        if self.free() == 0 and +self.pend:
            self.commit()  # the allocator settles dropped references and tries again
        if self.free() == 0:
            return None
        seg = self.next_id
        self.next_id += 1
        self.refs[seg] = 1
        self.threshold()
        return seg

    def drop(self, seg: int) -> None:
        self.refs[seg] -= 1
        self.pend[seg] += 1

    def fault(self, name: str, index: int) -> bool:
        """What Catalog.fault does for a write to entry ``index``; False: pool full."""
        table = self.table[name]
        seg = table[index]
        if seg is None:
            new = self.allocate()
            if new is None:
                return False
            table[index] = new
            return True
        if self.engine_refs(seg) == 1:
            return True
        if self.mode[name] == "copy":
            others = [
                n for n, tb in self.table.items() if n != name and index < len(tb)
                and tb[index] == seg
            ]  # fmt: skip
            if not others:
                self.commit()  # shared only through a dropped reference
                return True
            new = self.allocate()
            if new is None:
                return self.engine_refs(seg) == 1
            for n in others:
                self.table[n][index] = new
                self.drop(seg)
            self.refs[new] = len(others)
            self.commit()  # the sharers durably point at the copy before the write
            return True
        new = self.allocate()
        if new is None:
            return self.engine_refs(seg) == 1  # settled meanwhile: written in place
        table[index] = new
        self.drop(seg)
        return True

    def write(self, name: str, offset: int, data: bytes, fua: bool) -> bool:
        first, last = offset // SEG, (offset + len(data) - 1) // SEG
        for index in range(first, last + 1):
            seg = self.table[name][index]
            if (seg is None or self.engine_refs(seg) > 1) and not self.fault(name, index):
                return False
        self.data[name][offset : offset + len(data)] = data
        if fua:
            self.commit()
        return True

    def unmap(self, name: str, first: int, count: int) -> None:
        for index in range(first, first + count):
            seg = self.table[name][index]
            if seg is not None:
                self.table[name][index] = None
                self.drop(seg)
        self.data[name][first * SEG : (first + count) * SEG] = bytes(count * SEG)

    def copy(self, source: str, name: str, readonly: bool) -> None:
        self.commit()
        self.data[name] = bytearray(self.data[source])
        self.table[name] = list(self.table[source])
        self.mode[name] = self.mode[source]
        for seg in self.table[name]:
            if seg is not None:
                self.refs[seg] += 1
        if readonly:
            self.readonly.add(name)
        self.commit()

    def delete(self, name: str) -> None:
        for seg in self.table.pop(name):
            if seg is not None:
                self.drop(seg)
        del self.data[name], self.mode[name]
        self.readonly.discard(name)
        self.commit()


class PoolFullMachine(RuleBasedStateMachine):
    KIND = "engine"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tv-full-")
        self.s: Stack = STACKS[self.KIND](self.dir, dict(SIZES), segments=SEGMENTS, cow=dict(COW))
        self.s.catalog.set_threshold("p", THRESHOLD)
        self.luns: dict[str, ScsiLun] = {n: self.s.lun(n) for n in SIZES}
        self.m = PoolModel()
        self.counter = 0

    def teardown(self) -> None:
        self.s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _writable(self, pick: int) -> str:
        names = sorted(n for n in self.m.data if n not in self.m.readonly)
        return names[pick % len(names)]

    # --- I/O ---------------------------------------------------------------------------

    @rule(pick=st.integers(0, 9), where=st.floats(0, 1), blocks=st.integers(1, 2 * SEG // BLOCK),
          seed=st.integers(0, 2**32), fua=st.booleans())  # fmt: skip
    def write(self, pick: int, where: float, blocks: int, seed: int, fua: bool) -> None:
        name = self._writable(pick)
        size = len(self.m.data[name])
        offset = int(where * (size // BLOCK - 1)) * BLOCK
        data = data_for(seed, min(blocks * BLOCK, size - offset))
        expected = GOOD if self.m.write(name, offset, data, fua) else SPACE_ALLOCATION_FAILED
        assert outcome(self.luns[name].write(offset, data, fua=fua)) == expected

    @rule(pick=st.integers(0, 9), first=st.integers(0, 4), count=st.integers(1, 2))
    def unmap(self, pick: int, first: int, count: int) -> None:
        name = self._writable(pick)
        n = len(self.m.table[name])
        first = min(first, n - 1)
        count = min(count, n - first)
        self.m.unmap(name, first, count)
        assert outcome(self.luns[name].unmap(first * SEG, count * SEG)) is GOOD

    @rule(pick=st.integers(0, 9))
    def sync(self, pick: int) -> None:
        name = self._writable(pick)
        self.m.commit()
        assert outcome(self.luns[name].sync()) is GOOD

    # --- management --------------------------------------------------------------------

    @precondition(lambda self: len(self.m.data) < MAX_DISKS)
    @rule(pick=st.integers(0, 9), readonly=st.booleans())
    def copy(self, pick: int, readonly: bool) -> None:
        source = self._writable(pick)
        self.counter += 1
        if readonly:
            name = f"{source}@s{self.counter}"
            self.s.snapshot(source, f"s{self.counter}")
        else:
            name = f"c{self.counter}"
            self.s.clone(source, name)
        self.m.copy(source, name, readonly)
        if not readonly:
            self.luns[name] = self.s.lun(name)

    @precondition(lambda self: len(self.m.data) > len(SIZES))
    @rule(pick=st.integers(0, 9))
    def delete(self, pick: int) -> None:
        names = sorted(
            n for n in self.m.data
            if n not in SIZES and not any(o.startswith(n + "@") for o in self.m.data)
        )  # fmt: skip
        name = names[pick % len(names)]
        self.s.delete(name)
        self.m.delete(name)
        lun = self.luns.pop(name, None)
        if lun is not None and lun in getattr(self.s, "luns", []):
            self.s.luns.remove(lun)  # type: ignore[attr-defined]

    @precondition(lambda self: self.m.total < MAX_SEGMENTS)
    @rule(segments=st.integers(1, 3))
    def add_container(self, segments: int) -> None:
        self.s.add_container(self.dir, segments)
        self.m.total += segments
        self.m.commit()

    # --- checks ------------------------------------------------------------------------

    @invariant()
    def soft_threshold_reported_exactly_when_reached(self) -> None:
        want = (SOFT_THRESHOLD,) if self.m.crossed else ()
        for name, lun in self.luns.items():
            assert lun.lun.pending_unit_attentions == want, name
            lun.lun.take_unit_attention()
        self.m.crossed = False

    @invariant()
    def contents_and_accounting(self) -> None:
        for name, expected in self.m.data.items():
            assert self.s.catalog.vdisk(name).read(0, len(expected)) == expected, name
        assert self.s.pool.free_segments() == self.m.free()
        check_refcounts(self.s.catalog)


class AgentPoolFullMachine(PoolFullMachine):
    KIND = "agent"


SETTINGS = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip
TestEngineFullPool = PoolFullMachine.TestCase
TestEngineFullPool.settings = SETTINGS
TestAgentFullPool = AgentPoolFullMachine.TestCase
TestAgentFullPool.settings = SETTINGS
