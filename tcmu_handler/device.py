"""One TCMU device: its command loop, between the kernel's ring and a vdisk backend.

The loop thread owns the ring.  Each wake-up it drains every ready entry: commands that
are pure emulation (INQUIRY, MODE SENSE...) run inline, everything that touches the
backend goes to a small pool of worker threads, so a slow command (a COW fault, a write
held by a freeze) never stalls the fast ones behind it.  Workers hand completions back
through a deque and an eventfd; the loop writes them into the ring in whatever order
they finish (out-of-order completion) and tells the kernel once per batch.

Data moves between the backend and the ring's data area through memoryviews of the
mmap: ``os.preadv``/``os.pwritev`` straight into the kernel's pages, no copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from tcmu_handler import abi
from tcmu_handler.ring import Command, Ring
from tcmu_handler.scsi import sense
from tcmu_handler.scsi.backend import BlockBackend, WouldBlock
from tcmu_handler.scsi.command import classify, handle
from tcmu_handler.scsi.common import Completion, Kind
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.uio import UioHandle

log = logging.getLogger(__name__)

_STOP = None  # sentinel on the work queue
_INTERNAL_FAILURE = sense.build(sense.INTERNAL_TARGET_FAILURE)


# READ/WRITE (10) and (16): the commands worth trying inline before handing them off
_INLINE_IO = frozenset({0x28, 0x2A, 0x88, 0x8A})


class NoWait:
    """A view of a backend that does the I/O only if it needs no waiting at all.

    A read or write of privately mapped segments is a syscall on a page-cache or memory
    backed container: the ring thread does it at once instead of paying two thread
    hand-offs.  Anything else (a fault through the controller, a frozen vdisk, a flush,
    FUA) raises :class:`WouldBlock` before doing anything, and the loop gives the
    command to a worker.
    """

    __slots__ = ("_read", "_write", "size")

    def __init__(self, backend: BlockBackend) -> None:
        self._read = backend.try_read_into  # type: ignore[attr-defined]
        self._write = backend.try_write_from  # type: ignore[attr-defined]
        self.size = backend.size

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if not self._read(offset, bufs):
            raise WouldBlock

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        if fua or not self._write(offset, bufs):
            raise WouldBlock

    def __getattr__(self, name: str) -> Any:
        raise WouldBlock  # every other backend operation may wait


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
        self.inline_hits = 0

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
            "%s: completed %d commands (%d inline) in %d notifies",
            self.name, self.completed, self.inline_hits, self.notifies,
        )  # fmt: skip

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.handle.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        self._drain_ring()  # commands queued before we opened raise no event
        self._reap()  # nor would their inline completions until the first poll timed out
        while not self._stopping.is_set():
            ready = poller.poll(1000)
            for fd, _ in ready:
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                elif not self._take_event():
                    self._stopping.set()  # the kernel removed the device
            if self.broken is None:
                self._drain_ring()
            self._reap()
        # stopping: wait for what the workers hold, so every fetched command completes
        while self._submitted != self._returned or self._done:
            poller.poll(100)
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
        for cmd in fetched.commands:
            kind = classify(cmd.cdb)
            if kind is Kind.INLINE:
                self._done.append((cmd, self._execute(cmd, self.backend), False))
            elif self.nowait is not None and cmd.cdb[0] in _INLINE_IO and self._try_inline(cmd):
                self.inline_hits += 1
            else:
                self._submitted += 1
                self._work.append(cmd)
                self._work_ready.release()
        if fetched.broken is not None:
            self.broken = fetched.broken
            log.error("%s: the ring is broken: %s", self.name, fetched.broken)
            if self.on_broken is not None:
                self.on_broken(self, fetched.broken)

    def _reap(self) -> None:
        """Write finished commands into the ring and tell the kernel, once."""
        n = 0
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

    def _try_inline(self, cmd: Command) -> bool:
        try:
            self._done.append((cmd, self._execute(cmd, self.nowait), False))
        except WouldBlock:
            return False
        return True

    def _execute(self, cmd: Command, backend: Any) -> Completion:
        views = cmd.views()
        data_in = cmd.bidi_views() if cmd.bidi_iovs else views
        try:
            return handle(self.lun, cmd.cdb, views, data_in, backend)
        finally:
            for v in views:
                v.release()
            if data_in is not views:
                for v in data_in:
                    v.release()

    def _worker(self) -> None:
        while True:
            self._work_ready.acquire()
            cmd = self._work.popleft()
            if cmd is _STOP:
                return
            try:
                comp = self._execute(cmd, self.backend)
            except BaseException:  # handle() never raises; this guards the guard
                log.exception("%s: command %s crashed", self.name, cmd)
                comp = Completion(abi.SAM_STAT_CHECK_CONDITION, _INTERNAL_FAILURE, 0)
            self._done.append((cmd, comp, True))
            os.eventfd_write(self._wake, 1)
