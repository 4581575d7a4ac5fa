"""The catalog: every pool and vdisk of one metadata store, and every change to them.

The catalog is the engine's single writer.  It decides each mapping change (allocation,
copy-on-write, unmap, snapshot, migration...) under one lock and makes it durable in
:meth:`commit`, which always syncs the containers before the metadata that points into
them.  Management operations commit before they return; data-path mapping changes are
committed at flush (SYNCHRONIZE CACHE, FUA, or the periodic flush), like a disk with a
volatile write cache.

Until then they are *journaled* (where the store keeps a journal): written to the store
at once but without waiting for the medium, tagged with the host's boot id.  A process
that dies -- killed, crashed, OOM -- loses no mapping change: the next open of the same
boot replays the journal (the data those entries point at is in the page cache, written
before the write that needed the mapping was answered) and commits it durably.  After a
reboot the journal is discarded: then, as after a power cut on a disk with a volatile
cache, only what was flushed is kept.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from targetvirt import table as t
from targetvirt.container import Container, ContainerLabel
from targetvirt.errors import (
    AlreadyExists,
    Cancelled,
    ContainerWriteError,
    InUse,
    InvalidArgument,
    NotFound,
    PoolFull,
    ReadOnly,
    StoreCorrupt,
    TargetvirtError,
)
from targetvirt.pool import DEFAULT_SEGMENT, DEFAULT_THRESHOLD, Dropped, Pool, check_threshold
from targetvirt.store.base import (
    Image,
    JournalEntry,
    Store,
    Transaction,
    chunk_hash,
    table_root,
)
from targetvirt.vdisk import (
    COW_MODES,
    KIND_SNAPSHOT,
    KIND_VDISK,
    CowMode,
    Family,
    Freeze,
    VDisk,
    check_size,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SNAP_SEP = "@"

# progress(done, total) -> None; raise Cancelled (or anything) to stop between steps
Progress = Callable[[int, int], None]
# told (under the catalog lock, so quickly) that a pool's usage reached its soft threshold
ThresholdListener = Callable[[Pool], None]
COMMIT_EVERY = 256  # long operations make their progress durable this often (segments)
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def host_boot_id() -> str:
    """The kernel's id of this boot; a process-unique id where there is none (then no
    journal is ever replayed: the safe side)."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip() or uuidlib.uuid4().hex
    except (OSError, ValueError):
        return uuidlib.uuid4().hex


