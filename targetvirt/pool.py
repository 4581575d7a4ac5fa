"""Pools: containers of one segment size, an allocator, and a refcount per segment.

Refcounts are *derived* state: they are recounted from the tables when a pool is opened
and then maintained incrementally (the model tests check them against a recount after
every step).  Storing them would only add a way for metadata to disagree with itself.

A segment is free exactly when its refcount is zero.  A segment whose count drops to zero
is *quarantined* until the metadata commit that dropped it is durable: until then the
durable tables may still map it, so handing it to another vdisk could make an entry point
at another vdisk's data after a crash.

Placement policy: a new segment goes to the online container with the most free segments
(ties: the lowest container id); containers being evacuated or failed get none.
"""

from __future__ import annotations

import uuid as uuidlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from targetvirt import table as t
from targetvirt.container import Container
from targetvirt.errors import InUse, InvalidArgument, NotFound, PoolFull

MIN_SEGMENT = 64 << 10
MAX_SEGMENT = 64 << 20
DEFAULT_SEGMENT = 1 << 20
_SLICE = 1 << 16  # entries per slice of a bulk refcount update (512 KiB: stays in cache)
_PSEG = np.uint64(t.PSEG_MASK)


def check_segment_size(size: int) -> None:
    if size < MIN_SEGMENT or size > MAX_SEGMENT or size & (size - 1):
        raise InvalidArgument(f"segment size {size} must be a power of two from 64 KiB to 64 MiB")


@dataclass
class ContainerUsage:
    cid: int
    path: str
    kind: str
    segments: int
    used: int
    free: int
    state: str


