"""Agents: serve vdisk I/O from volatile table copies, obey the controller's commands.

An :class:`Agent` runs beside the data path (in the TCMU handler process).  For each vdisk
it serves it holds an :class:`AgentVDisk`: a copy of the table as packed entries carrying
the agents' annotations (state bits, SHARED), and the containers, opened by the agent
itself.  Every LBA is resolved locally.  Only when an entry cannot be used as it is does
the I/O involve the controller:

* invalid entry -> fetch the entries around it;
* write to an unallocated or SHARED entry -> fault (the controller allocates or COWs in
  its master table and returns the private entry);
* write to a NOWRITE entry -> wait until its state changes, at most ``frozen_timeout``,
  then :class:`~targetvirt.errors.FrozenTimeout`.

Coherence rests on two rules:

1. *Drain*: a command that changes what an I/O may use (state, entries, block, delay,
   size) is applied under the vdisk lock, and acknowledged only after every I/O admitted
   before it has finished.  I/O waiting for a fetch, a fault or a thaw is not "in
   flight": it holds no mapping, so a drain never waits for the controller (no deadlock).
2. *Newest wins*: every change of the table (a command, or a reply installed) bumps an
   epoch and logs its index range.  A reply is installed only if nothing touched its
   range since its request was sent; otherwise the I/O simply retries.  The controller
   orders its replies and commands, so a stale reply can only ever lose.

In-flight I/O is counted in two counters selected by the parity of a generation number;
a drain bumps the generation and waits for the old counter to reach zero, so a steady
stream of new I/O cannot starve it.

A live snapshot's freeze and MarkShared over a whole table (one FreezeShared command) are
flags (O(1) in the freeze window); they are spelled out into entry bits at the first
install that follows.

Gate: while the vdisk is blocked, delayed, suspended (re-registering) or, for writes,
inside a COMPARE AND WRITE, new I/O queues with a ticket; a flush waits for every queued
I/O with an earlier ticket, so releasing the queue never reorders writes against a flush.

Lease: writes are admitted only before ``lease.until`` (agent clock, counted from when the
renewal was *sent*, so it ends before the controller's view of it).  Reads of usable
entries go on after expiry.

Controller outage: an I/O that needs the controller (a lease, a fetch, a fault) and
cannot reach it waits for it, at most ``controller_wait`` seconds, before it fails with
the "no lease / unreachable" error (NOT READY, ASYMMETRIC ACCESS STATE TRANSITION).  A
controller restart or a short partition then holds writes instead of failing them: a
single-path Linux initiator does not retry that sense, the application would see EIO.
The wait never admits a write without a lease; keep it below the LUN's command timeout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.clock import Clock, MonotonicClock
from targetvirt.container import DATA_OFFSET, Container, ContainerLabel
from targetvirt.errors import (
    ContainerIOError,
    ControllerUnreachable,
    FrozenTimeout,
    InvalidArgument,
    LeaseExpired,
    NotFound,
    ProtocolError,
    ReadOnly,
    SessionLost,
    TargetvirtError,
    lba_out_of_range,
)
from targetvirt.threads import name_this_thread
from targetvirt.transport import ControllerLink
from targetvirt.vdisk import Cursor, check_synced

# Looked up as module globals on the fast path; tests replace them to hold an I/O in flight.
_preadv = os.preadv
_pwritev = os.pwritev

# the fast paths read these as module globals (no attribute lookups)
_MAPPED, _PSEG_MASK, _CID_SHIFT, _CID_MASK = t.MAPPED, t.PSEG_MASK, t.CID_SHIFT, t.CID_MASK
_READ_STOP = t.MAPPED | t.INVALID_BIT  # a read goes straight through iff e & this == MAPPED
_WRITE_STOP = t.MAPPED | t.INVALID_BIT | t.NOWRITE_BIT | t.SHARED  # same for a write
_ALL = 1 << 62  # "every index" in the change log
FETCH_SPAN = t.CHUNK_ENTRIES  # entries fetched around an invalid one
LOAD_SPAN = 1 << 16  # entries per fetch when (re)loading a whole table
UNMAP_SPAN = 1 << 16
_LOG_LENGTH = 64
_SESSION_RETRIES = 3
_SLICE = 1 << 16  # entries per slice of a bulk table pass
FAILURE_REPORT_INTERVAL = 1.0  # seconds between two reports of one failing container
RETRY_PAUSE = 0.5  # seconds between two attempts of an I/O waiting for the controller

READ, WRITE, CAW_WRITE = 0, 1, 2  # admission modes: a CAW's own write passes its own hold
_FETCH, _FAULT, _WAIT, _DESCRIBE = "fetch", "fault", "wait", "describe"

Extent = tuple[Container | None, int, int]
R = TypeVar("R", bound=p.Reply)


def _any_nowrite(entries: array[int]) -> bool:
    if len(entries) == 1:
        return bool(entries[0] & t.NOWRITE_BIT)
    return bool(np.any(np.frombuffer(entries, dtype=np.uint64) & np.uint64(t.NOWRITE_BIT)))


def _nbytes(bufs: Sequence[memoryview]) -> int:
    return sum(memoryview(b).nbytes for b in bufs)


class _NotAlone(Exception):
    """A COMPARE AND WRITE that started alone is no longer: start again, with the controller."""


class Lease:
    """Until when (agent clock) this agent may admit writes."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = -math.inf


class _Need:
    """Why an I/O cannot be admitted yet, and which entry it is about."""

    __slots__ = ("covered", "index", "kind")

    def __init__(self, kind: str, index: int, covered: bool = False) -> None:
        self.kind = kind
        self.index = index
        self.covered = covered


class _Grant:
    """One admitted request: its in-flight counter, its extents, its queue ticket."""

    __slots__ = ("extents", "parity", "ticket")

    def __init__(self) -> None:
        self.parity = -1
        self.extents: list[Extent] = []
        self.ticket: int | None = None