def check_name(name: str, what: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"{what} name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


_ENGINE_KINDS = ("pool", "container", "vdisk")


def _no_progress(done: int, total: int) -> None:
    pass


@dataclass
class PoolUsage:
    name: str
    segment_size: int
    total_bytes: int
    used_bytes: int
    free_bytes: int


class Catalog:
    """Pools, containers and vdisks persisted in one :class:`Store`."""

    def __init__(
        self,
        store: Store,
        wallclock: Callable[[], float] = time.time,
        boot_id: str | None = None,
    ) -> None:
        self.store = store
        self.wallclock = wallclock
        self.boot_id = boot_id if boot_id is not None else host_boot_id()
        self._journaled = False  # the store's journal holds rows (cleared by a commit)
        self.replayed = 0  # journaled mapping changes taken over at open
        # Commit every data-path mapping change before anyone learns of it, where the
        # store keeps no journal: a standby controller may take over a shared store
        # (RADOS) at any moment, and must find every segment an agent was given.
        self.durable_mappings = False
        self.lock = threading.RLock()
        self.pools: dict[str, Pool] = {}
        self.vdisks: dict[str, VDisk] = {}
        self._by_vid: dict[int, VDisk] = {}
        self._families: dict[int, Family] = {}
        self._next_id = 1
        self._pending = Transaction()
        self.commits = 0
        self._closed = False
        self.threshold_listeners: list[ThresholdListener] = []
        # records of kinds the engine does not interpret (the controller's agent list)
        self._aux: dict[str, dict[int, dict[str, Any]]] = {}

    # --- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: Store,
        wallclock: Callable[[], float] = time.time,
        boot_id: str | None = None,
    ) -> Catalog:
        """Load the catalog from ``store``, which it owns from now on: on failure the
        store and any container opened so far are closed (a leaked SQLite connection
        would checkpoint its stale WAL into the file whenever it is collected).

        A journal left by a process that died is replayed and made durable at once (if it
        is of this boot) or discarded (see the module's docstring).
        """
        catalog = cls(store, wallclock, boot_id)
        try:
            catalog._load(store.load())
            if catalog._journaled and not store.readonly:
                catalog.commit()
        except BaseException:
            catalog._release()
            raise
        return catalog

    def _load(self, image: Image) -> None:
        try:
            self._load_records(image)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreCorrupt(
                f"a metadata record is malformed ({type(e).__name__}: {e})"
            ) from None

    def _load_records(self, image: Image) -> None:
        recs = image.records
        self._aux = {k: dict(v) for k, v in recs.items() if k not in _ENGINE_KINDS}
        ids = [*recs.get("pool", {}), *recs.get("vdisk", {})]
        self._next_id = max(ids, default=0) + 1
        pools_by_pid: dict[int, Pool] = {}
        for pid, body in sorted(recs.get("pool", {}).items()):
            pool = Pool(body["name"], body["uuid"], body["segment_size"], pid)
            pool.threshold = int(body.get("threshold", DEFAULT_THRESHOLD))
            pools_by_pid[pid] = pool
            self.pools[pool.name] = pool
        for body in recs.get("container", {}).values():
            if body["pool"] not in pools_by_pid:
                raise StoreCorrupt(f"container record names unknown pool {body['pool']}")
            self._open_container(pools_by_pid[body["pool"]], body)
        for vid, body in sorted(recs.get("vdisk", {}).items()):
            self._load_vdisk(vid, body, image, pools_by_pid)
        self._replay(image)
        for pool in self.pools.values():
            pool.load_refcounts(v.table for v in self.vdisks.values() if v.pool is pool)
            # a pool found above its threshold counts as having crossed it already: the
            # warning is for a crossing, and re-arms once usage is below it again
            pool.crossed_threshold()

    def _replay(self, image: Image) -> None:
        """Apply the journal of this boot over the durable tables (marking their chunks
        dirty for the commit that follows); a journal of another boot is only counted."""
        stale = 0
        for boot, vid, index, entry in image.journal:
            if boot != self.boot_id:
                stale += 1
                continue
            vdisk = self._by_vid.get(vid)
            if vdisk is None or index >= len(vdisk.table) or entry & ~t.LOCATION_MASK:
                raise StoreCorrupt(f"a journaled mapping change ({vid}, {index}) fits no table")
            vdisk.table[index] = entry
            self.replayed += 1
        self._journaled = bool(image.journal)
        if self.replayed:
            log.warning(
                "took over %d mapping changes journaled by a process that ended without "
                "committing them", self.replayed,
            )  # fmt: skip
        if stale:
            log.warning(
                "discarded %d mapping changes journaled before the last reboot (never "
                "flushed: the initiator's writes there were not yet durable)", stale,
            )  # fmt: skip

    def _open_container(self, pool: Pool, body: dict[str, Any]) -> None:
        # "path" is the container's location: a file or device path, or a RADOS location
        label = ContainerLabel(
            body["kind"], pool.uuid, body["uuid"], body["cid"], pool.segment_size,
            body["nsegments"],
        )  # fmt: skip
        container = Container.open(body["path"], label, body["preallocated"])
        container.failure = str(body.get("failed", ""))
        self._attach(pool, container)
        if body.get("draining"):
            pool.draining.add(label.cid)

    def _attach(self, pool: Pool, container: Container) -> None:
        pool.attach(container)
        container.on_failure = functools.partial(self._container_failed, pool)

    def _container_failed(self, pool: Pool, container: Container, first: bool) -> None:
        """A container met a medium error: from the first one on it takes no new segments
        (the pool's allocator skips it) and the mark is durable at the next commit."""
        if not first:
            return
        log.error(
            "container %d of pool %s (%s) failed: %s; it takes no new segments until an "
            "operator clears it", container.cid, pool.name, container.path, container.failure,
        )  # fmt: skip
        with self.lock:
            if pool.containers.get(container.cid) is container:
                self._stage_container(pool, container)
                self._check_threshold(pool)  # its free segments are out of reach now

    def _check_threshold(self, pool: Pool) -> None:
        """Tell the listeners if the pool's usage has just reached its soft threshold."""
        if not pool.crossed_threshold():
            return
        log.warning(
            "pool %s is %.0f%% used: it reached its soft threshold of %d%%",
            pool.name, pool.usage_percent(), pool.threshold,
        )  # fmt: skip
        for listener in list(self.threshold_listeners):
            try:
                listener(pool)
            except Exception:  # a listener's bug must not fail the write that allocated
                log.exception("soft threshold listener failed")

    def _load_vdisk(
        self, vid: int, body: dict[str, Any], image: Image, pools: dict[int, Pool]
    ) -> None:
        if vid not in image.tables:
            raise StoreCorrupt(f"vdisk {body.get('name')} has no table in the store")
        data, hashes = image.tables[vid]
        if table_root(hashes) != body["root"]:
            raise StoreCorrupt(f"the table of vdisk {body['name']} does not match its checksum")
        table = t.Table.from_bytes(data)
        if len(table) != body["entries"]:
            raise StoreCorrupt(f"the table of vdisk {body['name']} has the wrong length")
        vdisk = VDisk(
            self, vid=vid, name=body["name"], uuid=body["uuid"], kind=body["kind"],
            pool=pools[body["pool"]], family=self._family(body["family"]),
            parent=body["parent"], size=body["size"], cow=body["cow"],
            created=body["created"], table=table, hashes=hashes,
        )  # fmt: skip
        vdisk.freeze = self._load_freeze(body)
        self._register(vdisk)

    @staticmethod
    def _load_freeze(body: dict[str, Any]) -> Freeze | None:
        """A vdisk's freeze as stored; damage is named, never read as "not frozen"."""
        if "freeze" not in body:
            return None
        try:
            return Freeze.from_record(body["freeze"])
        except InvalidArgument as e:
            raise StoreCorrupt(f"the freeze of vdisk {body['name']} is damaged: {e}") from None

    def _family(self, fid: int) -> Family:
        return self._families.setdefault(fid, Family(fid))

    def _register(self, vdisk: VDisk) -> None:
        self.vdisks[vdisk.name] = vdisk
        self._by_vid[vdisk.vid] = vdisk
        vdisk.family.members.append(vdisk)

    def _unregister(self, vdisk: VDisk) -> None:
        del self.vdisks[vdisk.name]
        del self._by_vid[vdisk.vid]
        vdisk.family.members.remove(vdisk)
        if not vdisk.family.members:
            del self._families[vdisk.family.fid]

    def _new_id(self) -> int:
        nid = self._next_id
        self._next_id += 1
        return nid

    def close(self) -> None:
        """Commit and close the store and the containers (a second close does nothing)."""
        with self.lock:
            if self._closed:
                return
            self.flush()
            self._release()
            self._closed = True

    def _release(self) -> None:
        for pool in self.pools.values():
            for c in pool.containers.values():
                c.close()
        self.store.close()

    # --- lookups -------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"no pool named {name!r}") from None

    def vdisk(self, name: str) -> VDisk:
        try:
            return self.vdisks[name]
        except KeyError:
            what = "snapshot" if SNAP_SEP in name else "vdisk"
            raise NotFound(f"no {what} named {name!r}") from None

    def by_vid(self, vid: int) -> VDisk:
        return self._by_vid[vid]

    def snapshots_of(self, vdisk: VDisk) -> list[VDisk]:
        prefix = vdisk.name + SNAP_SEP
        return [v for v in self.vdisks.values() if v.name.startswith(prefix)]

    def pool_usage(self, pool: Pool) -> PoolUsage:
        total = pool.total_segments() * pool.segment_size
        free = pool.free_segments() * pool.segment_size
        return PoolUsage(pool.name, pool.segment_size, total, total - free, free)

    # --- users' freezes (the controller applies them) ------------------------------------

    def set_freezes(self, freezes: Mapping[str, Freeze | None]) -> None:
        """Record (``None``: clear) the freezes of vdisks, durably, in one commit: all of
        them or, if the commit fails, none (and nothing is left staged for a later one)."""
        with self.lock:
            vdisks = [(self.vdisk(name), freeze) for name, freeze in freezes.items()]
            before = [(v, v.freeze) for v, _ in vdisks]
            for v, freeze in vdisks:
                v.freeze, v.record_dirty = freeze, True
            try:
                self.commit()
            except BaseException:
                for v, freeze in before:
                    v.freeze = freeze  # the retried record carries the old freeze again
                raise

    # --- other components' records ----------------------------------------------------

    def records(self, kind: str) -> dict[int, dict[str, Any]]:
        """Durable records of a kind the engine does not interpret (a copy)."""
        if kind in _ENGINE_KINDS:
            raise InvalidArgument(f"{kind} records belong to the engine")
        with self.lock:
            return {k: dict(v) for k, v in self._aux.get(kind, {}).items()}

    def put_record(self, kind: str, key: int, body: dict[str, Any] | None) -> None:
        """Stage (``None``: delete) one such record; durable at the next commit."""
        if kind in _ENGINE_KINDS:
            raise InvalidArgument(f"{kind} records belong to the engine")
        with self.lock:
            if body is None:
                self._aux.get(kind, {}).pop(key, None)
                self._pending.delete(kind, key)
            else:
                self._aux.setdefault(kind, {})[key] = dict(body)
                self._pending.put(kind, key, body)

    # --- durability ------------------------------------------------------------------

    def commit(self, *, sync: Iterable[Pool] = ()) -> None:
        """Make every change so far durable: containers first, then metadata.

        ``sync``: pools whose containers are synced even when no metadata changed -- a
        flush must make data written in place durable, and that changes no metadata.

        If it fails nothing is lost from memory: the staged changes stay pending and the
        next commit retries them (the caller that asked for durability gets the error).
        """
        with self.lock:
            dropped = {name: pool.take_dropped() for name, pool in self.pools.items()}
            txn, self._pending = self._pending, Transaction()
            staged = [(v, self._stage_table(v, txn)) for v in self.vdisks.values()]
            journaled, self._journaled = self._journaled, False
            if journaled:
                txn.clear_journal()  # this commit covers every journaled change
            try:
                if txn.empty and not any(d.entries or d.tables for d in dropped.values()):
                    self._sync_containers(sync)
                    return
                self._sync_containers(self.pools.values())
                if not txn.empty:
                    self.store.commit(txn)
            except BaseException:
                self._journaled = journaled
                self._unstage(txn, staged, dropped)
                raise
            self.commits += 1
            for name, d in dropped.items():
                if name in self.pools:
                    self._discard(self.pools[name], self.pools[name].settle(d))
                    self._check_threshold(self.pools[name])  # freed segments re-arm it

    def flush(self) -> None:
        """Make everything durable, data written in place included (the periodic flush)."""
        with self.lock:
            self.commit(sync=list(self.pools.values()))

    def _journal(self, changes: Iterable[tuple[VDisk, int]]) -> None:
        """Journal data-path mapping changes (see the module's docstring) before anyone
        is told of them.  If the journal cannot be written, commit durably instead."""
        if not self.store.journals:
            # (RADOS) durable at the next flush, or now for a controller with a standby
            if self.durable_mappings:
                self.commit()
            return
        entries: list[JournalEntry] = [(v.vid, i, t.location(v.table[i])) for v, i in changes]
        if not entries:
            return
        self._journaled = True
        try:
            self.store.journal(self.boot_id, entries)
        except TargetvirtError as e:
            log.warning("%s; committing instead", e)
            self.commit()

    @staticmethod
    def _sync_containers(pools: Iterable[Pool]) -> None:
        """fdatasync the containers of ``pools``.  One that fails does not stop the commit:
        the metadata of every other container's data must still become durable.  The
        failure is counted in the container (``sync_errors``), and the flush of each vdisk
        with data there reports it (:meth:`VDisk.flush`): its data may not be on the
        medium."""
        for pool in pools:
            for c in pool.containers.values():
                was_failing = c.sync_failing
                try:
                    c.sync()
                except TargetvirtError as e:
                    if not was_failing:  # once per streak of failed flushes
                        log.error("%s", e)

    def _stage_table(self, vdisk: VDisk, txn: Transaction) -> list[int]:
        dirty = vdisk.table.take_dirty()
        if not dirty and not vdisk.record_dirty:
            return dirty
        hashes = vdisk.hashes
        del hashes[vdisk.table.nchunks :]
        hashes.extend([b""] * (vdisk.table.nchunks - len(hashes)))
        for c in dirty:
            data = vdisk.table.chunk_bytes(c)
            hashes[c] = chunk_hash(data)
            txn.chunk(vdisk.vid, c, hashes[c], data)
        txn.truncate(vdisk.vid, vdisk.table.nchunks)
        txn.put("vdisk", vdisk.vid, {**vdisk.record(), "root": table_root(hashes)})
        vdisk.record_dirty = False
        return dirty

    def _unstage(
        self, txn: Transaction, staged: list[tuple[VDisk, list[int]]], dropped: dict[str, Dropped]
    ) -> None:
        for vdisk, dirty in staged:
            vdisk.table.restore_dirty(dirty)
            vdisk.record_dirty = True
        for name, d in dropped.items():
            if name in self.pools:
                self.pools[name].restore_dropped(d)
        # keep the other operations, in order; table chunks are re-staged from memory
        kept = Transaction(
            [op for op in txn.ops if op[0] not in ("chunk", "truncate", "unjournal")]
        )
        kept.extend(self._pending)
        self._pending = kept

    @staticmethod
    def _discard(pool: Pool, freed: list[int]) -> None:
        """Give the space of segments freed by a durable commit back to the medium."""
        for e in freed:
            pool.containers[t.cid_of(e)].discard(t.pseg_of(e))

    # --- pools and containers ------------------------------------------------------

    def create_pool(
        self,
        name: str,
        location: str,
        size: int | None,
        *,
        segment_size: int = DEFAULT_SEGMENT,
        preallocate: bool = False,
        threshold: int = DEFAULT_THRESHOLD,
    ) -> Pool:
        """A pool with its first container.

        ``location``: a file path (``size`` bytes), a block device (``size`` None), or a
        RADOS location ``rados:<pool>[/<namespace>][?options]`` (``size`` bytes of
        segments); see :mod:`targetvirt.container`.
        """
        check_name(name, "pool")
        check_threshold(threshold)
        with self.lock:
            if name in self.pools:
                raise AlreadyExists(f"a pool named {name!r} already exists")
            pool = Pool.new(name, segment_size)
            pool.pid = self._new_id()
            pool.threshold = threshold
            container = Container.create(
                location, pool_uuid=pool.uuid, cid=0, segment_size=segment_size, size=size,
                preallocate=preallocate,
            )  # fmt: skip
            self._attach(pool, container)
            self.pools[name] = pool
            self._pending.put("pool", pool.pid, self._pool_record(pool))
            self._stage_container(pool, container)
            self.commit()
            pool.crossed_threshold()
            return pool

    @staticmethod
    def _pool_record(pool: Pool) -> dict[str, Any]:
        return {"name": pool.name, "uuid": pool.uuid, "segment_size": pool.segment_size,
                "threshold": pool.threshold}  # fmt: skip

    def set_threshold(self, pool_name: str, percent: int) -> None:
        """Set a pool's soft threshold (percent of its segments).  Set below the usage of
        the moment, it is reached at once and the listeners hear of it."""
        check_threshold(percent)
        with self.lock:
            pool = self.pool(pool_name)
            pool.threshold = percent
            self._pending.put("pool", pool.pid, self._pool_record(pool))
            self.commit()
            self._check_threshold(pool)

    def _stage_container(self, pool: Pool, c: Container) -> None:
        body = {
            "pool": pool.pid, "cid": c.cid, "uuid": c.uuid, "kind": c.kind, "path": c.path,
            "nsegments": c.nsegments, "preallocated": c.preallocated,
            "draining": c.cid in pool.draining, "failed": c.failure,
        }  # fmt: skip
        self._pending.put("container", (pool.pid << 16) | c.cid, body)

    def add_container(
        self, pool_name: str, location: str, size: int | None, *, preallocate: bool = False
    ) -> Container:
        """Another container for a pool, of any kind (``location`` as for create_pool)."""
        with self.lock:
            pool = self.pool(pool_name)
            container = Container.create(
                location, pool_uuid=pool.uuid, cid=pool.next_cid(),
                segment_size=pool.segment_size, size=size, preallocate=preallocate,
            )  # fmt: skip
            self._attach(pool, container)
            self._stage_container(pool, container)
            self.commit()
            self._check_threshold(pool)  # more room: re-arms it
            return container

    def mark_failed(self, pool_name: str, cid: int, why: str) -> None:
        """Mark a container failed on someone else's word (an agent met a medium error)."""
        with self.lock:
            container = self.pool(pool_name).container(cid)
            container.io_errors += 1
            container.fail(why)

    def clear_failure(self, pool_name: str, cid: int) -> bool:
        """The operator says a failed container is sound again (repaired, or the error was
        transient): it takes new segments again.  Returns whether it was failed."""
        with self.lock:
            pool = self.pool(pool_name)
            container = pool.container(cid)
            was = container.failed
            container.failure = ""
            container.io_errors = 0
            self._stage_container(pool, container)
            self.commit()
            self._check_threshold(pool)
            return was

    def remove_container(self, pool_name: str, cid: int) -> None:
        with self.lock:
            pool = self.pool(pool_name)
            pool.container(cid)
            if len(pool.containers) == 1:
                raise InUse(f"container {cid} is the last of pool {pool_name}; delete the pool")
            self.commit()  # references dropped from this container settle
            container = pool.detach(cid)
            self._pending.delete("container", (pool.pid << 16) | cid)
            self.commit()
            container.close()
            self._check_threshold(pool)

    def delete_pool(self, name: str) -> None:
        with self.lock:
            pool = self.pool(name)
            users = sorted(v.name for v in self.vdisks.values() if v.pool is pool)
            if users:
                raise InUse(f"pool {name} still holds vdisks: {', '.join(users[:5])}")
            for cid in pool.containers:
                self._pending.delete("container", (pool.pid << 16) | cid)
            self._pending.delete("pool", pool.pid)
            del self.pools[name]
            self.commit()
            for c in pool.containers.values():
                c.close()

    def evacuate(self, pool_name: str, cid: int, progress: Progress = _no_progress) -> int:
        """Move every segment out of container ``cid``; returns how many moved.

        The container takes no new segments from now on.  Progress is committed every
        ``COMMIT_EVERY`` segments, so an interrupted evacuation resumes where it stopped.
        """
        work = self.begin_evacuation(pool_name, cid)
        moved = 0
        for vdisk, index in work:
            with self.lock:
                e = vdisk.table[index]
                if vdisk.name in self.vdisks and e & t.MAPPED and t.cid_of(e) == cid:
                    self.migrate(vdisk, index, commit=False)
                    moved += 1
                    if moved % COMMIT_EVERY == 0:
                        self.commit()
            progress(moved, len(work))
        self.commit()
        return moved

    def begin_evacuation(self, pool_name: str, cid: int) -> list[tuple[VDisk, int]]:
        """Stop placing segments in container ``cid``; returns the entries that map into it."""
        with self.lock:
            pool = self.pool(pool_name)
            container = pool.container(cid)
            if not set(pool.containers) - pool.draining - {cid}:
                raise InUse(f"pool {pool_name} has no other container to evacuate {cid} to")
            pool.draining.add(cid)
            self._stage_container(pool, container)
            self.commit()
            self._check_threshold(pool)  # its free segments are out of reach now
            return list(self._mapped_in(pool, cid))

    def _mapped_in(self, pool: Pool, cid: int) -> Iterator[tuple[VDisk, int]]:
        for vdisk in list(self.vdisks.values()):
            if vdisk.pool is pool:
                for index, entry in vdisk.table.iter_mapped():
                    if t.cid_of(entry) == cid:
                        yield vdisk, index

    def migrate(
        self, vdisk: VDisk, index: int, dst: int | None = None, *, commit: bool = True
    ) -> int:
        """Move the segment at ``index`` to another container; repoint every sharer."""
        with self.lock:
            old = t.location(vdisk.table[index])
            if not old & t.MAPPED:
                raise InvalidArgument(f"{vdisk.name} entry {index} is not allocated")
            pool = vdisk.pool
            if dst is not None:
                pool.container(dst)
                if dst == t.cid_of(old):
                    raise InvalidArgument(f"that segment already lives in container {dst}")
            new = self._place(pool, old, exclude=t.cid_of(old), only=dst)
            moved = self._repoint(vdisk.family.members, index, old, new, pool)
            if commit:
                self.commit()
            else:
                self._journal((m, index) for m in moved)
            return new

    @staticmethod
    def _repoint(tables: list[VDisk], index: int, old: int, new: int, pool: Pool) -> list[VDisk]:
        """Every table in ``tables`` that maps ``old`` at ``index`` now maps ``new``;
        returns those.  ``new`` arrives with refcount 1 from the allocator.
        """
        sharers = [
            m for m in tables if index < len(m.table) and t.location(m.table[index]) == old
        ]  # family members may have been resized shorter
        for m in sharers:
            m.table[index] = new
            pool.decref(old)
        for _ in sharers[1:]:
            pool.incref(new)
        return sharers

    def _place(
        self, pool: Pool, source: int | None, exclude: int | None = None, only: int | None = None
    ) -> int:
        """A new segment holding a copy of segment ``source`` (None: zeros).

        Nothing maps the new segment yet: if filling it fails it is given back.  If it
        failed because its container just failed, another container is tried (the
        allocator skips failed ones); a failure of the source is the caller's error.
        """
        while True:
            new = self._allocate(pool, exclude, only)
            dst = pool.containers[t.cid_of(new)]
            try:
                if source is None:
                    self._zero_segment(pool, new)
                else:
                    src = pool.containers[t.cid_of(source)]
                    src.copy_segment_to(t.pseg_of(source), dst, t.pseg_of(new))
            except BaseException as e:
                pool.release(new)
                if isinstance(e, ContainerWriteError) and dst.failed and only is None:
                    continue  # writing dst failed it (it was not when allocated): skip it
                raise
            self._check_threshold(pool)
            return new

    def _allocate(self, pool: Pool, exclude: int | None = None, only: int | None = None) -> int:
        try:
            return pool.allocate(exclude, only)
        except PoolFull:
            if not pool.unsettled:
                raise
        self.commit()  # segments freed since the last commit become reusable once durable
        return pool.allocate(exclude, only)

    # --- vdisks --------------------------------------------------------------------

    def create_vdisk(
        self, name: str, pool_name: str, size: int, cow: CowMode = "redirect"
    ) -> VDisk:
        check_name(name, "vdisk")
        check_size(size)
        if cow not in COW_MODES:
            raise InvalidArgument(f"COW mode {cow!r} is not one of {', '.join(COW_MODES)}")
        with self.lock:
            if name in self.vdisks:
                raise AlreadyExists(f"a vdisk named {name!r} already exists")
            pool = self.pool(pool_name)
            vid = self._new_id()
            vdisk = VDisk(
                self, vid=vid, name=name, uuid=str(uuidlib.uuid4()), kind=KIND_VDISK, pool=pool,
                family=self._family(vid), parent=None, size=size, cow=cow,
                created=self.wallclock(), table=t.Table.unallocated(self._entries(pool, size)),
            )  # fmt: skip
            self._register(vdisk)
            self.commit()
            return vdisk

    @staticmethod
    def _entries(pool: Pool, size: int) -> int:
        return -(-size // pool.segment_size)

    def snapshot(self, source: str, snap: str) -> VDisk:
        """A read-only copy of ``source``'s table, named ``source@snap``."""
        check_name(snap, "snapshot")
        return self._copy_many([(self.vdisk(source), f"{source}{SNAP_SEP}{snap}")], KIND_SNAPSHOT)[
            0
        ]

    def clone(self, source: str, name: str) -> VDisk:
        """A writable copy of a vdisk's or snapshot's table."""
        check_name(name, "clone")
        return self._copy_many([(self.vdisk(source), name)], KIND_VDISK)[0]

    def group_snapshot(self, sources: list[str], snap: str) -> list[VDisk]:
        """Snapshots of several vdisks at one instant, made durable in one commit."""
        check_name(snap, "snapshot")
        vdisks = [self.vdisk(s) for s in sources]
        if len({v.name for v in vdisks}) != len(vdisks):
            raise InvalidArgument("a consistency group names the same vdisk twice")
        return self._copy_many([(v, f"{v.name}{SNAP_SEP}{snap}") for v in vdisks], KIND_SNAPSHOT)

    def _copy_many(self, pairs: list[tuple[VDisk, str]], kind: str) -> list[VDisk]:
        with self.lock:
            taken = [name for _, name in pairs if name in self.vdisks]
            if taken:
                raise AlreadyExists(f"{', '.join(taken)} already exists")
            self.commit()  # the sources are durable, so the copies can share their chunks
            made = []
            for src, name in pairs:
                vid = self._new_id()
                copy = VDisk(
                    self, vid=vid, name=name, uuid=str(uuidlib.uuid4()), kind=kind,
                    pool=src.pool, family=src.family, parent=src.vid, size=src.size,
                    cow=src.cow, created=self.wallclock(), table=src.table.copy(dirty=False),
                    hashes=list(src.hashes),
                )  # fmt: skip
                copy.record_dirty = True
                src.pool.incref_table(copy.table)
                self._register(copy)
                self._pending.copy(src.vid, vid)
                made.append(copy)
            self.commit()
            return made

    def rollback(self, name: str, snap: str) -> None:
        """Make vdisk ``name`` equal to its snapshot ``snap`` (size included)."""
        with self.lock:
            vdisk = self.vdisk(name)
            snapshot = self.vdisk(snap if SNAP_SEP in snap else f"{name}{SNAP_SEP}{snap}")
            if not snapshot.name.startswith(name + SNAP_SEP) or vdisk.readonly:
                raise InvalidArgument(f"{snapshot.name} is not a snapshot of vdisk {name}")
            self.commit()
            vdisk.pool.decref_table(vdisk.table)
            vdisk.table = snapshot.table.copy(dirty=False)
            vdisk.hashes = list(snapshot.hashes)
            vdisk.size = snapshot.size
            vdisk.pool.incref_table(vdisk.table)
            vdisk.record_dirty = True
            self._pending.copy(snapshot.vid, vdisk.vid)
            self.commit()

    def delete(self, name: str, *, recursive: bool = False) -> None:
        """Delete a vdisk or snapshot; segments nobody else maps are freed."""
        with self.lock:
            vdisk = self.vdisk(name)
            snaps = self.snapshots_of(vdisk)
            if snaps and not recursive:
                raise InUse(
                    f"{name} has snapshots ({', '.join(s.name for s in snaps[:3])}); "
                    "delete them first or delete recursively"
                )
            for v in [*snaps, vdisk]:
                v.pool.decref_table(v.table)
                self._unregister(v)
                self._pending.delete("vdisk", v.vid)
                self._pending.drop(v.vid)
            self.commit()

    def resize(self, name: str, size: int) -> None:
        check_size(size)
        with self.lock:
            vdisk = self.vdisk(name)
            if vdisk.readonly:
                raise ReadOnly(f"{name} is a snapshot and cannot be resized")
            old = vdisk.size
            if size > old and old & vdisk.mask and vdisk.table[old >> vdisk.shift] & t.MAPPED:
                # bytes past the old end of its last segment must read as zeros once exposed
                tail = min(size, ((old >> vdisk.shift) + 1) << vdisk.shift)
                for c, coff, n in vdisk.map_write(old, tail - old, check=False):
                    assert c is not None
                    c.zero(coff, n)
            n_new = self._entries(vdisk.pool, size)
            for index in range(n_new, len(vdisk.table)):
                self._drop(vdisk, index)
            vdisk.table.resize(n_new)
            vdisk.size = size
            vdisk.record_dirty = True
            self.commit()

    def flatten(self, name: str, progress: Progress = _no_progress) -> int:
        """Give a vdisk private copies of every shared segment; returns how many were copied.

        Progress is committed every ``COMMIT_EVERY`` segments: an interrupted flatten
        leaves a consistent vdisk and simply resumes when run again.
        """
        with self.lock:
            vdisk = self.vdisk(name)
            if vdisk.readonly:
                raise ReadOnly(f"{name} is a snapshot; clone it and flatten the clone")
            self.commit()  # dropped references settle: what is shared now is really shared
            work = [i for i, e in vdisk.table.iter_mapped() if vdisk.pool.refcount(e) > 1]
        done = 0
        for index in work:
            with self.lock:
                if self.vdisks.get(name) is not vdisk:
                    raise Cancelled(f"{name} was deleted while being flattened")
                self.unshare(vdisk, index)
                done += 1
                if done % COMMIT_EVERY == 0:
                    self.commit()
            progress(done, len(work))
        self.commit()
        return done

    def unshare(self, vdisk: VDisk, index: int) -> bool:
        """Give entry ``index`` a private copy if it is shared; returns whether it was."""
        with self.lock:
            e = vdisk.table[index]
            if not e & t.MAPPED or vdisk.pool.refcount(e) == 1:
                return False
            self._redirect(vdisk, index, e, covered=False)
            self._journal([(vdisk, index)])
            return True

    # --- data-path faults ------------------------------------------------------------

    def fault(self, vdisk: VDisk, index: int, covered: bool) -> int:
        """Make entry ``index`` privately writable; returns the entry to write through.

        ``covered``: the write overwrites the whole segment, so old data need not be kept.
        """
        with self.lock:
            e = vdisk.table[index]
            if not e & t.MAPPED:
                new = self._place(vdisk.pool, None)
                vdisk.table[index] = new
                self._journal([(vdisk, index)])
                return new
            if vdisk.pool.refcount(e) == 1:
                return e  # another thread faulted it first
            try:
                if vdisk.cow == "copy":
                    return self._copy_out(vdisk, index, e)  # commits durably
                new = self._redirect(vdisk, index, e, covered)
                self._journal([(vdisk, index)])
                return new
            except PoolFull:
                # Finding the pool full, the allocator committed to settle the references
                # dropped since the last commit: the segment may be private by now (its
                # other sharers deleted or moved away), so the write goes in place.
                if vdisk.pool.refcount(e) == 1:
                    return e
                raise

    @staticmethod
    def _zero_segment(pool: Pool, entry: int) -> None:
        # Always, even under a write covering the whole segment: a commit by another thread
        # may make the mapping durable before that write lands, and a crash must then show
        # zeros, never a previous owner's data.  On files this is a hole punch.
        c = pool.containers[t.cid_of(entry)]
        c.zero(c.offset_of(t.pseg_of(entry)), pool.segment_size)

    def _redirect(self, vdisk: VDisk, index: int, old: int, covered: bool) -> int:
        pool = vdisk.pool
        # covered: the old data is overwritten anyway, so zero instead of copying
        new = self._place(pool, None if covered else old)
        vdisk.table[index] = new
        pool.decref(old)
        return new

    def _copy_out(self, vdisk: VDisk, index: int, old: int) -> int:
        pool = vdisk.pool
        if not any(
            index < len(m.table) and t.location(m.table[index]) == old
            for m in vdisk.family.others(vdisk)
        ):
            # Shared only through references dropped since the last commit (a sharer
            # unmapped it): once that is durable the segment is the writer's alone.  A
            # copy would go to nobody (and leak).
            self.commit()
            return old
        new = self._place(pool, old)
        self._repoint(vdisk.family.others(vdisk), index, old, new, pool)
        # The sharers must durably point at the copy before the writer changes `old`.
        self.commit()
        return old

    def drop_entries(self, vdisk: VDisk, indices: Iterable[int]) -> None:
        """Deallocate entries (UNMAP of whole segments), journaled together."""
        with self.lock:
            self._journal([(vdisk, i) for i in indices if self._drop(vdisk, i)])

    @staticmethod
    def _drop(vdisk: VDisk, index: int) -> bool:
        e = vdisk.table[index]
        if not e & t.MAPPED:
            return False
        vdisk.table[index] = 0
        vdisk.pool.decref(e)
        return True