class Pool:
    """The containers of one pool and the bookkeeping of their segments."""

    def __init__(self, name: str, uuid: str, segment_size: int, pid: int = 0) -> None:
        check_segment_size(segment_size)
        self.name = name
        self.uuid = uuid
        self.pid = pid
        self.segment_size = segment_size
        self.containers: dict[int, Container] = {}
        self.refs: dict[int, array[int]] = {}  # per container: refcount of each segment
        self._free: dict[int, array[int]] = {}
        self._quarantine: list[int] = []  # packed entries freed since the last commit
        self.draining: set[int] = set()

    @classmethod
    def new(cls, name: str, segment_size: int = DEFAULT_SEGMENT) -> Pool:
        return cls(name, str(uuidlib.uuid4()), segment_size)

    # --- containers ----------------------------------------------------------------

    def next_cid(self) -> int:
        cid = max(self.containers, default=-1) + 1
        if cid >= t.MAX_CONTAINERS:
            raise InvalidArgument(f"pool {self.name} cannot hold more containers")
        return cid

    def attach(self, container: Container) -> None:
        """Add a container whose segments are all free (its refs are counted later)."""
        if container.segment_size != self.segment_size:
            raise InvalidArgument(
                f"container {container.path} has {container.segment_size}-byte segments, "
                f"pool {self.name} uses {self.segment_size}"
            )
        if container.nsegments > t.MAX_SEGMENTS:
            raise InvalidArgument(f"container {container.path} has too many segments")
        cid = container.cid
        self.containers[cid] = container
        self.refs[cid] = array("I", bytes(4 * container.nsegments))
        self._free[cid] = array("I", range(container.nsegments - 1, -1, -1))

    def detach(self, cid: int) -> Container:
        """Remove an empty container from the pool."""
        container = self.container(cid)
        used = container.nsegments - len(self._free[cid])
        if used or any(t.cid_of(e) == cid for e in self._quarantine):
            raise InUse(
                f"container {cid} of pool {self.name} still holds {used} segments; evacuate it"
            )
        del self.containers[cid], self.refs[cid], self._free[cid]
        self.draining.discard(cid)
        return container

    def container(self, cid: int) -> Container:
        try:
            return self.containers[cid]
        except KeyError:
            raise NotFound(f"pool {self.name} has no container {cid}") from None

    # --- refcounts -----------------------------------------------------------------

    def refcount(self, entry: int) -> int:
        return self.refs[t.cid_of(entry)][t.pseg_of(entry)]

    def incref(self, entry: int) -> None:
        self.refs[t.cid_of(entry)][t.pseg_of(entry)] += 1

    def decref(self, entry: int) -> None:
        refs = self.refs[t.cid_of(entry)]
        pseg = t.pseg_of(entry)
        refs[pseg] -= 1
        if refs[pseg] == 0:
            self._quarantine.append(t.location(entry))

    def _by_container(
        self, entries: npt.NDArray[np.uint64]
    ) -> Iterable[tuple[int, npt.NDArray[np.int64]]]:
        """(container id, segment numbers) of the mapped entries, one container at a time."""
        mapped = entries[(entries & np.uint64(t.MAPPED)) != 0]
        psegs = (mapped & np.uint64(t.PSEG_MASK)).astype(np.int64)
        if len(self.containers) == 1:  # the common case: no per-container split needed
            (cid,) = self.containers
            yield cid, psegs
            return
        cids = (mapped >> np.uint64(t.CID_SHIFT)) & np.uint64(t.CID_MASK)
        for cid in self.containers:
            mine = psegs[cids == cid]
            if mine.size:
                yield cid, mine

    def incref_table(self, table: t.Table) -> None:
        """+1 on every segment a table maps (a table maps a segment at most once).

        A live snapshot does this while writers are frozen, so it works in cache-sized
        slices and takes shortcuts for slices wholly mapped in a one-container pool: no
        mask, no copy (the segment numbers are the entries with MAPPED masked), and when
        those numbers form one dense run -- distinct, so max - min + 1 == count means a
        permutation of the run -- a plain slice add instead of a gather and a scatter.
        """
        view = table.view()
        only = next(iter(self.containers)) if len(self.containers) == 1 else None
        scratch = np.empty(min(len(view), _SLICE), dtype=np.uint64)
        for start in range(0, len(view), _SLICE):
            part = view[start : start + _SLICE]
            first = int(part.min()) if only is not None and part.size else 0
            if only is not None and first & t.MAPPED:
                # one container: the container bits are all equal, so entries order as
                # their segment numbers do
                low, high = first & t.PSEG_MASK, int(part.max()) & t.PSEG_MASK
                refs = self.refs_view(only)
                if high - low + 1 == part.size:
                    refs[low : high + 1] += 1
                else:
                    psegs = np.bitwise_and(part, _PSEG, out=scratch[: part.size])
                    refs[psegs.view(np.int64)] += 1
                continue
            for cid, psegs_ in self._by_container(part):
                self.refs_view(cid)[psegs_] += 1

    def decref_table(self, table: t.Table) -> None:
        for cid, psegs in self._by_container(table.view()):
            refs = np.frombuffer(self.refs[cid], dtype=np.uint32)
            refs[psegs] -= 1
            for pseg in psegs[refs[psegs] == 0].tolist():
                self._quarantine.append(t.pack(cid, pseg))

    def recount(self, tables: Iterable[t.Table]) -> dict[int, npt.NDArray[np.uint32]]:
        """Refcounts recomputed from scratch from ``tables`` (for checks and loading)."""
        counts = {cid: np.zeros(c.nsegments, dtype=np.uint32) for cid, c in self.containers.items()}
        for table in tables:
            for cid, psegs in self._by_container(table.view()):
                if cid not in counts or (psegs.size and int(psegs.max()) >= counts[cid].size):
                    raise InvalidArgument(f"a table maps outside pool {self.name}")
                np.add.at(counts[cid], psegs, 1)
        return counts

    def load_refcounts(self, tables: Iterable[t.Table]) -> None:
        """Set refcounts and free lists from the durable tables (at open)."""
        for cid, counts in self.recount(tables).items():
            self.refs[cid] = array("I", counts.tobytes())
            free = np.flatnonzero(counts == 0)[::-1].astype(np.uint32)
            self._free[cid] = array("I", free.tobytes())
        self._quarantine.clear()

    def refs_view(self, cid: int) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.refs[cid], dtype=np.uint32)

    # --- allocation ----------------------------------------------------------------

    def allocate(self, exclude: int | None = None, only: int | None = None) -> int:
        """Take a free segment (refcount becomes 1); returns its packed entry.

        ``exclude``: never from this container; ``only``: from this container or none.
        """
        best, best_free = -1, 0
        for cid, free in self._free.items():
            if cid == exclude or (only is not None and cid != only):
                continue
            if only is None and (cid in self.draining or self.containers[cid].failed):
                continue
            if len(free) > best_free:
                best, best_free = cid, len(free)
        if best < 0:
            raise PoolFull(f"pool {self.name} has no free segment")
        pseg = self._free[best].pop()
        self.refs[best][pseg] = 1
        return t.pack(best, pseg)

    @property
    def quarantined(self) -> int:
        return len(self._quarantine)

    def take_quarantine(self) -> list[int]:
        """Segments whose freeing is now durable: the caller frees them."""
        freed, self._quarantine = self._quarantine, []
        return freed

    def requarantine(self, entries: Iterable[int]) -> None:
        """Put back segments whose freeing did not become durable (failed commit)."""
        self._quarantine.extend(entries)

    def release(self, entries: Iterable[int]) -> None:
        """Return quarantined segments to the free lists (after the commit is durable)."""
        for entry in set(entries):  # a set: a segment must never enter a free list twice
            cid, pseg = t.cid_of(entry), t.pseg_of(entry)
            if cid in self._free and self.refs[cid][pseg] == 0:
                self._free[cid].append(pseg)

    # --- accounting ----------------------------------------------------------------

    def free_segments(self, cid: int | None = None) -> int:
        if cid is not None:
            return len(self._free[cid])
        return sum(len(f) for f in self._free.values())

    def total_segments(self) -> int:
        return sum(c.nsegments for c in self.containers.values())

    def used_segments(self, cid: int) -> int:
        return self.containers[cid].nsegments - len(self._free[cid])

    def usage(self) -> list[ContainerUsage]:
        rows = []
        for cid, c in sorted(self.containers.items()):
            state = "failed" if c.failed else "evacuating" if cid in self.draining else "online"
            used = self.used_segments(cid)
            rows.append(
                ContainerUsage(cid, c.path, c.kind, c.nsegments, used, c.nsegments - used, state)
            )
        return rows

    def segments_in(self, cid: int) -> list[int]:
        """Segments of a container that some table maps (for evacuation)."""
        found: list[int] = np.flatnonzero(self.refs_view(cid)).tolist()
        return found
