"""Virtual disks: byte I/O through a segment table, thin allocation and copy-on-write.

A vdisk resolves a byte range into *extents* — ``(container, offset, length)``, with
``None`` for unallocated ranges that read as zeros — so the data path can move bytes
straight between a container and a caller's buffers with ``os.preadv``/``os.pwritev``.

Writes fault when an entry is unallocated (allocate a zeroed segment) or shared (COW):

* ``redirect``: the writer gets a new segment holding a copy of the old data; everyone
  else keeps the original.
* ``copy``: the old data is copied to a new segment that every *other* sharer takes; the
  writer keeps its segment and its layout.  The other tables' repointing is committed
  durably *before* the writer's data lands in place, or a crash could leave a snapshot
  pointing at new data.

Tables are only ever produced by copying entries, so every sharer of a segment maps it at
the same index: "who else maps this" is a look at one index in the family's tables.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from targetvirt import table as t
from targetvirt.container import DATA_OFFSET, Container
from targetvirt.errors import ContainerWriteError, InvalidArgument, ReadOnly, lba_out_of_range

if TYPE_CHECKING:
    from targetvirt.catalog import Catalog
    from targetvirt.pool import Pool

CowMode = Literal["redirect", "copy"]
COW_MODES: tuple[CowMode, ...] = ("redirect", "copy")
KIND_VDISK = "vdisk"
KIND_SNAPSHOT = "snapshot"
FREEZE_MODES = ("nowrite", "invalid")
MAX_DEADLINE = 2.0**37  # wall-clock seconds: past year 6000, and any date prints

Extent = tuple[Container | None, int, int]
Buffer = memoryview | bytearray


_STRIPES = [threading.Lock() for _ in range(64)]


@dataclass(frozen=True)
class Freeze:
    """A user's freeze of a vdisk as the metadata store keeps it (the controller applies
    it: :meth:`targetvirt.controller.Controller.freeze`).

    ``until``: when it thaws by itself, in wall-clock seconds since the epoch (``None``:
    only when thawed).  Wall-clock, not the controller's monotonic clock: the deadline
    must mean the same to a controller started later, maybe on another host (a RADOS
    standby), and a restart must see how much of the timeout ran out while no controller
    ran -- a "time remaining" could not tell.
    """

    mode: str
    until: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in FREEZE_MODES:
            raise InvalidArgument(
                f"freeze mode {self.mode!r} is not one of {', '.join(FREEZE_MODES)}"
            )
        if self.until is not None and (
            type(self.until) not in (int, float) or not 0 <= self.until < MAX_DEADLINE
        ):
            raise InvalidArgument(f"a freeze deadline of {self.until!r} is out of range")

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "until": self.until}

    @classmethod
    def from_record(cls, body: object) -> Freeze:
        """A freeze as read back (the record passed its checksum; still check every field:
        a wrong one must fail loudly, never thaw or freeze forever by accident)."""
        if not isinstance(body, dict) or set(body) != {"mode", "until"}:
            raise InvalidArgument(f"a freeze must have a mode and a deadline, not {body!r:.80}")
        return cls(body["mode"], body["until"])


class Family:
    """Every table copied, directly or not, from one origin: the possible sharers."""

    def __init__(self, fid: int) -> None:
        self.fid = fid
        self.members: list[VDisk] = []

    def others(self, vdisk: VDisk) -> list[VDisk]:
        return [m for m in self.members if m is not vdisk]


class VDisk:
    """A vdisk, snapshot or clone: a table over a pool, plus its record."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        vid: int,
        name: str,
        uuid: str,
        kind: str,
        pool: Pool,
        family: Family,
        parent: int | None,
        size: int,
        cow: CowMode,
        created: float,
        table: t.Table,
        hashes: list[bytes] | None = None,
    ) -> None:
        self.catalog = catalog
        self.vid = vid
        self.name = name
        self.uuid = uuid
        self.kind = kind
        self.pool = pool
        self.family = family
        self.parent = parent
        self.size = size
        self.cow: CowMode = cow
        self.created = created
        self.table = table
        self.hashes: list[bytes] = hashes if hashes is not None else []
        self.record_dirty = hashes is None
        self.freeze: Freeze | None = None  # a user's freeze, durable (the controller's)
        self.segment_size = pool.segment_size
        self.shift = self.segment_size.bit_length() - 1
        self.mask = self.segment_size - 1
        # per container: its failed flushes this vdisk has accounted for (see flush)
        self._synced = {cid: c.sync_errors for cid, c in pool.containers.items()}

    def __repr__(self) -> str:
        return f"<VDisk {self.name} {self.kind} {self.size} bytes>"

    @property
    def readonly(self) -> bool:
        return self.kind == KIND_SNAPSHOT

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "kind": self.kind,
            "pool": self.pool.pid,
            "family": self.family.fid,
            "parent": self.parent,
            "size": self.size,
            "cow": self.cow,
            "created": self.created,
            "entries": len(self.table),
            **({"freeze": self.freeze.record()} if self.freeze is not None else {}),
        }

    # --- accounting ----------------------------------------------------------------

    def allocated_bytes(self) -> int:
        return self.table.mapped_count() * self.segment_size

    def exclusive_bytes(self) -> int:
        """Bytes held by segments no other table maps (freed if this one is deleted)."""
        view = self.table.view()
        mapped = view[(view & np.uint64(t.MAPPED)) != 0]
        cids = (mapped >> np.uint64(t.CID_SHIFT)) & np.uint64(t.CID_MASK)
        psegs = (mapped & np.uint64(t.PSEG_MASK)).astype(np.int64)
        n = 0
        for cid in np.unique(cids).tolist():
            refs = self.pool.settled_refs(int(cid))[psegs[cids == cid]]
            n += int(np.count_nonzero(refs == 1))
        return n * self.segment_size

    # --- address resolution --------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise lba_out_of_range(offset, length)

    def map_read(self, offset: int, length: int) -> list[Extent]:
        """Extents holding ``length`` bytes at ``offset``; (None, 0, n) reads as zeros."""
        self._check_range(offset, length)
        out: list[Extent] = []
        entries, shift, mask, containers = (
            self.table.entries, self.shift, self.mask, self.pool.containers,
        )  # fmt: skip
        while length:
            intra = offset & mask
            n = min(length, self.segment_size - intra)
            e = entries[offset >> shift]
            if e & t.MAPPED:
                c = containers[(e >> t.CID_SHIFT) & t.CID_MASK]
                out.append((c, c.offset_of(e & t.PSEG_MASK) + intra, n))
            else:
                out.append((None, 0, n))
            offset += n
            length -= n
        return out

    def map_write(self, offset: int, length: int, *, check: bool = True) -> list[Extent]:
        """Extents to write ``length`` bytes at ``offset``, faulting (allocate/COW) as needed.

        ``check=False`` lets resize zero the tail of the last segment past the old size.
        """
        if self.readonly:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        if check:
            self._check_range(offset, length)
        out: list[Extent] = []
        entries, shift, mask, pool = self.table.entries, self.shift, self.mask, self.pool
        # A fault may zero a covered segment instead of copying it only if it is the last
        # fault of the write: a later one may fail (a full pool), and a failed write must
        # leave the old data, not zeros.
        last_fault = max(
            (i for i in range(offset >> shift, ((offset + length - 1) >> shift) + 1)
             if not entries[i] & t.MAPPED or pool.refcount(entries[i]) > 1),
            default=-1,
        ) if length else -1  # fmt: skip
        while length:
            intra = offset & mask
            n = min(length, self.segment_size - intra)
            index = offset >> shift
            e = entries[index]
            if not e & t.MAPPED or pool.refcount(e) > 1:
                covered = n == self.segment_size and index == last_fault
                e = self.catalog.fault(self, index, covered=covered)
            c = pool.containers[t.cid_of(e)]
            out.append((c, c.offset_of(t.pseg_of(e)) + intra, n))
            offset += n
            length -= n
        return out

    # --- byte I/O --------------------------------------------------------------------

    def readinto(self, offset: int, bufs: Sequence[Buffer]) -> None:
        if len(bufs) == 1 and self._read_fast(offset, bufs):
            return
        length = sum(len(b) for b in bufs)
        parts = Cursor(bufs)
        for c, coff, n in self.map_read(offset, length):
            views = parts.take(n)
            if c is None:
                for v in views:
                    v[:] = bytes(len(v))
            else:
                c.readv(views, coff)

    def _read_fast(self, offset: int, bufs: Sequence[Buffer]) -> bool:
        """One buffer inside one allocated segment: one table lookup, one preadv."""
        n = len(bufs[0])
        intra = offset & self.mask
        if intra + n > self.segment_size or offset < 0 or offset + n > self.size:
            return False
        e = self.table.entries[offset >> self.shift]
        if not e & t.MAPPED:
            return False
        c = self.pool.containers[(e >> t.CID_SHIFT) & t.CID_MASK]
        where = DATA_OFFSET + (e & t.PSEG_MASK) * self.segment_size + intra
        try:
            if os.preadv(c.fd, bufs, where) == n:
                return True
        except OSError:
            pass
        c.readv(bufs, where)  # the slow path names the error (or retries a short read)
        return True

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, [buf])
        return bytes(buf)

    def writev(self, offset: int, bufs: Sequence[Buffer | bytes], fua: bool = False) -> None:
        if not (len(bufs) == 1 and self._write_fast(offset, bufs)):
            length = sum(len(b) for b in bufs)
            parts = Cursor(bufs)
            for c, coff, n in self.map_write(offset, length):
                assert c is not None
                c.writev(parts.take(n), coff)
        if fua:
            self.flush()

    def _write_fast(self, offset: int, bufs: Sequence[Buffer | bytes]) -> bool:
        """One buffer inside one privately owned segment: no fault, one pwritev."""
        n = len(bufs[0])
        intra = offset & self.mask
        if intra + n > self.segment_size or offset < 0 or offset + n > self.size:
            return False
        e = self.table.entries[offset >> self.shift]
        if not e & t.MAPPED or self.readonly:
            return False
        cid, pseg = (e >> t.CID_SHIFT) & t.CID_MASK, e & t.PSEG_MASK
        if self.pool.refs[cid][pseg] != 1:
            return False
        c = self.pool.containers[cid]
        where = DATA_OFFSET + pseg * self.segment_size + intra
        try:
            if os.pwritev(c.fd, bufs, where) == n:
                return True
        except OSError:
            pass
        c.writev(bufs, where)  # the slow path names the error
        return True

    def write(self, offset: int, data: bytes | Buffer, fua: bool = False) -> None:
        self.writev(offset, [memoryview(data)], fua)

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate whole segments in the range; zero the partial ones at its ends."""
        if self.readonly:
            raise ReadOnly(f"{self.name} is a snapshot and cannot be written")
        self._check_range(offset, length)
        end = offset + length
        whole: list[int] = []
        while offset < end:
            index, intra = offset >> self.shift, offset & self.mask
            n = min(end - offset, self.segment_size - intra)
            seg_len = min(self.segment_size, self.size - (index << self.shift))
            if intra == 0 and n >= seg_len:
                whole.append(index)
            elif self.table[index] & t.MAPPED:
                for c, coff, m in self.map_write(offset, n):
                    assert c is not None
                    c.zero(coff, m)
            offset += n
        self.catalog.drop_entries(self, whole)

    # --- the block-backend face (what the TCMU SCSI layer calls) -------------------------

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.readinto(offset, bufs)

    def try_read_into(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """The read if it is one syscall on an allocated segment, else False (nothing done)."""
        return len(bufs) == 1 and self._read_fast(offset, bufs)

    def try_write_from(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """The write if it needs no fault and no lock wait, else False (nothing done)."""
        if len(bufs) != 1:
            return False
        stripes = self._stripes(offset, bufs[0].nbytes)
        if len(stripes) != 1 or not stripes[0].acquire(blocking=False):
            return False
        try:
            return self._write_fast(offset, bufs)
        finally:
            stripes[0].release()

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        length = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        with _Stripes(self._stripes(offset, length)):
            self.writev(offset, bufs, fua)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap:
            self.unmap(offset, length)
            return
        zeros = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.writev(offset, [zeros[:n]])
            offset += n

    def compare_and_write(self, offset: int, verify: memoryview, write: memoryview) -> int | None:
        """SBC COMPARE AND WRITE: atomic against writes through ``write_from``."""
        with _Stripes(self._stripes(offset, len(verify))):
            current = self.read(offset, len(verify))
            if current != verify:
                return next(i for i in range(len(verify)) if current[i] != verify[i])
            self.writev(offset, [write])
            return None

    def _stripes(self, offset: int, length: int) -> list[threading.Lock]:
        # Writes and COMPARE AND WRITE to a segment serialize on one of a few locks.
        first, last = offset >> self.shift, max(offset, offset + length - 1) >> self.shift
        base = self.vid * 31
        return [_STRIPES[(base + i) % len(_STRIPES)] for i in range(first, last + 1)]

    def flush(self) -> None:
        """Make every write so far durable (SYNCHRONIZE CACHE).

        A container flush that failed since this vdisk's previous flush (whoever's commit
        met it) fails this flush too if the vdisk has data in that container: writes it
        acknowledged may not be on the medium.  Vdisks with no data there are not told.
        """
        self.catalog.commit(sync=[self.pool])
        check_synced(self.name, self._synced, self.pool.containers, self.table.view)

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Consecutive (offset, length, mapped) runs covering the range (GET LBA STATUS)."""
        self._check_range(offset, length)
        runs: list[tuple[int, int, bool]] = []
        end = offset + length
        while offset < end:
            index = offset >> self.shift
            n = min(end - offset, ((index + 1) << self.shift) - offset)
            mapped = bool(self.table[index] & t.MAPPED)
            if runs and runs[-1][2] == mapped:
                o, m, _ = runs[-1]
                runs[-1] = (o, m + n, mapped)
            else:
                runs.append((offset, n, mapped))
            offset += n
        return runs


