"""Pools: containers of one segment size, an allocator, and a refcount per segment.

Refcounts are *derived* state: they are recounted from the tables when a pool is opened
and then maintained incrementally (the model tests check them against a recount after
every step).  Storing them would only add a way for metadata to disagree with itself.

A segment is free exactly when its refcount is zero.  Decrements are *deferred* until
the metadata commit that dropped the reference is durable: until then the durable tables
still map the segment, so the count must go on saying so.  Otherwise two things could
happen after a crash: a segment freed and handed to another vdisk would show that
vdisk's data through a stale durable entry; and a segment that looked private (count 1)
after a sharer moved away in memory would be written in place while the sharer's durable
table still maps it -- a snapshot would change.  With deferral, both stay shared (COW)
or unallocatable until the commit, then :meth:`Pool.settle` applies the decrements.

Soft threshold: a pool warns before it is full.  Its *usage* is the share of its segments
that new data cannot take -- allocated ones, plus the free ones of failed or evacuating
containers -- and :meth:`Pool.crossed_threshold` says when usage reaches ``threshold``
percent from below (the catalog turns that into the thin-provisioning soft-threshold unit
attention).  It re-arms once usage is below the threshold again.

Placement policy: a new segment goes to the online container with the most free segments
(ties: the lowest container id); containers being evacuated or failed get none.  A failed
container keeps the segments it holds (they are read and written as long as the medium
lets them) until an operator evacuates it or clears the mark.
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
DEFAULT_THRESHOLD = 80  # percent: the soft threshold of a new pool
_SLICE = 1 << 16  # entries per slice of a bulk refcount update (512 KiB: stays in cache)
_PSEG = np.uint64(t.PSEG_MASK)


def check_threshold(percent: int) -> None:
    if not 1 <= percent <= 100:
        raise InvalidArgument(f"the soft threshold must be from 1 to 100 percent, got {percent}")


def check_segment_size(size: int) -> None:
    if size < MIN_SEGMENT or size > MAX_SEGMENT or size & (size - 1):
        raise InvalidArgument(f"segment size {size} must be a power of two from 64 KiB to 64 MiB")


def _tally(
    psegs: npt.NDArray[np.int64], nsegments: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint32]]:
    """(segment, how many times it occurs in ``psegs``) for the segments below
    ``nsegments``.  A few drops (copy-on-write faults) are sorted, not counted in an array
    the size of the container: that costs milliseconds per TiB at every commit."""
    if psegs.size * 16 < nsegments:
        segs, times = np.unique(psegs, return_counts=True)
        keep = segs < nsegments
        return segs[keep].astype(np.intp), times[keep].astype(np.uint32)
    counts = np.bincount(psegs, minlength=nsegments)[:nsegments].astype(np.uint32)
    touched = np.flatnonzero(counts)
    return touched, counts[touched]


def _incref_mostly_run(refs: npt.NDArray[np.uint32], psegs: npt.NDArray[np.uint64]) -> None:
    """+1 on ``refs[psegs]`` (distinct segment numbers).

    The slices of a live snapshot that are not one dense run are mostly one run with a few
    entries elsewhere (segments copied on write since the table was filled): guess the run
    from the middle entry; if at most 1/8 of the entries stray from it, add 1 over the run
    and move the strays' +1 to their own segments -- two passes and two small scatters
    instead of a scatter of the whole slice (several times slower, and inside the window).
    """
    n = psegs.size
    run = int(psegs[n // 2]) - n // 2
    if run >= 0 and run + n <= refs.size:
        expected = np.arange(run, run + n, dtype=np.uint64)
        stray = np.flatnonzero(psegs != expected)
        if stray.size * 8 <= n:
            refs[run : run + n] += 1
            refs[run + stray] -= 1  # the run's segments those positions do not map...
            refs[psegs[stray].view(np.int64)] += 1  # ... and the ones they do
            return
    refs[psegs.view(np.int64)] += 1


@dataclass
class Dropped:
    """References dropped during one commit epoch (see :meth:`Pool.take_dropped`)."""

    entries: list[int]
    tables: list[npt.NDArray[np.uint64]]


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
        # references dropped since the last commit: single entries, and whole tables
        self._dropped: list[int] = []
        self._dropped_tables: list[npt.NDArray[np.uint64]] = []
        self.draining: set[int] = set()
        self.threshold = DEFAULT_THRESHOLD  # percent of the segments (see module doc)
        self.above_threshold = False

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
        if used:
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
        """Drop one reference once the commit that drops it is durable (see module doc)."""
        self._dropped.append(t.location(entry))

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
                    _incref_mostly_run(refs, psegs)
                continue
            for cid, psegs_ in self._by_container(part):
                self.refs_view(cid)[psegs_] += 1

    def decref_table(self, table: t.Table) -> None:
        """:meth:`decref` for every entry of a table (deleted, or replaced by a rollback)."""
        self._dropped_tables.append(table.view().copy())

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
        self._dropped.clear()
        self._dropped_tables.clear()

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
            raise PoolFull(f"pool {self.name} has no free segment" + self._unusable(only))
        pseg = self._free[best].pop()
        self.refs[best][pseg] = 1
        return t.pack(best, pseg)

    def _unusable(self, only: int | None) -> str:
        """Why free segments that exist were not taken (for the PoolFull message)."""
        why = [
            f"container {cid} {'failed' if self.containers[cid].failed else 'evacuating'}"
            for cid, free in sorted(self._free.items())
            if free and only is None and (cid in self.draining or self.containers[cid].failed)
        ]
        return f" for new data ({', '.join(why)})" if why else ""

    def release(self, entry: int) -> None:
        """Give back a segment just taken by :meth:`allocate` that nothing maps yet
        (filling it failed): it is free again at once."""
        cid, pseg = t.cid_of(entry), t.pseg_of(entry)
        if self.refs[cid][pseg] != 1:
            raise InvalidArgument(f"segment {pseg} of container {cid} is not freshly allocated")
        self.refs[cid][pseg] = 0
        self._free[cid].append(pseg)

    @property
    def unsettled(self) -> bool:
        """Whether references were dropped since the last commit (a commit may free some)."""
        return bool(self._dropped or self._dropped_tables)

    def take_dropped(self) -> Dropped:
        """The references dropped so far, to settle once the commit now starting is durable."""
        dropped = Dropped(self._dropped, self._dropped_tables)
        self._dropped, self._dropped_tables = [], []
        return dropped

    def restore_dropped(self, dropped: Dropped) -> None:
        """The commit failed: those references are still durable, keep them pending."""
        self._dropped[:0] = dropped.entries
        self._dropped_tables[:0] = dropped.tables

    def settled_refs(self, cid: int) -> npt.NDArray[np.int64]:
        """What the refcounts will be once every dropped reference settles (accounting)."""
        return self.refs_view(cid).astype(np.int64) - self.pending_drops(cid)

    def pending_drops(self, cid: int) -> npt.NDArray[np.uint32]:
        """Per segment of ``cid``: references dropped but not yet settled (for checks)."""
        counts = np.zeros(self.containers[cid].nsegments, dtype=np.uint32)
        for c, psegs in self._dropped_by_container(Dropped(self._dropped, self._dropped_tables)):
            if c == cid:
                counts += np.bincount(psegs, minlength=counts.size).astype(np.uint32)
        return counts

    def _dropped_by_container(
        self, dropped: Dropped
    ) -> Iterable[tuple[int, npt.NDArray[np.int64]]]:
        arrays = [np.array(dropped.entries, dtype=np.uint64), *dropped.tables]
        for entries in arrays:
            yield from self._by_container(entries)

    def settle(self, dropped: Dropped) -> list[int]:
        """Apply decrements whose commit is durable; returns the segments now free.

        Freed segments go back to the free lists; the caller discards their space.
        """
        freed: list[int] = []
        for cid, psegs in self._dropped_by_container(dropped):
            if cid not in self.refs or not psegs.size:
                continue  # (every commit settles, a live snapshot's in its freeze window)
            refs = self.refs_view(cid)
            touched, counts = _tally(psegs, refs.size)
            refs[touched] -= counts
            zero = touched[refs[touched] == 0]
            self._free[cid].extend(zero.astype(np.uint32).tolist())
            freed.extend(t.pack(cid, int(p)) for p in zero.tolist())
        return freed

    # --- accounting ----------------------------------------------------------------

    def available_segments(self) -> int:
        """Free segments that new data may take (not in failed or evacuating containers)."""
        return sum(
            len(free) for cid, free in self._free.items()
            if cid not in self.draining and not self.containers[cid].failed
        )  # fmt: skip

    def usage_percent(self) -> float:
        """The share of the pool new data cannot take, in percent (see module doc)."""
        total = self.total_segments()
        return 100.0 * (total - self.available_segments()) / total if total else 100.0

    def crossed_threshold(self) -> bool:
        """Re-evaluate the soft threshold: True when usage has just reached it from below."""
        total = self.total_segments()
        above = (total - self.available_segments()) * 100 >= self.threshold * total
        crossed = above and not self.above_threshold
        self.above_threshold = above
        return crossed

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
