"""The block I/O the SCSI emulation needs, and an in-memory implementation for tests.

The emulation never does I/O itself: it decodes a CDB, checks it against the
:class:`~tcmu_handler.scsi.lun.LunState`, and calls one :class:`BlockBackend` method with
byte offsets and lengths that are whole logical blocks inside the LUN. The device loop
injects the real backend (the agent's vdisk I/O); tests use :class:`RamBackend`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol


class WouldBlock(Exception):
    """A non-blocking attempt could not finish without waiting; nothing was done.

    Raised by the device loop's non-blocking backend view (see ``tcmu_handler.device``)
    and passed through :func:`~tcmu_handler.scsi.command.handle`, so the loop can run
    the same command again in a worker thread.
    """


class Started(WouldBlock):
    """A non-blocking attempt started the I/O instead of finishing it: the command
    completes later, when the I/O ends (see ``tcmu_handler.device.Async``)."""


class BlockBackend(Protocol):
    """Byte-addressed, synchronous block I/O on one vdisk.

    Offsets and lengths are multiples of the logical block size and lie inside the LUN
    (the emulation checks ranges before calling). Any method may raise an error from
    :mod:`targetvirt.errors` that carries a ``sense`` (``PoolFull``, ``ContainerIOError``,
    ``ReadOnly``, ``LeaseExpired``...): the command then ends in CHECK CONDITION with
    that sense. Any other exception is logged and reported as HARDWARE ERROR, INTERNAL
    TARGET FAILURE.

    Methods may be called from several threads at once for the same vdisk.
    """

    @property
    def size(self) -> int:
        """Bytes of the vdisk behind the LUN (the LUN may be smaller, never larger)."""
        ...

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs``, in order, with the data that starts at ``offset``.

        Every byte of every buffer must be written (unmapped ranges read as zeros): the
        buffers are the kernel's data area and may hold another command's data.
        """
        ...

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        """Write the concatenation of ``bufs`` at ``offset``.

        With ``fua`` the data (and the mapping that points at it) is durable on return;
        otherwise it becomes durable at the next :meth:`flush` at the latest.
        """
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros.

        ``unmap=True`` allows deallocating the whole segments of the range (UNMAP, WRITE
        SAME with UNMAP, SANITIZE BLOCK ERASE, FORMAT UNIT); partial segments are zeroed.
        ``unmap=False`` leaves the range mapped (WRITE SAME of zeros without UNMAP).
        """
        ...

    def flush(self) -> None:
        """Make every write completed so far durable (SYNCHRONIZE CACHE)."""
        ...

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Consecutive ``(offset, length, mapped)`` runs that exactly cover the request.

        The first run starts at ``offset`` and the last ends at ``offset + length``.
        Adjacent runs may share a status (the emulation merges them).
        """
        ...

    def compare_and_write(self, offset: int, verify: memoryview, write: memoryview) -> int | None:
        """Atomically: if the data at ``offset`` equals ``verify``, write ``write`` there.

        Atomic with respect to every other write to the range (SBC-4 COMPARE AND WRITE).
        Returns None when the data matched and was written, else the byte offset (from
        ``offset``) of the first byte that differs. ``verify`` and ``write`` have the
        same length.
        """
        ...


class RamBackend:
    """A :class:`BlockBackend` over a bytearray that tracks mapped granules.

    A granule (a segment of the real product) is mapped by any write to it and unmapped
    when ``write_zeroes(unmap=True)`` covers it whole; unmapped granules read as zeros.
    One lock serialises everything, which makes ``compare_and_write`` trivially atomic.
    Tests can make the next call fail with :meth:`fail_next`.
    """

    def __init__(self, size: int, granule: int = 1 << 20) -> None:
        if granule <= 0:
            raise ValueError("granule must be positive")
        self.granule = granule
        self.data = bytearray(size)
        self.mapped = bytearray(-(-size // granule))
        self.flushes = 0
        self.fua_writes = 0
        self._fail: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    def resize(self, size: int) -> None:
        with self._lock:
            del self.data[size:]
            self.data.extend(bytes(size - len(self.data)))
            n = -(-size // self.granule)
            del self.mapped[n:]
            self.mapped.extend(bytes(n - len(self.mapped)))

    def fail_next(self, error: BaseException) -> None:
        """Make the next backend call raise ``error``."""
        self._fail = error

    def _check(self, offset: int, length: int) -> None:
        if self._fail is not None:
            error, self._fail = self._fail, None
            raise error
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise ValueError(f"I/O at {offset}+{length} outside a {len(self.data)}-byte disk")

    def _map(self, offset: int, length: int) -> None:
        if length:
            first, last = offset // self.granule, (offset + length - 1) // self.granule
            self.mapped[first : last + 1] = b"\x01" * (last - first + 1)

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self._lock:
            self._check(offset, sum(len(b) for b in bufs))
            for buf in bufs:
                n = len(buf)
                buf[:] = self.data[offset : offset + n]
                offset += n

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        with self._lock:
            total = sum(len(b) for b in bufs)
            self._check(offset, total)
            self._map(offset, total)
            for buf in bufs:
                self.data[offset : offset + len(buf)] = buf
                offset += len(buf)
            self.fua_writes += fua

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        with self._lock:
            self._check(offset, length)
            self.data[offset : offset + length] = bytes(length)
            if not unmap:
                self._map(offset, length)
                return
            first = -(-offset // self.granule)
            end = offset + length
            last = end // self.granule if end < len(self.data) else len(self.mapped)
            if last > first:
                self.mapped[first:last] = bytes(last - first)

    def flush(self) -> None:
        with self._lock:
            self._check(0, 0)
            self.flushes += 1

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        with self._lock:
            self._check(offset, length)
            runs: list[tuple[int, int, bool]] = []
            pos, end = offset, offset + length
            while pos < end:
                g = pos // self.granule
                stop = min(end, (g + 1) * self.granule)
                state = bool(self.mapped[g])
                if runs and runs[-1][2] == state:
                    start, _, _ = runs.pop()
                    runs.append((start, stop - start, state))
                else:
                    runs.append((pos, stop - pos, state))
                pos = stop
            return runs

    def compare_and_write(self, offset: int, verify: memoryview, write: memoryview) -> int | None:
        with self._lock:
            n = len(verify)
            self._check(offset, n)
            current = self.data[offset : offset + n]
            if current != verify:
                return next(i for i in range(n) if current[i] != verify[i])
            self._map(offset, n)
            self.data[offset : offset + n] = write
            return None
