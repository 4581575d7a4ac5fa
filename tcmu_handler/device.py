"""One TCMU device: its command loop, between the kernel's ring and a vdisk backend.

The loop thread owns the ring.  Each wake-up it drains every ready entry: commands that
are pure emulation (INQUIRY, MODE SENSE...) run inline, everything that touches the
backend goes to a small pool of worker threads, so a slow command (a COW fault, a write
held by a freeze) never stalls the fast ones behind it.  The everyday command, a plain
READ or WRITE of privately mapped segments (``sbc.plain_transfer`` says which), is one
``preadv``/``pwritev`` done by the loop itself, without the emulation's dispatch; those of
one wake-up are handed to the backend together, so its lock and in-flight count are paid
once per batch, not per command.
Workers hand completions back through a deque and an eventfd; the loop writes them into
the ring in whatever order they finish (out-of-order completion) and tells the kernel
once per batch.

Data moves between the backend and the ring's data area through memoryviews of the
mmap: ``os.preadv``/``os.pwritev`` straight into the kernel's pages, no copy.

A vdisk whose segments are RADOS objects waits a network round trip per command, which
would hold a worker thread for each command in flight.  Its plain READs and WRITEs are
started by the loop itself as asynchronous librados operations (directly, or through
:class:`Async` for what the emulation must look at first), and librados's callback
thread hands the completion back like a worker would.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from targetvirt.threads import name_this_thread
from tcmu_handler import abi
from tcmu_handler.ring import Command, Ring
from tcmu_handler.scsi import sense
from tcmu_handler.scsi.backend import BlockBackend, Started, WouldBlock
from tcmu_handler.scsi.command import classify, handle
from tcmu_handler.scsi.common import COMPLETED, Completion, Kind
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.scsi.sbc import plain_transfer
from tcmu_handler.uio import UioHandle

log = logging.getLogger(__name__)

_STOP = None  # sentinel on the work queue
_INTERNAL_FAILURE = sense.build(sense.INTERNAL_TARGET_FAILURE)


# READ/WRITE (10) and (16): the commands worth trying inline before handing them off
_INLINE_IO = frozenset({0x28, 0x2A, 0x88, 0x8A})
# a backend's non-blocking read or write: False when it did nothing (it would wait)
_TryIO = Callable[[int, Sequence[memoryview]], bool]
# several of them at once, each (write, offset, buffer): which were done
_TryBatch = Callable[[Sequence[tuple[bool, int, memoryview]]], list[bool]]


class NoWait:
    """A view of a backend that does the I/O only if it needs no waiting at all.

    A read or write of privately mapped segments is a syscall on a page-cache or memory
    backed container: the ring thread does it at once instead of paying two thread
    hand-offs.  Anything else (a fault through the controller, a frozen vdisk, a flush,
    FUA) raises :class:`WouldBlock` before doing anything, and the loop gives the
    command to a worker.
    """

    __slots__ = ("size", "try_read", "try_write")

    def __init__(self, backend: BlockBackend) -> None:
        self.try_read: _TryIO = backend.try_read_into  # type: ignore[attr-defined]
        self.try_write: _TryIO = backend.try_write_from  # type: ignore[attr-defined]
        self.size = backend.size

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if not self.try_read(offset, bufs):
            raise WouldBlock

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        if fua or not self.try_write(offset, bufs):
            raise WouldBlock

    def __getattr__(self, name: str) -> Any:
        raise WouldBlock  # every other backend operation may wait


class Async:
    """A view of a backend that starts a plain read or write and returns at once.

    Armed by the loop for one command at a time (``length``: the command's data-in
    bytes; ``done``: what completes it).  When the backend started the I/O it raises
    :class:`Started`, and ``done(ok)`` comes later from the storage client's thread.  A
    read of less than the whole data-in buffer (its completion would carry a residual),
    a FUA write and every other operation raise :class:`WouldBlock` before doing
    anything: a worker runs them.
    """

    __slots__ = ("_start", "done", "length", "size")

    def __init__(self, backend: BlockBackend) -> None:
        self._start = backend.start_io  # type: ignore[attr-defined]
        self.size = backend.size
        self.length = 0
        self.done: Callable[[bool], None] = _unarmed

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        n = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        if n != self.length or not self._start(offset, bufs, False, self.done):
            raise WouldBlock
        raise Started

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        if fua or not self._start(offset, bufs, True, self.done):
            raise WouldBlock
        raise Started

    def __getattr__(self, name: str) -> Any:
        raise WouldBlock


def _unarmed(ok: bool) -> None:
    raise AssertionError("Async view used before the loop armed it")


class Device:
    """Serves one uio device until stopped; one loop thread plus ``workers`` threads."""

    def __init__(
        self,
        name: str,
        handle: UioHandle,
        ring: Ring,
        lun: LunState,
        backend: BlockBackend,
        *,
        workers: int = 4,
        on_broken: Callable[[Device, str], None] | None = None,
    ) -> None:
        self.name = name
        self.handle = handle
        self.ring = ring
        self.lun = lun
        self.backend = backend
        self.on_broken = on_broken
        self._nworkers = workers
        self._work: deque[Command | None] = deque()
        self._work_ready = threading.Semaphore(0)
        # (command, completion, ran in a worker); appended by workers, popped by the loop
        self._done: deque[tuple[Command, Completion, bool]] = deque()
        self._good: list[int] = []  # ids the loop itself completes GOOD (loop thread only)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._submitted = 0  # to workers; both counters are touched by the loop thread only
        self._returned = 0
        self.completed = 0
        self.notifies = 0  # completed / notifies = the mean batch the kernel reaps per call
        self.broken: str | None = None
        self.vdisk = ""  # the vdisk (or vdisk@snapshot) served, for lookups
        self.nowait = NoWait(backend) if hasattr(backend, "try_read_into") else None
        self._try_batch: _TryBatch = getattr(backend, "try_batch", self._one_by_one)
        self.inline_hits = 0
        has_aio = hasattr(backend, "start_io") and hasattr(backend, "waits_on_network")
        self.aio = Async(backend) if has_aio else None
        self.started = 0  # commands the loop started asynchronously

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self._nworkers):
            t = threading.Thread(target=self._worker, name=f"{self.name}-io{i}", daemon=True)
            t.start()
            self._threads.append(t)
        loop = threading.Thread(target=self._run, name=f"{self.name}-ring", daemon=True)
        loop.start()
        self._threads.append(loop)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop fetching, let in-flight commands finish and complete them, then close."""
        self._stopping.set()
        os.eventfd_write(self._wake, 1)
        for _ in range(self._nworkers):
            self._work.append(_STOP)
            self._work_ready.release()
        for t in self._threads:
            t.join(timeout)
        self._reap()
        self.ring.release()
        self.handle.close()
        os.close(self._wake)
        log.info(
            "%s: completed %d commands (%d inline, %d started asynchronously) in %d notifies",
            self.name, self.completed, self.inline_hits, self.started, self.notifies,
        )  # fmt: skip

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread("tv-ring")
        poller = select.poll()
        poller.register(self.handle.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        # commands queued before we opened raise no event, nor would their inline
        # completions: the poll below never times out
        self.serve_ready()
        while not self._stopping.is_set():
            # no timeout: stop() wakes us through the eventfd, and a poll with a timeout
            # reads the clock, a system call where the clock source has no vDSO
            ready = poller.poll()
            for fd, _ in ready:
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                elif not self._take_event():
                    self._stopping.set()  # the kernel removed the device
            self.serve_ready()
        # stopping: wait for what the workers hold, so every fetched command completes
        while self._submitted != self._returned or self._done:
            poller.poll(100)
            self._reap()

    def serve_ready(self) -> None:
        """One turn of the loop's work, without waiting: fetch every ready command and
        do or start it, then complete what has finished and tell the kernel once.  The
        loop thread's; ``bench.ringloop`` calls it directly, with no threads started, to
        time the loop's own work."""
        if self.broken is None:
            self._drain_ring()
        self._reap()

    def _take_event(self) -> bool:
        """Consume the uio event; False once the device is gone (uio answers EIO as soon
        as the kernel unregisters it, before the REMOVED_DEVICE event reaches us)."""
        try:
            self.handle.take_event()
        except OSError as e:
            log.info("%s: the kernel removed the device (%s)", self.name, e.strerror)
            return False
        return True

    def _drain_ring(self) -> None:
        fetched = self.ring.fetch()
        lun, nowait = self.lun, self.nowait
        plain: list[Command] = []  # one-buffer plain I/O, done together below
        batch: list[tuple[bool, int, memoryview]] = []  # and their transfers
        for cmd in fetched.commands:
            cdb = cmd.cdb
            opcode = cdb[0]
            if opcode in _INLINE_IO and nowait is not None:
                iovs = cmd.iovs
                one = len(iovs) == 1
                offset = plain_transfer(lun, cdb, iovs[0][1] if one else cmd.data_length)
                if offset >= 0 and one:
                    plain.append(cmd)
                    batch.append((opcode & 2 != 0, offset, cmd.view(*iovs[0])))
                    continue
                if plain:  # what the loop does itself, it does in ring order
                    self._run_plain(plain, batch)
                    plain, batch = [], []
                if offset >= 0:
                    self._plain_waits(cmd, offset)
                    continue
                if self._try_inline(cmd):
                    self.inline_hits += 1
                    continue
            elif plain:
                self._run_plain(plain, batch)
                plain, batch = [], []
            if classify(cdb) is Kind.INLINE:
                self._done.append((cmd, self._execute(cmd, self.backend), False))
            elif self.aio is None or opcode not in _INLINE_IO or not self._try_async(cmd):
                self._to_worker(cmd)
        if plain:
            self._run_plain(plain, batch)
        if fetched.broken is not None:
            self.broken = fetched.broken
            log.error("%s: the ring is broken: %s", self.name, fetched.broken)
            if self.on_broken is not None:
                self.on_broken(self, fetched.broken)

    def _to_worker(self, cmd: Command) -> None:
        self._submitted += 1
        self._work.append(cmd)
        self._work_ready.release()

    def _reap(self) -> None:
        """Write finished commands into the ring and tell the kernel, once."""
        n = len(self._good)
        if n:
            self.ring.complete_good(self._good)
            self._good.clear()
        done = self._done
        while done:
            cmd, comp, from_worker = done.popleft()
            self.ring.complete(cmd.cmd_id, comp.status, comp.sense, comp.read_len)
            self._returned += from_worker
            n += 1
        if n:
            self.completed += n
            self.notifies += 1
            self.handle.notify()

    def _run_plain(self, plain: list[Command], batch: list[tuple[bool, int, memoryview]]) -> None:
        """Plain READs/WRITEs of one buffer each (see :func:`plain_transfer`) and their
        transfers: move their data with one non-blocking backend call for them all and
        complete them GOOD, skipping the emulation's dispatch -- the common command in
        the fewest steps.  Those the backend would have to wait for go on by
        :meth:`_plain_waits`.  (The views of the others are released when ``batch``
        goes.)"""
        ok = self._try_batch(batch)
        if False not in ok:  # the everyday case: every one done
            self._good += [cmd.cmd_id for cmd in plain]
            self.inline_hits += len(plain)
            return
        for cmd, (_, offset, view), moved in zip(plain, batch, ok, strict=True):
            if moved:
                self._good.append(cmd.cmd_id)
                self.inline_hits += 1
            else:
                self._plain_waits(cmd, offset, [view])

    def _plain_waits(
        self, cmd: Command, offset: int, views: list[memoryview] | None = None
    ) -> None:
        """A plain READ/WRITE the backend cannot do at once: on RADOS the loop starts it
        (librados calls back when it ends), on files a worker waits for it.  ``views``:
        the command's views if already built (this takes them over); otherwise they are
        built only when librados will take them."""
        if self.aio is None or not self.backend.waits_on_network:  # type: ignore[attr-defined]
            _release(views or [])
            self._to_worker(cmd)
            return
        views = views or cmd.views()
        done = functools.partial(self._io_ended, cmd, views)
        if self.backend.start_io(offset, views, bool(cmd.cdb[0] & 2), done):  # type: ignore[attr-defined]
            self._submitted += 1  # returned when _io_ended's completion is reaped
            self.started += 1
        else:
            _release(views)
            self._to_worker(cmd)

    def _one_by_one(self, batch: Sequence[tuple[bool, int, memoryview]]) -> list[bool]:
        """``try_batch`` for a backend that has only the single calls."""
        nowait = self.nowait
        assert nowait is not None  # the loop asks only when the backend has these calls
        return [(nowait.try_write if w else nowait.try_read)(off, (buf,)) for w, off, buf in batch]

    def _try_inline(self, cmd: Command) -> bool:
        try:
            self._done.append((cmd, self._execute(cmd, self.nowait), False))
        except WouldBlock:
            return False
        return True

    def _try_async(self, cmd: Command) -> bool:
        """Start the command's I/O (see :class:`Async`); False: a worker must run it."""
        if not self.backend.waits_on_network:  # type: ignore[attr-defined]
            return False  # files: the inline path failed for a reason a worker handles
        aio, views = self.aio, cmd.views()
        assert aio is not None
        aio.length = cmd.data_length
        aio.done = lambda ok: self._io_ended(cmd, views, ok)
        try:
            comp = handle(self.lun, cmd.cdb, views, views, aio)
        except Started:
            self._submitted += 1  # returned when _io_ended's completion is reaped
            self.started += 1
            return True
        except WouldBlock:
            _release(views)
            return False
        _release(views)  # it ended without I/O (a range or protection error)
        self._done.append((cmd, comp, False))
        return True

    def _io_ended(self, cmd: Command, views: list[memoryview], ok: bool) -> None:
        """From the storage client's thread: complete the command, or when the I/O
        failed have it run again the blocking way, which names the error in its sense.
        (A thread of its own: failures are rare, and this thread must not wait.)"""
        _release(views)
        if ok:
            self._done.append((cmd, COMPLETED, True))
            os.eventfd_write(self._wake, 1)
        else:
            threading.Thread(target=self._run_blocking, args=(cmd,), daemon=True).start()

    def _execute(self, cmd: Command, backend: Any) -> Completion:
        views = cmd.views()
        data_in = cmd.bidi_views() if cmd.bidi_iovs else views
        try:
            return handle(self.lun, cmd.cdb, views, data_in, backend)
        finally:
            _release(views)
            if data_in is not views:
                _release(data_in)

    def _worker(self) -> None:
        name_this_thread("tv-io")
        while True:
            self._work_ready.acquire()
            cmd = self._work.popleft()
            if cmd is _STOP:
                return
            self._run_blocking(cmd)

    def _run_blocking(self, cmd: Command) -> None:
        try:
            comp = self._execute(cmd, self.backend)
        except BaseException:  # handle() never raises; this guards the guard
            log.exception("%s: command %s crashed", self.name, cmd)
            comp = Completion(abi.SAM_STAT_CHECK_CONDITION, _INTERNAL_FAILURE, 0)
        self._done.append((cmd, comp, True))
        os.eventfd_write(self._wake, 1)


def _release(views: list[memoryview]) -> None:
    for v in views:
        v.release()
