"""Segment tables: one packed 64-bit entry per virtual segment.

A table is an ``array('Q')``: no per-entry Python objects, 8 bytes per entry (8 MiB per
TiB of vdisk at 1 MiB segments), copied with one memcpy.  Entry layout::

    bit 63       MAPPED    the entry names a physical segment (0 = unallocated, reads zeros)
    bits 59..60  STATE     agent copies only: NORMAL, NOWRITE (writes wait), INVALID (refetch);
                           bit 60 set means invalid whatever bit 59 says, so an agent can
                           freeze or invalidate a whole table with one in-place OR
    bit 58       SHARED    agent copies only: a write must ask the controller (COW / check)
    bits 40..55  container id within the pool
    bits  0..39  physical segment number within the container

The controller's master tables only ever hold MAPPED + container + segment; the state
and SHARED bits are the agents' volatile annotations.  A value of 0 is an unallocated
entry in every kind of table.

Tables are persisted as chunks of ``CHUNK_ENTRIES`` packed entries; a table remembers
which chunks changed since the last commit.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

MAPPED = 1 << 63
SHARED = 1 << 58
STATE_SHIFT = 59
STATE_MASK = 0b11 << STATE_SHIFT
NORMAL = 0
NOWRITE = 1
INVALID = 2
NOWRITE_BIT = NOWRITE << STATE_SHIFT
INVALID_BIT = INVALID << STATE_SHIFT
CID_SHIFT = 40
CID_MASK = 0xFFFF
PSEG_MASK = (1 << CID_SHIFT) - 1
LOCATION_MASK = MAPPED | (CID_MASK << CID_SHIFT) | PSEG_MASK

MAX_CONTAINERS = CID_MASK + 1
MAX_SEGMENTS = PSEG_MASK + 1

CHUNK_ENTRIES = 4096  # 32 KiB of packed entries per persisted chunk
ENTRY_BYTES = 8

if sys.byteorder != "little":  # pragma: no cover - tables are stored little-endian
    raise ImportError("targetvirt's packed tables assume a little-endian host")


def pack(cid: int, pseg: int) -> int:
    """The entry value mapping to segment ``pseg`` of container ``cid``."""
    return MAPPED | (cid << CID_SHIFT) | pseg


def cid_of(entry: int) -> int:
    return (entry >> CID_SHIFT) & CID_MASK


def pseg_of(entry: int) -> int:
    return entry & PSEG_MASK


def location(entry: int) -> int:
    """The entry without agent annotations: comparable across tables."""
    return entry & LOCATION_MASK


def state_of(entry: int) -> int:
    return (entry & STATE_MASK) >> STATE_SHIFT


def with_state(entry: int, state: int) -> int:
    return (entry & ~STATE_MASK) | (state << STATE_SHIFT)


class Table:
    """A packed segment table with dirty-chunk tracking."""

    __slots__ = ("_dirty", "changes", "entries")

    def __init__(self, entries: array[int]) -> None:
        if entries.typecode != "Q":
            raise TypeError("a table holds array('Q') entries")
        self.entries = entries
        self._dirty: set[int] = set()
        # Indexes assigned while a recorder is attached: the controller attaches one around
        # a mapping change to learn which agents' copies it must update.
        self.changes: set[int] | None = None

    @classmethod
    def unallocated(cls, n: int) -> Table:
        table = cls(array("Q", bytes(n * ENTRY_BYTES)))
        table.mark_all_dirty()
        return table

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Table:
        entries = array("Q")
        entries.frombytes(data)
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> int:
        return self.entries[index]

    def __setitem__(self, index: int, value: int) -> None:
        self.entries[index] = value
        self._dirty.add(index // CHUNK_ENTRIES)
        if self.changes is not None:
            self.changes.add(index)

    def copy(self, *, dirty: bool = True) -> Table:
        """A new table with the same entries (one memcpy).

        ``dirty=False`` when the store copies the chunks itself (snapshot of a durable table).
        """
        entries = array("Q")
        entries.frombytes(memoryview(self.entries).cast("B"))  # a memcpy, unlike array(it)
        table = Table(entries)
        if dirty:
            table.mark_all_dirty()
        return table

    def resize(self, n: int) -> None:
        old = len(self.entries)
        if n < old:
            del self.entries[n:]
        elif n > old:
            self.entries.frombytes(bytes((n - old) * ENTRY_BYTES))
        for c in range(min(old, n) // CHUNK_ENTRIES, self.nchunks):
            self._dirty.add(c)
        self._dirty = {c for c in self._dirty if c < self.nchunks}

    # --- persistence -------------------------------------------------------------

    @property
    def nchunks(self) -> int:
        return -(-len(self.entries) // CHUNK_ENTRIES)

    def chunk_bytes(self, c: int) -> bytes:
        return self.entries[c * CHUNK_ENTRIES : (c + 1) * CHUNK_ENTRIES].tobytes()

    def mark_all_dirty(self) -> None:
        self._dirty = set(range(self.nchunks))

    def take_dirty(self) -> list[int]:
        dirty = sorted(self._dirty)
        self._dirty = set()
        return dirty

    def restore_dirty(self, chunks: Iterable[int]) -> None:
        """Put chunks back after a failed commit so the next commit retries them."""
        self._dirty.update(c for c in chunks if c < self.nchunks)

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    # --- bulk views ----------------------------------------------------------------

    def view(self) -> npt.NDArray[np.uint64]:
        """A zero-copy numpy view (valid until the table is resized)."""
        return np.frombuffer(self.entries, dtype=np.uint64)

    def mapped_indices(self) -> npt.NDArray[np.intp]:
        return np.flatnonzero(self.view() & np.uint64(MAPPED))

    def mapped_count(self) -> int:
        return int(np.count_nonzero(self.view() & np.uint64(MAPPED)))

    def iter_mapped(self) -> Iterator[tuple[int, int]]:
        """(index, entry) of every mapped entry."""
        for i in self.mapped_indices().tolist():
            yield i, self.entries[i]