class _Stripes:
    """Hold several stripe locks, taken in a global order so two holders cannot deadlock."""

    __slots__ = ("_locks",)

    def __init__(self, locks: list[threading.Lock]) -> None:
        self._locks = sorted(set(locks), key=id) if len(locks) > 1 else locks

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self._locks):
            lock.release()


class Cursor:
    """Consumes a list of buffers in byte counts, yielding views (no copies)."""

    __slots__ = ("_bufs", "_i", "_off")

    def __init__(self, bufs: Sequence[Buffer | bytes]) -> None:
        self._bufs = [memoryview(b).cast("B") for b in bufs]
        self._i = 0
        self._off = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        while n:
            buf = self._bufs[self._i]
            k = min(n, len(buf) - self._off)
            if k:
                out.append(buf[self._off : self._off + k])
            self._off += k
            n -= k
            if self._off == len(buf):
                self._i += 1
                self._off = 0
        return out


def check_synced(
    name: str,
    synced: dict[int, int],
    containers: dict[int, Container],
    table: Callable[[], np.ndarray[Any, np.dtype[np.uint64]]],
) -> None:
    """Raise :class:`ContainerWriteError` if a container that the entries ``table()``
    returns map into failed a flush since ``synced`` (updated here) last saw it."""
    failed = []
    mapped: np.ndarray[Any, np.dtype[np.uint64]] | None = None
    for cid, c in list(containers.items()):
        if c.sync_errors == synced.get(cid, 0):
            continue
        synced[cid] = c.sync_errors
        if mapped is None:
            entries = table()
            mapped = entries[(entries & np.uint64(t.MAPPED)) != 0]
        if np.any(((mapped >> np.uint64(t.CID_SHIFT)) & np.uint64(t.CID_MASK)) == cid):
            failed.append(f"container {cid} ({c.path}): {c.sync_error}")
    if failed:
        raise ContainerWriteError(
            f"{name}: flushing {'; '.join(failed)}; data written there since the previous "
            "flush may be lost"
        )


def check_size(size: int, what: str = "size") -> None:
    if size <= 0:
        raise InvalidArgument(f"{what} must be positive, got {size}")


def now() -> float:
    return time.time()