class AgentVDisk:
    """One vdisk served by an agent: byte-addressed I/O for the SCSI layer.

    Methods may be called from several threads at once.  Buffers are byte memoryviews.
    """

    def __init__(self, agent: Agent, name: str) -> None:
        self.agent = agent
        self.name = name
        self._clock = agent.clock
        # time.monotonic itself when the clock is the real one: one C call on the fast path
        self._now = time.monotonic if type(agent.clock) is MonotonicClock else agent.clock.now
        self._lease = agent.lease
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._drain_lock = threading.Lock()  # one drain (generation flip) at a time
        self._caw_lock = threading.Lock()
        # the table copy and what resolving it needs
        self._entries = array("Q")
        self.size = 0
        self.readonly = True
        self._set_geometry(1 << 20)
        self.uuid = ""  # the vdisk's identity, from the controller
        self._containers: dict[int, Container] = {}
        self._fds: list[int] = []
        self._objects = False  # some container has no file (RADOS): the object path may apply
        self._synced: dict[int, int] = {}  # per container: failed flushes accounted for
        # in-flight accounting
        self._active = [0, 0]
        self._gen = 0
        self._draining = 0
        # change log for "newest wins"
        self._epoch = 0
        self._log: deque[tuple[int, int, int]] = deque(maxlen=_LOG_LENGTH)
        self._resizes = 0
        # the gate
        self._suspended = True  # until loaded
        self._blocked = False
        self._delay_until: float | None = None
        self._caw = 0
        self._solo = False  # the controller said no other agent may write this vdisk
        self._dropped = False
        self._frozen_all = False  # NOWRITE on every entry, held as one flag
        self._shared_all = False  # SHARED on every mapped entry, held as one flag
        self._nowrite_marks = False  # some entry may carry its own NOWRITE bit
        # How long each freeze of the whole table held writes here, in seconds: from the
        # change that stopped admitting writes to the one that admitted them again (a live
        # copy's window as this gateway's initiators saw it, without the network legs).
        self.freezes_held: deque[float] = deque(maxlen=1024)
        self._frozen_at: float | None = None
        self._read_open = False
        self._write_open = False
        self._write_fast = False  # the fast path's flag: open and not wholly frozen
        self._next_ticket = 0
        self._held: set[int] = set()
        # called when the vdisk's pool reaches its soft threshold (the LUNs serving it)
        self.soft_threshold_listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<AgentVDisk {self.name} of {self.agent.agent_id}>"

    def _set_geometry(self, segment_size: int) -> None:
        self._segment_size = segment_size
        self._shift = segment_size.bit_length() - 1
        self._mask = segment_size - 1

    @property
    def segment_size(self) -> int:
        return self._segment_size

    # --- reads -------------------------------------------------------------------------

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` with the bytes at ``offset`` (unallocated ranges read as zeros)."""
        if self.try_read_into(offset, bufs):
            return
        if not (self._objects and self._try_object_io(offset, bufs, False)):
            self._read_slow(offset, bufs)

    def try_read_into(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """The fast path alone: one lookup, bit tests, one preadv -- no round trip, no
        lease, nothing to wait for.  False (nothing done) when it does not apply."""
        return len(bufs) == 1 and self.try_batch(((False, offset, bufs[0]),))[0]

    def try_batch(self, batch: Sequence[tuple[bool, int, memoryview]]) -> list[bool]:
        """Several fast-path transfers (``(write, offset, buffer)``) at once: each is one
        ``preadv``/``pwritev`` of an entry that needs nothing else (see
        :meth:`try_read_into`, :meth:`try_write_from`), or is not done at all (False).

        The lookups share one hold of the lock and the transfers one in-flight count, so
        a batch takes the lock twice instead of each transfer twice, and reads the clock
        for the lease once, at its first write (a batch of reads reads none).  (On
        Python 3.11 every lock acquisition reads the clock, a system call where the
        clock source has no vDSO, as in a TCG guest.)
        """
        ok = [False] * len(batch)
        plan: list[tuple[int, bool, int, int, memoryview]] = []
        lock = self._lock
        with lock:
            g = self._gen & 1
            self._plan(batch, plan)
            if not plan:
                return ok
            self._active[g] += len(plan)  # in flight: a drain waits for them
        try:
            for i, write, fd, pos, buf in plan:
                try:
                    done = (_pwritev if write else _preadv)(fd, (buf,), pos)
                except OSError:
                    continue  # the slow path does it again and names the error
                ok[i] = done == buf.nbytes
        finally:
            with lock:
                self._active[g] -= len(plan)
                if self._draining:
                    self._cond.notify_all()
        return ok

    def _plan(
        self,
        batch: Sequence[tuple[bool, int, memoryview]],
        plan: list[tuple[int, bool, int, int, memoryview]],
    ) -> None:
        """Under the lock: append ``(index, write, fd, file offset, buffer)`` for each
        transfer of ``batch`` the fast path can do."""
        seg, mask, shift, size = self._segment_size, self._mask, self._shift, self.size
        entries, fds, readable = self._entries, self._fds, self._read_open
        writable: bool | None = None  # known at the first write: reads need no clock
        for i, (write, offset, buf) in enumerate(batch):
            n = buf.nbytes
            intra = offset & mask
            if intra + n > seg or offset < 0 or offset + n > size:
                continue
            if write:
                if writable is None:
                    writable = self._write_fast and self._now() < self._lease.until
                if not writable:
                    continue
            elif not readable:
                continue
            e = entries[offset >> shift]
            cid = (e >> _CID_SHIFT) & _CID_MASK
            # a container without a file descriptor (RADOS) has no fast path: say so
            # before paying for a failing syscall and its exception on every command
            if e & (_WRITE_STOP if write else _READ_STOP) != _MAPPED or cid >= len(fds):
                continue
            fd = fds[cid]
            if fd >= 0:
                plan.append((i, write, fd, DATA_OFFSET + (e & _PSEG_MASK) * seg + intra, buf))

    def _read_slow(self, offset: int, bufs: Sequence[memoryview]) -> None:
        grant = self._admit(offset, _nbytes(bufs), READ)
        try:
            parts = Cursor(bufs)
            for c, coff, n in grant.extents:
                views = parts.take(n)
                if c is None:
                    for v in views:
                        v[:] = bytes(len(v))
                else:
                    c.readv(views, coff)
        finally:
            self._release(grant)

    # --- writes ------------------------------------------------------------------------

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        """Write the concatenation of ``bufs`` at ``offset``; with ``fua``, durably."""
        if not fua and self.try_write_from(offset, bufs):
            return
        if fua or not (self._objects and self._try_object_io(offset, bufs, True)):
            self._write_slow(offset, bufs, fua, WRITE)

    def try_write_from(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """The fast path alone: a private, normal, allocated entry under a lease -- one
        pwritev.  False (nothing done) when it does not apply."""
        return len(bufs) == 1 and self.try_batch(((True, offset, bufs[0]),))[0]

    def _try_object_io(self, offset: int, bufs: Sequence[memoryview], write: bool) -> bool:
        """The fast path on a container without a file (RADOS objects): the checks of
        :meth:`try_read_into` / :meth:`try_write_from`, then the container's own call, with
        no grant, ticket or extent list.  It waits on the network, so only a caller that
        may wait (a worker, never the ring thread) comes here.  False (nothing done, or a
        failure the slow path will name) when it does not apply."""
        target = self._object_target(offset, bufs, write)
        if target is None:
            return False
        c, coff, g = target
        try:
            if write:
                c.writev(bufs, coff)
            else:
                c.readv(bufs, coff)
            done = True
        except ContainerIOError:
            done = False  # the slow path does it again and names the error
        finally:
            self._landed(g)
        return done

    def start_io(
        self, offset: int, bufs: Sequence[memoryview], write: bool, done: Callable[[bool], None]
    ) -> bool:
        """The object fast path without waiting: start the container's asynchronous I/O
        and return at once; ``done(ok)`` is called from the storage client's thread when
        it ends (ok False: nothing is known, the slow path must do the command again and
        name the error).  False, with nothing started, when the fast path does not apply
        or the container has no asynchronous I/O.  The ring thread calls this."""
        target = self._object_target(offset, bufs, write)
        if target is None:
            return False
        c, coff, g = target

        def landed(ok: bool) -> None:
            self._landed(g)  # before the command completes: a drain covers the I/O
            done(ok)

        try:
            started = c.start_io(bufs, coff, write, landed)
        except BaseException:
            self._landed(g)
            raise
        if not started:
            self._landed(g)
        return started

    def _object_target(
        self, offset: int, bufs: Sequence[memoryview], write: bool
    ) -> tuple[Container, int, int] | None:
        """For the object fast path: the container, its offset and the drain generation
        the I/O is counted in (undo with :meth:`_landed`); None when it does not apply."""
        n = bufs[0].nbytes if len(bufs) == 1 else _nbytes(bufs)
        intra = offset & self._mask
        if intra + n > self._segment_size or offset < 0:
            return None
        if write and self._now() >= self._lease.until:
            return None
        with self._lock:
            if offset + n > self.size or not (self._write_fast if write else self._read_open):
                return None
            e = self._entries[offset >> self._shift]
            if e & (_WRITE_STOP if write else _READ_STOP) != _MAPPED:
                return None
            c = self._containers.get((e >> _CID_SHIFT) & _CID_MASK)
            if c is None or c.fd >= 0:  # a file's fast path is the other one
                return None
            g = self._gen & 1
            self._active[g] += 1  # in flight: a drain waits for it
        return c, c.offset_of(e & _PSEG_MASK) + intra, g

    def _landed(self, g: int) -> None:
        with self._lock:
            self._active[g] -= 1
            if self._draining:
                self._cond.notify_all()

    def _write_slow(self, offset: int, bufs: Sequence[memoryview], fua: bool, mode: int) -> None:
        if self.readonly:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        grant = self._admit(offset, _nbytes(bufs), mode)
        try:
            parts = Cursor(bufs)
            for c, coff, n in grant.extents:
                assert c is not None
                c.writev(parts.take(n), coff)
        finally:
            self._release(grant)
        if fua:
            self.agent.flush()
            self._check_synced()

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros; ``unmap``: whole segments may be deallocated."""
        if self.readonly:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        self._check_range(offset, length)
        end, runs = offset + length, list[list[int]]()
        while offset < end:
            index, intra = offset >> self._shift, offset & self._mask
            n = min(end - offset, self._segment_size - intra)
            whole = intra == 0 and n >= min(self._segment_size, self.size - offset)
            if unmap and whole:
                if runs and runs[-1][1] == index:
                    runs[-1][1] = index + 1
                else:
                    runs.append([index, index + 1])
            else:
                self._zero(offset, n, allocate=not unmap)
            offset += n
        for lo, hi in runs:
            for start in range(lo, hi, UNMAP_SPAN):
                self._deallocate(start, min(hi, start + UNMAP_SPAN))

    def _zero(self, offset: int, length: int, allocate: bool) -> None:
        if not allocate and not self._is_mapped(offset >> self._shift):
            return  # unallocated reads as zeros already
        grant = self._admit(offset, length, WRITE)
        try:
            for c, coff, n in grant.extents:
                assert c is not None
                c.zero(coff, n)
        finally:
            self._release(grant)

    def _is_mapped(self, index: int) -> bool:
        while True:
            with self._cond:
                e = self._entries[index]
                if not e & t.INVALID_BIT:
                    return bool(e & t.MAPPED)
                epoch = self._epoch
            self._satisfy(_Need(_FETCH, index), epoch)

    def _deallocate(self, lo: int, hi: int) -> None:
        """Ask the controller to drop entries ``[lo, hi)``; waits out a freeze like a write."""
        grant = _Grant()
        since: float | None = None
        first: float | None = None  # when it began to wait for the controller
        try:
            while True:
                began = self._now()
                try:
                    with self._cond:
                        if not self._enter_gate(WRITE, grant):
                            continue
                        self._check_lease()
                        frozen = np.flatnonzero(self._view(lo, hi) & np.uint64(t.NOWRITE_BIT))
                        if frozen.size or self._frozen_all:
                            since = self._wait_writable(
                                lo + int(frozen[0]) if frozen.size else lo, since
                            )
                            continue
                        epoch = self._epoch
                    reply = self._request(
                        lambda s: p.Unmap(self.agent.agent_id, s, self.name, lo, hi - lo),
                        p.TableRange,
                    )
                except LeaseExpired as e:
                    first = began if first is None else first
                    self.agent.await_controller(first, e)  # or raises
                    self.agent.revive()
                    continue
                self._install(reply.start, reply.entries, epoch)
                got = np.frombuffer(reply.entries, dtype=np.uint64)
                if not np.any(got & np.uint64(t.NOWRITE_BIT)):
                    return  # else the controller is frozen: wait for the thaw and retry
        finally:
            self._finish(grant)

    def compare_and_write(self, offset: int, verify: memoryview, write: memoryview) -> int | None:
        """Atomically (against every write to those bytes, through any agent): if the bytes
        at ``offset`` equal ``verify``, write ``write``.  Returns None when written, else
        the offset of the first differing byte.

        Alone on the vdisk (the controller's Solo), the local hold suffices.  Otherwise the
        controller holds every other agent's writes to the segments covered (Exclusive)
        for the compare and the write.  Why an agent that joins while a local one runs
        cannot write mid-way: the controller tells the agent writing alone Solo(False)
        before the newcomer's Register or Attach returns (so before it can fetch a single
        entry), and that command is acknowledged only after a drain, which waits for the
        COMPARE AND WRITE in flight (its read, compare and write happen inside one
        admitted write, and it finds out it is no longer alone under the lock once
        admitted: then it starts again with the controller).
        """
        if self.readonly:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        n = memoryview(verify).nbytes
        if memoryview(write).nbytes != n:
            raise InvalidArgument("COMPARE AND WRITE needs verify and write data of one length")
        if not n:
            return None
        self._check_range(offset, n)
        with self._caw_lock:
            while True:
                if self._solo:
                    with contextlib.suppress(_NotAlone):
                        return self._caw_locally(offset, verify, write, None)
                    continue
                return self._caw_exclusive(offset, verify, write)

    def _caw_exclusive(self, offset: int, verify: memoryview, write: memoryview) -> int | None:
        aid, name = self.agent.agent_id, self.name
        lo, hi = offset >> self._shift, ((offset + len(verify) - 1) >> self._shift) + 1
        sent = self._now()
        grant = self._request(lambda s: p.Exclusive(aid, s, name, lo, hi - lo), p.LeaseGrant)
        try:
            return self._caw_locally(offset, verify, write, sent + grant.seconds)
        finally:
            # Best effort: if it is lost, the hold runs out by itself at the controller
            # (its lease), and a later Exclusive of this agent replaces it.
            with contextlib.suppress(TargetvirtError):
                self._request(lambda s: p.EndExclusive(aid, s, name), p.Done)

    def _caw_locally(
        self, offset: int, verify: memoryview, write: memoryview, until: float | None
    ) -> int | None:
        """Compare and write under the local hold (no other write of this agent runs).
        ``until``: the end of the controller's exclusive hold (None: alone, which must
        still hold once the write is admitted, else :class:`_NotAlone`)."""
        self._change(0, 0, self._hold_writes, drain=True, log=False)
        try:
            # Admitted as a write first (faults done, counted in flight), then read,
            # compared and written through that one grant: a drain (Solo(False), a hold)
            # waits for all three and never for the controller.
            grant = self._admit(offset, len(verify), CAW_WRITE)
            try:
                with self._lock:
                    if until is None and not self._solo:
                        raise _NotAlone
                    if until is not None and self._now() >= until:
                        raise LeaseExpired(
                            f"the exclusive hold for a COMPARE AND WRITE to {self.name} ran out"
                        )
                current = bytearray(len(verify))
                parts = Cursor([memoryview(current)])
                for c, coff, k in grant.extents:
                    assert c is not None
                    c.readv(parts.take(k), coff)
                if current != verify:
                    a = np.frombuffer(current, dtype=np.uint8)
                    b = np.frombuffer(verify, dtype=np.uint8)
                    return int(np.flatnonzero(a != b)[0])
                parts = Cursor([memoryview(write)])
                for c, coff, k in grant.extents:
                    assert c is not None
                    c.writev(parts.take(k), coff)
                return None
            finally:
                self._release(grant)
        finally:
            self._change(0, 0, self._release_writes, drain=False, log=False)

    def _hold_writes(self) -> None:
        self._caw += 1

    def _release_writes(self) -> None:
        self._caw -= 1

    # --- flush and metadata --------------------------------------------------------------

    def flush(self) -> None:
        """Make every write completed so far durable (containers, then the metadata)."""
        grant = _Grant()
        try:
            with self._cond:
                while not self._enter_gate(READ, grant):
                    pass
                if grant.ticket is not None:
                    # queued I/O that arrived before this flush completes before it
                    while any(x < grant.ticket for x in self._held):
                        self._cond.wait()
            self.agent.flush()
        finally:
            self._finish(grant)
        self._check_synced()

    def _check_synced(self) -> None:
        """Fail the flush if a container this vdisk has data in failed a flush since this
        vdisk's previous one (see :meth:`targetvirt.vdisk.VDisk.flush`)."""
        with self._lock:
            containers = dict(self._containers)

        def entries() -> npt.NDArray[np.uint64]:
            with self._lock:
                return self._view(0, len(self._entries)).copy()

        check_synced(self.name, self._synced, containers, entries)

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Consecutive (offset, length, mapped) runs covering the range (GET LBA STATUS)."""
        while True:
            with self._cond:
                self._check_range(offset, length)
                first, last = offset >> self._shift, (offset + length - 1) >> self._shift
                bad = np.flatnonzero(self._view(first, last + 1) & np.uint64(t.INVALID_BIT))
                if not bad.size or not length:
                    return self._runs(offset, length)
                epoch = self._epoch
            self._satisfy(_Need(_FETCH, first + int(bad[0])), epoch)

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        end = offset + length
        while offset < end:
            index = offset >> self._shift
            n = min(end - offset, ((index + 1) << self._shift) - offset)
            mapped = bool(self._entries[index] & t.MAPPED)
            if runs and runs[-1][2] == mapped:
                o, m, _ = runs[-1]
                runs[-1] = (o, m + n, mapped)
            else:
                runs.append((offset, n, mapped))
            offset += n
        return runs

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise lba_out_of_range(offset, length)

    def _view(self, lo: int, hi: int) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self._entries, dtype=np.uint64)[lo:hi]

    # --- admission -----------------------------------------------------------------------

    def _admit(self, offset: int, length: int, mode: int) -> _Grant:
        """Wait until every entry of the range is usable, then count the I/O in flight."""
        grant = _Grant()
        since: float | None = None
        revived = False
        first: float | None = None  # when it began to wait for the controller
        try:
            while True:
                began = self._now()
                try:
                    with self._cond:
                        if not self._enter_gate(mode, grant):
                            continue
                        if mode != READ and not self._now() < self._lease.until and not revived:
                            revived = True  # try once to get a lease back, outside the lock
                            need = None
                        else:
                            if mode != READ:
                                self._check_lease()
                            need = self._resolve(offset, length, mode)
                        if isinstance(need, list):
                            grant.parity = self._gen & 1
                            self._active[grant.parity] += 1
                            grant.extents = need
                            return grant
                        if need is not None and need.kind is _WAIT:
                            since = self._wait_writable(need.index, since)
                            continue
                        epoch = self._epoch
                    if need is None:
                        self.agent.revive()
                    else:
                        self._satisfy(need, epoch)
                except LeaseExpired as e:  # no lease, or no controller: wait, within a bound
                    first = began if first is None else first
                    self.agent.await_controller(first, e)  # or raises
                    revived = False
        except BaseException:
            self._finish(grant)
            raise

    def _enter_gate(self, mode: int, grant: _Grant) -> bool:
        """Under the lock: True if the gate is open for ``mode``; else wait one step
        (queued with a ticket) and return False so the caller re-checks everything.
        """
        if self._read_open and (mode in (READ, CAW_WRITE) or self._write_open):
            if mode == CAW_WRITE and self.readonly:
                raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
            return True
        if self._dropped:
            raise NotFound(f"vdisk {self.name} is no longer served by agent {self.agent.agent_id}")
        if self.readonly and mode != READ:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        if grant.ticket is None:
            grant.ticket = self._next_ticket
            self._next_ticket += 1
            self._held.add(grant.ticket)
        if self._suspended and not self.agent.connected:
            # nobody is re-registering: this I/O tries, outside the lock
            self._lock.release()
            try:
                self.agent.reconnect(None)
            finally:
                self._lock.acquire()
            return False
        deadline = self._delay_until
        if deadline is not None and self._now() >= deadline:
            self._delay_until = None  # the delay ends by itself
            self._regate()
            self._cond.notify_all()
            return False
        self._clock.wait(self._cond, deadline)
        return False

    def _check_lease(self) -> None:
        if not self._now() < self._lease.until:
            raise LeaseExpired(
                f"agent {self.agent.agent_id} has no controller lease: writes to {self.name} "
                "are refused"
            )

    def _resolve(self, offset: int, length: int, mode: int) -> list[Extent] | _Need:
        """Under the lock: the extents of the range, or the first reason it cannot go yet.

        A COMPARE AND WRITE's segments are never faulted as ``covered`` (zeroed, not
        copied): it may miscompare and write nothing.
        """
        self._check_range(offset, length)
        write = mode != READ
        entries, shift, mask, seg = self._entries, self._shift, self._mask, self._segment_size
        out: list[Extent] = []
        while length:
            index, intra = offset >> shift, offset & mask
            n = min(length, seg - intra)
            e = entries[index]
            if write and self._frozen_all:
                return _Need(_WAIT, index)
            if e & t.INVALID_BIT:
                return _Need(_FETCH, index)
            if write:
                if e & t.NOWRITE_BIT:
                    return _Need(_WAIT, index)
                if e & (t.MAPPED | t.SHARED) != t.MAPPED or self._shared_all:
                    last = (offset + length - 1) >> shift
                    covered = (
                        mode == WRITE and n == seg and self._ready_to_write(index + 1, last + 1)
                    )
                    return _Need(_FAULT, index, covered=covered)
            if e & t.MAPPED:
                c = self._containers.get(t.cid_of(e))
                if c is None:
                    return _Need(_DESCRIBE, index)
                out.append((c, c.offset_of(t.pseg_of(e)) + intra, n))
            else:
                out.append((None, 0, n))
            offset += n
            length -= n
        return out

    def _ready_to_write(self, lo: int, hi: int) -> bool:
        """Under the lock: whether entries ``[lo, hi)`` can be written with no round trip.

        A fault may zero a segment the write covers instead of copying it (``covered``)
        only if no later fault of the same write can fail (a full pool): a failed write
        must leave the old data, not zeros.
        """
        if lo >= hi:
            return True
        if self._shared_all:
            return False
        stop = np.uint64(t.INVALID_BIT | t.NOWRITE_BIT | t.SHARED)
        view = self._view(lo, hi)
        return bool(np.all((view & np.uint64(t.MAPPED)) != 0) and not np.any(view & stop))

    def _wait_writable(self, index: int, since: float | None) -> float:
        """Under the lock: wait (one step) for a NOWRITE entry to change, within the bound."""
        now = self._now()
        since = now if since is None else since
        bound = self.agent.frozen_timeout
        if now >= since + bound:
            raise FrozenTimeout(
                f"a write to {self.name} waited {bound:g} s for entry {index} to be thawed"
            )
        self._clock.wait(self._cond, since + bound)
        return since

    def _satisfy(self, need: _Need, epoch: int) -> None:
        """Outside the lock: the round trip that makes the entry usable (or fresher)."""
        aid, name, index = self.agent.agent_id, self.name, need.index
        if need.kind is _FETCH:
            start = index - index % FETCH_SPAN
            rng = self._fetch(start, max(0, min(FETCH_SPAN, len(self._entries) - start)))
            self._install(rng.start, rng.entries, epoch)
        elif need.kind is _FAULT:
            covered = need.covered
            reply = self._request(lambda s: p.Fault(aid, s, name, index, covered), p.FaultReply)
            self._install(reply.index, array("Q", [reply.entry]), epoch)
        else:
            info = self._request(lambda s: p.Attach(aid, s, name), p.VDiskInfo)
            with self._cond:
                self._open_containers(info)
                if t.cid_of(self._entries[index]) not in self._containers:
                    raise ProtocolError(f"{name} entry {index} names an unknown container")

    def _request(self, make: Callable[[int], p.Request], kind: type[R]) -> R:
        return self.agent.request(make, kind)

    def _fetch(self, start: int, count: int) -> p.TableRange:
        aid, name = self.agent.agent_id, self.name
        return self._request(lambda s: p.Fetch(aid, s, name, start, count), p.TableRange)

    def _install(self, lo: int, values: array[int], since: int) -> bool:
        """Install entries from a reply unless something newer touched them meanwhile."""
        hi = lo + len(values)
        with self._cond:
            if hi > len(self._entries) or self._conflicts(since, lo, hi):
                return False
            self._spell_out()
            self._entries[lo:hi] = values
            self._note_change(lo, hi)
            if not self._nowrite_marks and _any_nowrite(values):
                self._nowrite_marks = True
            self._cond.notify_all()
            return True

    def _conflicts(self, since: int, lo: int, hi: int) -> bool:
        if self._epoch == since:
            return False
        log = self._log
        if not log or log[0][0] > since + 1:
            return True  # the log no longer reaches back to the request
        return any(ep > since and a < hi and lo < b for ep, a, b in log)

    def _note_change(self, lo: int, hi: int) -> None:
        self._epoch += 1
        self._log.append((self._epoch, lo, hi))

    def _release(self, grant: _Grant) -> None:
        with self._cond:
            self._active[grant.parity] -= 1
            if grant.ticket is not None:
                self._held.discard(grant.ticket)
                self._cond.notify_all()
            elif self._draining:
                self._cond.notify_all()

    def _finish(self, grant: _Grant) -> None:
        """A request that ends without having been counted in flight leaves the queue."""
        if grant.ticket is not None:
            with self._cond:
                self._held.discard(grant.ticket)
                self._cond.notify_all()
            grant.ticket = None

    # --- commands ------------------------------------------------------------------------

    def apply(self, cmd: p.Command) -> None:
        """Apply one controller command; returns once what it requires has drained."""
        if isinstance(cmd, p.SetState):
            self._set_state(cmd.start, cmd.count, cmd.state)
        elif isinstance(cmd, p.Update):
            self._update(cmd.indexes, cmd.entries)
        elif isinstance(cmd, p.MarkShared):
            self._change(0, _ALL, functools.partial(setattr, self, "_shared_all", True), drain=True)
        elif isinstance(cmd, p.FreezeShared):
            self._set_state(0, _ALL, cmd.state, shared=True)
        elif isinstance(cmd, p.Block):
            self._change(0, 0, functools.partial(setattr, self, "_blocked", True), drain=True)
        elif isinstance(cmd, p.Unblock):
            self._change(0, 0, functools.partial(setattr, self, "_blocked", False), drain=False)
        elif isinstance(cmd, p.Delay):
            until = self._now() + cmd.seconds
            self._change(0, 0, functools.partial(setattr, self, "_delay_until", until), drain=True)
        elif isinstance(cmd, p.CancelDelay):
            self._change(0, 0, functools.partial(setattr, self, "_delay_until", None), drain=False)
        elif isinstance(cmd, p.DropVDisk):
            self._change(0, _ALL, functools.partial(setattr, self, "_dropped", True), drain=True)
        elif isinstance(cmd, p.Resize):
            self._change(0, _ALL, functools.partial(self._resize, cmd.size), drain=True)
        elif isinstance(cmd, p.Solo):
            # no longer alone: drain, so that a COMPARE AND WRITE admitted alone finishes
            # before the ack lets another agent in
            solo = functools.partial(setattr, self, "_solo", cmd.alone)
            self._change(0, 0, solo, drain=not cmd.alone, log=False)
        elif isinstance(cmd, p.SoftThreshold):
            for listener in list(self.soft_threshold_listeners):
                listener()
        else:  # pragma: no cover - the decoder only yields known commands
            raise ProtocolError(f"unknown command {type(cmd).__name__}")

    def _change(
        self, lo: int, hi: int, fn: Callable[[], None], *, drain: bool, log: bool = True
    ) -> None:
        with self._drain_lock, self._cond:
            fn()
            if log:
                self._note_change(lo, hi)
            self._regate()
            self._cond.notify_all()
            if not drain:
                return
            parity = self._gen & 1
            self._gen += 1
            self._draining += 1
            try:
                while self._active[parity]:
                    self._cond.wait()
            finally:
                self._draining -= 1

    def _regate(self) -> None:
        self._read_open = not (
            self._suspended or self._blocked or self._dropped or self._delay_until is not None
        )
        self._write_open = self._read_open and not self._caw and not self.readonly
        self._write_fast = self._write_open and not self._frozen_all and not self._shared_all

    def _set_state(self, start: int, count: int, state: int, *, shared: bool = False) -> None:
        """``shared``: and mark every mapped entry SHARED, in the same change and drain
        (a live copy's freeze, :class:`~targetvirt.protocol.FreezeShared`)."""
        lo, hi = min(start, len(self._entries)), min(start + count, len(self._entries))
        whole = lo == 0 and hi == len(self._entries)

        def change() -> None:
            if shared:
                self._shared_all = True
            if whole and state == t.NOWRITE:
                # A freeze of the whole table is one flag, not a pass over every entry:
                # it is what a live snapshot does, inside its freeze window.
                self._frozen_all = True
                if self._frozen_at is None:
                    self._frozen_at = self._now()
                return
            view = self._view(lo, hi)
            if state == t.NOWRITE:
                view |= np.uint64(t.NOWRITE_BIT)
                self._nowrite_marks = True
            elif state == t.INVALID:
                view |= np.uint64(t.INVALID_BIT)
            else:
                if whole:
                    self._frozen_all = False
                    if self._frozen_at is not None:
                        self.freezes_held.append(self._now() - self._frozen_at)
                        self._frozen_at = None
                elif self._frozen_all:
                    # a thaw in pieces (around a COMPARE AND WRITE hold): turn the
                    # flag into bits, so that each piece lifts its own range only
                    self._spell_out()
                if self._nowrite_marks:
                    view &= np.uint64(~t.NOWRITE_BIT & (2**64 - 1))
                    self._nowrite_marks = not whole

        self._change(lo, _ALL if shared else hi, change, drain=state != t.NORMAL)

    def _update(self, indexes: array[int], entries: array[int]) -> None:
        if not indexes:
            return

        def change() -> None:
            self._spell_out()
            table, n = self._entries, len(self._entries)
            for i, e in zip(indexes, entries, strict=True):
                if i < n:
                    table[i] = e
            if not self._nowrite_marks and _any_nowrite(entries):
                self._nowrite_marks = True

        self._change(min(indexes), max(indexes) + 1, change, drain=True)

    def _spell_out(self) -> None:
        """Under the lock, before installing entries: turn the whole-table flags into bits.

        A live snapshot sets them in O(1) inside its freeze window (freeze, MarkShared);
        the pass over every entry happens here, at the first install after it -- usually
        the first copy-on-write fault, outside the window.  An installed entry carries the
        state the controller wants for it (its annotation), which may differ from its
        neighbours' (a migration hold that happened to cover a one-entry table, say).
        """
        if self._frozen_all:
            view = self._view(0, len(self._entries))
            view |= np.uint64(t.NOWRITE_BIT)
            self._frozen_all = False
            self._nowrite_marks = True
            self._regate()
        if self._shared_all:
            self._mark_shared()
            self._shared_all = False
            self._regate()

    def _mark_shared(self) -> None:
        # MAPPED is bit 63, SHARED bit 58: shifting right by 5 lands one on the other.  In
        # cache-sized slices with one scratch buffer.
        view = self._view(0, len(self._entries))
        scratch = np.empty(min(len(view), _SLICE), dtype=np.uint64)
        for start in range(0, len(view), _SLICE):
            part = view[start : start + _SLICE]
            s = scratch[: len(part)]
            np.right_shift(part, np.uint64(63 - 58), out=s)
            np.bitwise_and(s, np.uint64(t.SHARED), out=s)
            np.bitwise_or(part, s, out=part)

    def _resize(self, size: int) -> None:
        n_old, n_new = len(self._entries), -(-size // self._segment_size)
        entries = array("Q", self._entries[: min(n_old, n_new)])
        entries.extend(array("Q", [t.INVALID_BIT]) * (n_new - len(entries)))
        self._entries = entries
        self.size = size
        self._resizes += 1

    # --- (re)loading -----------------------------------------------------------------------

    def _suspend(self) -> None:
        """Close the gate and drain: nothing uses this table any more (re-registration).

        The controller's block and delay belonged to the old session; a new one pushes
        them again if they still hold.
        """

        def suspend() -> None:
            self._suspended, self._blocked, self._delay_until = True, False, None
            self._solo = False  # the new session says again whether it writes alone
            self._frozen_all = False  # the new session's fetches carry any freeze
            self._shared_all = False  # ... and the sharing

        self._change(0, _ALL, suspend, drain=True)

    def _resume(self) -> None:
        with self._cond:
            self._suspended = False
            self._regate()
            self._cond.notify_all()

    def _load(self) -> None:
        """Describe and fetch the whole table from the controller, then open the gate."""
        aid, name = self.agent.agent_id, self.name
        while True:
            with self._cond:
                resizes = self._resizes
            info = self._request(lambda s: p.Attach(aid, s, name), p.VDiskInfo)
            with self._cond:
                if self._resizes != resizes:
                    continue  # a resize raced with the description: describe again
                self._configure(info)
                n = len(self._entries)
            break
        for start in range(0, n, LOAD_SPAN):
            count = min(LOAD_SPAN, n - start)
            while True:
                with self._cond:
                    epoch = self._epoch
                rng = self._fetch(start, count)
                if self._install(rng.start, rng.entries, epoch):
                    break
        self._resume()

    def _configure(self, info: p.VDiskInfo) -> None:
        """Under the lock: geometry, containers and an all-invalid table of the right size."""
        self._set_geometry(info.segment_size)
        self.uuid = info.uuid
        self.size = info.size
        self.readonly = info.readonly
        self._entries = array("Q", [t.INVALID_BIT]) * (-(-info.size // info.segment_size))
        self._nowrite_marks = False
        self._note_change(0, _ALL)
        self._open_containers(info)
        self._regate()

    def _open_containers(self, info: p.VDiskInfo) -> None:
        for ci in info.containers:
            if ci.cid not in self._containers:
                c = self._containers[ci.cid] = self.agent.container(ci)
                self._synced.setdefault(ci.cid, c.sync_errors)
        top = max(self._containers, default=-1) + 1
        fds = [-1] * top
        for cid, c in self._containers.items():
            fds[cid] = c.fd
        self._fds = fds
        self._objects = any(c.fd < 0 for c in self._containers.values())

    @property
    def waits_on_network(self) -> bool:
        """Some of its I/O waits for a network round trip (a container without a file:
        RADOS), so the handler gives it more workers than a file-backed vdisk needs."""
        return self._objects

    # --- inspection (tests, management) ------------------------------------------------

    def entry(self, index: int) -> int:
        """The agent's annotated entry at ``index`` (the whole-table flags included)."""
        with self._lock:
            e = self._entries[index] | (t.NOWRITE_BIT if self._frozen_all else 0)
            return e | (t.SHARED if self._shared_all and e & t.MAPPED else 0)

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def delayed(self) -> bool:
        return self._delay_until is not None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._active[0] + self._active[1]


class Agent:
    """The agent role of one process: its session with the controller and its vdisks.

    ``frozen_timeout``: how long a write waits for a NOWRITE entry before failing (0: at
    once).  ``controller_wait``: how long an I/O that needs the controller (a lease, a
    fetch, a fault) waits for it when it cannot reach it, before failing (0: at once).
    ``connect`` registers; ``serve`` adds a vdisk; ``start`` runs the lease keeper (renews
    every third of the lease, re-registers when the session is lost).
    """

    def __init__(
        self,
        agent_id: str,
        link: ControllerLink,
        *,
        host: str | None = None,
        clock: Clock | None = None,
        frozen_timeout: float = 30.0,
        controller_wait: float = 0.0,
    ) -> None:
        self.agent_id = agent_id
        self.controller_wait = controller_wait
        self.host = host if host is not None else socket.gethostname()
        self.link = link
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.frozen_timeout = frozen_timeout
        self.lease = Lease()
        self.lease_seconds = 0.0
        self.session = 0
        self.registrations = 0
        self._stream_down = 0  # the session whose command stream broke, if any
        self._vdisks: dict[str, AgentVDisk] = {}
        self._containers: dict[tuple[str, int], Container] = {}
        self._reported: dict[tuple[str, int], float] = {}  # container -> last failure report
        self._session_lock = threading.RLock()
        self._registry_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._keeper_cond = threading.Condition()
        self._lease_cond = threading.Condition()  # notified when a lease is granted
        self._closed = False

    def __repr__(self) -> str:
        return f"<Agent {self.agent_id} session {self.session:#x}>"

    @property
    def connected(self) -> bool:
        return self.session != 0

    # --- session -------------------------------------------------------------------------

    def connect(self, vdisks: Iterable[str] = ()) -> None:
        """Register with the controller and load every vdisk named (and any served)."""
        with self._registry_lock:
            for name in vdisks:
                self._vdisks.setdefault(name, AgentVDisk(self, name))
        with self._session_lock:
            self._register()

    def serve(self, name: str) -> AgentVDisk:
        """Start serving a vdisk (registers first if needed); returns it loaded."""
        with self._session_lock:
            with self._registry_lock:
                vdisk = self._vdisks.get(name)
                if vdisk is None or vdisk._dropped:
                    vdisk = self._vdisks[name] = AgentVDisk(self, name)
            if not self.connected:
                self._register()
            else:
                self._load_or_drop(vdisk)
        if vdisk._dropped:
            raise NotFound(f"no vdisk named {name!r} on the controller")
        return vdisk

    def release(self, name: str) -> None:
        """Stop serving a vdisk."""
        with self._registry_lock:
            vdisk = self._vdisks.pop(name, None)
        if vdisk is None:
            return
        vdisk.apply(p.DropVDisk(0, name))
        if self.connected:
            # if this fails the controller fences or forgets us anyway; it is dropped here
            with contextlib.suppress(TargetvirtError):
                self.request(lambda s: p.Detach(self.agent_id, s, name), p.Done)

    def vdisk(self, name: str) -> AgentVDisk:
        try:
            return self._vdisks[name]
        except KeyError:
            raise NotFound(f"agent {self.agent_id} does not serve {name!r}") from None

    @property
    def vdisks(self) -> dict[str, AgentVDisk]:
        return dict(self._vdisks)

    def reconnect(self, stale: int | None) -> None:
        """Re-register unless someone already did since session ``stale`` was lost
        (``None``: only if not connected)."""
        with self._session_lock:
            if self._closed:
                raise ControllerUnreachable(f"agent {self.agent_id} is closed")
            if (stale is None and self.connected) or (stale is not None and self.session != stale):
                return
            self._register()

    def _register(self) -> None:
        """(Re)join: quiesce everything, register, open the command stream, reload tables.

        Quiescing first is what lets the controller treat a registration as the end of
        the agent's previous session (no I/O uses the old tables any more).
        """
        vdisks = list(self._vdisks.values())
        for v in vdisks:
            v._suspend()
        self.session = 0
        self.lease.until = -math.inf
        try:
            sent = self.clock.now()
            reply = self.link.call(p.Register(self.agent_id, self.host, tuple(self._vdisks)))
            if isinstance(reply, p.Refused):
                p.raise_refused(reply)
            if not isinstance(reply, p.Registered):
                raise ProtocolError(f"Register answered by {type(reply).__name__}")
            self.session, self.lease_seconds = reply.session, reply.lease_seconds
            self.lease.until = sent + reply.lease_seconds
            self.registrations += 1
            self._open_stream(reply.session)
            for v in vdisks:
                self._load_or_drop(v)
        except BaseException:
            # Not (fully) registered: no lease, so no writes; reads of the entries still
            # usable go on.  The next write, fetch or the keeper registers again.
            self.session = 0
            self.lease.until = -math.inf
            for v in vdisks:
                v._resume()
            raise
        with self._keeper_cond:
            self._keeper_cond.notify_all()
        self._lease_granted()

    def _load_or_drop(self, vdisk: AgentVDisk) -> None:
        try:
            vdisk._load()
        except NotFound:
            with self._registry_lock:
                if self._vdisks.get(vdisk.name) is vdisk:
                    del self._vdisks[vdisk.name]
            vdisk._change(0, _ALL, functools.partial(setattr, vdisk, "_dropped", True), drain=False)

    def request(self, make: Callable[[int], p.Request], kind: type[R]) -> R:
        """One request in the current session; re-registers (and retries) if it was lost."""
        for _ in range(_SESSION_RETRIES):
            session = self.session
            if not session:
                self.reconnect(None)
                continue
            reply = self.link.call(make(session))
            if isinstance(reply, kind):
                return reply
            if isinstance(reply, p.Refused):
                if reply.code < len(p.ERRORS) and p.ERRORS[reply.code] is SessionLost:
                    self._lost(session)
                    continue
                p.raise_refused(reply)
            raise ProtocolError(f"expected {kind.__name__}, got {type(reply).__name__}")
        raise ControllerUnreachable(
            f"agent {self.agent_id} keeps losing its controller session; giving up this request"
        )

    def _lost(self, session: int) -> None:
        """The controller fenced this session or restarted: no more writes, re-register."""
        if self.session == session:
            self.lease.until = -math.inf
        self.reconnect(session)

    def _on_command(self, session: int, cmd: p.Command) -> p.Ack | None:
        if session != self.session:
            return None  # a command of a session this agent has left: its tables are gone
        vdisk = self._vdisks.get(cmd.vdisk)
        try:
            if vdisk is not None:
                vdisk.apply(cmd)
                if isinstance(cmd, p.DropVDisk):
                    with self._registry_lock:
                        if self._vdisks.get(cmd.vdisk) is vdisk:
                            del self._vdisks[cmd.vdisk]
        except TargetvirtError as e:
            return p.Ack(cmd.seq, False, str(e)[: p.MAX_STR])
        return p.Ack(cmd.seq)

    def handle_command(self, cmd: p.Command) -> p.Ack | None:
        """Apply a command of the current session (transports and tests)."""
        return self._on_command(self.session, cmd)

    def _commands_lost(self, session: int) -> None:
        if self._closed or session != self.session:
            return
        self._stream_down = session
        threading.Thread(
            target=self._restore, name=f"{self.agent_id}-reconnect", daemon=True
        ).start()

    def _restore(self) -> None:
        """The command stream broke.  Ask the controller: if the session still stands,
        reopen the stream (a command lost on the way gets us fenced anyway); if it is gone,
        :meth:`request` registers again; if unreachable, the lease runs out by itself and
        the keeper (or the next write) tries again."""
        with contextlib.suppress(TargetvirtError):
            self.renew_lease()

    def _open_stream(self, session: int) -> None:
        self._stream_down = 0
        self.link.open_commands(
            p.Hello(self.agent_id, session),
            functools.partial(self._on_command, session),
            functools.partial(self._commands_lost, session),
        )

    # --- lease ---------------------------------------------------------------------------

    def revive(self) -> None:
        """Best effort to regain a lease (renew, or register again); errors are swallowed:
        the caller finds out from the lease."""
        with contextlib.suppress(TargetvirtError):
            if self.connected:
                self.renew_lease()
            else:
                self.reconnect(None)

    def renew_lease(self) -> None:
        """Renew the lease (counted from when the request was sent)."""
        sent = self.clock.now()
        session = self.session
        grant = self.request(lambda s: p.LeaseRenew(self.agent_id, s), p.LeaseGrant)
        with self._session_lock:
            if self.session == session:
                self.lease.until = max(self.lease.until, sent + grant.seconds)
                if self._stream_down == session:
                    self._open_stream(session)
        self._lease_granted()

    def _lease_granted(self) -> None:
        with self._lease_cond:
            self._lease_cond.notify_all()

    def await_controller(self, first: float, error: LeaseExpired) -> None:
        """An I/O that has needed the controller since ``first`` found no lease or no
        controller (``error``): wait a moment (or until a lease is granted) and let it try
        again -- or raise ``error`` once ``controller_wait`` has passed since ``first``."""
        now = self.clock.now()
        end = first + self.controller_wait
        if self._closed or now >= end:
            raise error
        with self._lease_cond:
            self.clock.wait(self._lease_cond, min(end, now + RETRY_PAUSE))

    def start(self) -> None:
        """Run the lease keeper thread (renewal, and re-registration after a loss)."""
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep, name=f"{self.agent_id}-lease", daemon=True
            )
            self._keeper.start()

    def _keep(self) -> None:
        name_this_thread("tv-lease")
        while not self._closed:
            with self._keeper_cond:
                interval = self.lease_seconds / 3 if self.lease_seconds else 1.0
                self.clock.wait(self._keeper_cond, self.clock.now() + interval)
            if self._closed:
                return
            try:
                if self.connected:
                    self.renew_lease()
                else:
                    self.reconnect(None)
            except TargetvirtError:
                pass  # unreachable: try again next round; the lease ends writes meanwhile

    # --- data ----------------------------------------------------------------------------

    def container(self, info: p.ContainerInfo) -> Container:
        """The agent's own handle on a container (opened once, checked against its label)."""
        key = (info.pool_uuid, info.cid)
        with self._registry_lock:
            c = self._containers.get(key)
            if c is None or c.uuid != info.uuid:
                label = ContainerLabel(
                    info.kind, info.pool_uuid, info.uuid, info.cid, info.segment_size,
                    info.nsegments,
                )  # fmt: skip
                c = self._containers[key] = Container.open(info.path, label, info.preallocated)
                c.on_failure = functools.partial(self._container_failed, info.pool_uuid)
            return c

    def _container_failed(self, pool_uuid: str, c: Container, first: bool) -> None:
        """A medium error on a container: tell the controller, so its pool places no new
        segments there.  Best effort and straight on the link (this runs inside an I/O,
        which must not re-register); at most once a second per container, so a dead disk
        does not flood the controller, yet a mark an operator cleared is set again."""
        key, now = (pool_uuid, c.cid), self.clock.now()
        if not first and now - self._reported.get(key, -math.inf) < FAILURE_REPORT_INTERVAL:
            return
        self._reported[key] = now
        session = self.session
        if not session:
            return
        msg = p.ContainerFailure(self.agent_id, session, pool_uuid, c.cid, c.last_error)
        with contextlib.suppress(TargetvirtError, OSError):
            self.link.call(msg)

    def flush(self) -> None:
        """fdatasync every container this agent wrote through, then the controller commits.

        A container that fails its flush does not stop the others nor the commit: each
        vdisk's flush reports it if the vdisk has data there (``sync_errors``).
        """
        for c in list(self._containers.values()):
            with contextlib.suppress(TargetvirtError):
                c.sync()
        first = self.clock.now()
        while True:
            try:
                self.request(lambda s: p.Flush(self.agent_id, s), p.Done)
                return
            except LeaseExpired as e:  # the controller is unreachable: wait, within a bound
                self.await_controller(first, e)

    def describe(self, name: str) -> p.VDiskInfo:
        """What the controller says of a vdisk, without serving it (NotFound if absent)."""
        return self.request(lambda s: p.Describe(self.agent_id, s, name), p.VDiskInfo)

    def close(self) -> None:
        """Stop serving: drain every vdisk, tell the controller (best effort, so it need
        not fence us at its next command), close the link and the containers."""
        self._closed = True
        with self._keeper_cond:
            self._keeper_cond.notify_all()
        vdisks = list(self._vdisks.values())
        for v in vdisks:
            v._change(0, _ALL, functools.partial(setattr, v, "_dropped", True), drain=True)
        session = self.session
        if session:
            with contextlib.suppress(TargetvirtError):
                for v in vdisks:
                    self.link.call(p.Detach(self.agent_id, session, v.name))
        self.link.close()
        if self._keeper is not None:
            self._keeper.join(timeout=5)
        with self._registry_lock:
            for c in self._containers.values():
                c.close()
            self._containers.clear()
