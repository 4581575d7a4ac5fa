"""The metadata store on RADOS: the controller's state survives the loss of its host.

Same semantics as the SQLite store (:mod:`targetvirt.store.sqlite`): records with
checksums, content-addressed table chunks, every transaction atomic, one writer at a
time, damage reported as :class:`StoreCorrupt`.  A store lives in a Ceph pool (and
namespace), named by a RADOS location and a store name (several stores can share a
namespace)::

    <name>.root                the header object; its omap holds all mutable state:
        format                   "1"
        gen                      the commit generation (decimal)
        owner                    the writer holding the store (JSON; absent when closed),
                                 with the endpoint where it serves agents, if it does
        r/<kind>/<id>            a record: crc32 (4 bytes, little-endian) + JSON
        t/<vid>                  a table's chunk list: 16-byte chunk hashes, in order
    <name>.chunk.<hash hex>    a table chunk (packed entries), immutable

**Atomic commits.**  RADOS applies all the operations of one write to one object
atomically, so every commit is a single write operation on the root object: compare
``gen`` with the generation this writer last committed and ``owner`` with itself
(``omap_cmp``), then set and remove the changed keys and bump ``gen``.  Chunk objects
are written (and acknowledged) *before* that operation, and chunks no table references
any more are removed *after* it.  A crash at any point therefore leaves either the old or
the new state, plus at most some unreferenced chunk objects, which the next writer
removes when it finds the store was not closed cleanly.  A chunk a table shares with
another (snapshots, clones, all-zero chunks) is stored once.

**One writer.**  A writer takes a RADOS exclusive lock on the root object with a lease
(``lease`` seconds, renewed in the background) and records itself in ``owner`` with a
compare-and-set.  A second writer is refused with :class:`StoreLocked` naming the
holder.  The holder is replaced only when its lease has lapsed, when it is a dead
process of this host (a crash), or on an explicit ``takeover``; the new writer first
*fences* it (Ceph client blocklist: the OSDs refuse everything it sends from then on),
then breaks its lock and swaps ``owner``.  A fenced or superseded writer's next commit
fails its compare-and-set (or is refused by the OSDs) and raises StoreLocked: it can
never overwrite its successor's state.

Readers (``readonly=True``) take no lock; a load that races a commit is retried.

**Where the writer serves.**  A writer that serves agents (a controller) names its
request endpoint (``endpoint=``, or :meth:`RadosStore.publish` later) in its ``owner``
record, written with the same compare-and-set that claims the store: agents that lose
their controller look it up again with :func:`active_endpoint` (one read, no lock) and
follow a standby that took over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import struct
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from targetvirt.ceph import Cluster, RadosLocation, describe, errno_of, import_rados
from targetvirt.clock import Clock, MonotonicClock
from targetvirt.errors import InvalidArgument, StoreCorrupt, StoreError, StoreLocked
from targetvirt.store.base import (
    FORMAT_VERSION,
    Image,
    JournalEntry,
    Transaction,
    chunk_hash,
    decode_record,
    encode_record,
)
from targetvirt.table import CHUNK_ENTRIES, ENTRY_BYTES

DEFAULT_NAME = "targetvirt"
LOCK_NAME = "targetvirt.writer"
DEFAULT_LEASE = 30  # seconds a writer's lock outlives the writer's last renewal
BLOCKLIST_SECONDS = 24 * 3600  # a fenced client stays fenced this long
HASH_BYTES = 16
CHUNK_BYTES = CHUNK_ENTRIES * ENTRY_BYTES
PAGE = 1000  # omap entries per read
IN_FLIGHT = 64  # chunk reads / writes outstanding at once
_CRC = struct.Struct("<I")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_LOCK_FLAG_MAY_RENEW = 1  # LIBRADOS_LOCK_FLAG_RENEW (python-rados does not export it)


def _record_key(kind: str, key: int) -> str:
    if not kind or "/" in kind:
        raise InvalidArgument(f"record kind {kind!r} must be a non-empty word without '/'")
    return f"r/{kind}/{key}"


def _table_key(vid: int) -> str:
    return f"t/{vid}"


def _host_id() -> str:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _encode_str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<I", len(raw)) + raw


def _break_lock_request(lock: str, client_num: int, cookie: str) -> bytes:
    """cls_lock ``break_lock`` input: {name, locker entity (client.N), cookie}."""
    body = _encode_str(lock) + struct.pack("<Bq", 8, client_num) + _encode_str(cookie)
    return struct.pack("<BBI", 1, 1, len(body)) + body  # ENCODE_START(1, 1)


def store_owner(location: str, *, name: str = DEFAULT_NAME) -> dict[str, Any] | None:
    """The ``owner`` record of a store (who writes it, where it serves agents), read
    without a lock; None when nobody holds it (or no store is there)."""
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"metadata store name {name!r} is invalid")
    loc = RadosLocation.parse(location)
    rados = import_rados()
    cluster = Cluster.get(loc, StoreError)
    try:
        ioctx = cluster.ioctx(loc, StoreError)
        try:
            with rados.ReadOpCtx() as op:
                it, _ = ioctx.get_omap_vals_by_keys(op, ("owner",))
                ioctx.operate_read_op(op, f"{name}.root")
                raw = dict(it).get("owner")
        except rados.ObjectNotFound:
            return None
        except rados.Error as e:
            raise StoreError(
                f"cannot read metadata store rados:{loc.where}#{name}: {describe(e)}"
            ) from None
        finally:
            ioctx.close()
    finally:
        cluster.release()
    return RadosStore._parse_owner(bytes(raw) if raw else None)


def active_endpoint(location: str, *, name: str = DEFAULT_NAME) -> str | None:
    """Where the store's current writer (the active controller) serves agents, as it
    published it; None if it published none or nobody holds the store."""
    owner = store_owner(location, name=name)
    endpoint = owner.get("endpoint") if owner else None
    return endpoint if isinstance(endpoint, str) and endpoint else None


class RadosStore:
    """A :class:`targetvirt.store.base.Store` in a Ceph pool."""

    # No journal yet: on RADOS, data-path mapping changes become durable at the next
    # flush (or the periodic commit), as on a disk with a volatile write cache.
    journals = False

    def __init__(
        self,
        location: str,
        *,
        name: str = DEFAULT_NAME,
        readonly: bool = False,
        create: bool = False,
        lease: int = DEFAULT_LEASE,
        takeover: bool = False,
        clock: Clock | None = None,
        endpoint: str | None = None,
    ) -> None:
        """``endpoint``: where this writer serves agents (see :func:`active_endpoint`)."""
        if not _NAME_RE.match(name):
            raise InvalidArgument(f"metadata store name {name!r} is invalid")
        if lease < 1:
            raise InvalidArgument(f"a writer's lease must be at least 1 second, not {lease}")
        self.loc = RadosLocation.parse(location)
        self.name = name
        self.path = f"rados:{self.loc.where}#{name}"
        self.readonly = readonly
        self.lease = lease
        self.root = f"{name}.root"
        self._chunk_prefix = f"{name}.chunk."
        self._clock = clock or MonotonicClock()
        self._rados = import_rados()
        # the committed state, as this process knows it (authoritative for the writer)
        self._gen = -1
        self._tables: dict[int, list[bytes]] = {}
        self._refs: Counter[bytes] = Counter()
        self._owner = ""
        self._endpoint = endpoint
        self._cookie = ""
        self._unclean = False
        self._gc: dict[bytes, Any] = {}  # chunk hash -> its removal in flight
        self._gc_cond = threading.Condition()
        self._cond = threading.Condition()
        self._root_lock = threading.Lock()  # one root write at a time from this process
        self._closing = False
        self._renewer: threading.Thread | None = None
        self.lease_lost = ""  # why the lease could not be renewed ("" while held)
        # until when the lock is surely ours (clock time): the last successful lock
        # request's *sending* time plus the lease; nobody else gets it before
        self.lease_until = -math.inf
        self._ioctx: Any = None
        self._cluster = Cluster.get(self.loc, StoreError)
        try:
            self._ioctx = self._cluster.ioctx(self.loc, StoreError)
            self._open(create, takeover)
        except BaseException:
            self._shutdown()
            raise

    # --- opening -------------------------------------------------------------------

    def _open(self, create: bool, takeover: bool) -> None:
        rados = self._rados
        try:
            self._ioctx.stat(self.root)
        except rados.ObjectNotFound:
            if not create or self.readonly:
                raise StoreError(f"no metadata store at {self.path}") from None
            self._create_root()
        except rados.Error as e:
            raise StoreError(f"cannot reach metadata store {self.path}: {describe(e)}") from None
        if not self.readonly:
            self._acquire(takeover)
            self._renewer = threading.Thread(
                target=self._renew_loop, name=f"lease {self.name}", daemon=True
            )
            self._renewer.start()

    def _create_root(self) -> None:
        rados = self._rados
        with rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            self._ioctx.set_omap(op, ("format", "gen"), (str(FORMAT_VERSION).encode(), b"0"))
            try:
                self._ioctx.operate_write_op(op, self.root)
            except rados.ObjectExists:
                pass  # created meanwhile by someone else: open theirs
            except rados.Error as e:
                raise StoreError(
                    f"cannot create metadata store {self.path}: {describe(e)}"
                ) from None

    def _read_keys(self, keys: Iterable[str]) -> dict[str, bytes]:
        rados = self._rados
        try:
            with rados.ReadOpCtx() as op:
                it, _ = self._ioctx.get_omap_vals_by_keys(op, tuple(keys))
                self._ioctx.operate_read_op(op, self.root)
                return {k: bytes(v or b"") for k, v in it}
        except rados.ObjectNotFound:
            raise StoreError(f"no metadata store at {self.path}") from None
        except rados.Error as e:
            raise StoreError(f"cannot read metadata store {self.path}: {describe(e)}") from None

    def _identity(self) -> str:
        cluster = self._cluster
        me = {
            "host": _host_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
            "client": cluster.handle.get_instance_id(),
            "addr": cluster.addr,
            # every handle of this process to this cluster (containers may use other
            # client settings): fencing the writer fences them all
            "addrs": Cluster.addrs(cluster.fsid),
            "cookie": self._cookie,
            "since": int(time.time()),
        }
        if self._endpoint is not None:
            me["endpoint"] = self._endpoint
        return json.dumps(me, sort_keys=True, separators=(",", ":"))

    def _handle_added(self, cluster: Cluster) -> None:
        """A new librados handle in this process: record its address before it is used."""
        if cluster.fsid != self._cluster.fsid or self._ioctx is None:
            return
        self._update_owner(addrs=Cluster.addrs(cluster.fsid))

    def publish(self, endpoint: str) -> None:
        """Record (or change) where this writer serves agents: ``unix:/path`` or
        ``host:port``, as a :class:`~targetvirt.transport.network.NetworkLink` takes it.
        Raises StoreLocked if this writer no longer owns the store."""
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        self._endpoint = endpoint
        self._update_owner(endpoint=endpoint)

    def _update_owner(self, **changes: Any) -> None:
        """Change fields of our ``owner`` record (compare-and-set against what we wrote)."""
        rados = self._rados
        with self._root_lock:
            owner = json.loads(self._owner)
            owner.update(changes)
            new = json.dumps(owner, sort_keys=True, separators=(",", ":"))
            with rados.WriteOpCtx() as op:
                op.omap_cmp("owner", self._owner, rados.LIBRADOS_CMPXATTR_OP_EQ)
                self._ioctx.set_omap(op, ("owner",), (new.encode(),))
                try:
                    self._ioctx.operate_write_op(op, self.root)
                except rados.Error as e:
                    if errno_of(e) == errno.ECANCELED:
                        raise self._superseded() from None
                    raise self._commit_error(e) from None
            self._owner = new

    @staticmethod
    def _describe_owner(owner: dict[str, Any] | None) -> str:
        if not owner:
            return "another writer"
        since = time.strftime("%F %T", time.localtime(owner.get("since", 0)))
        return (
            f"client.{owner.get('client')} (pid {owner.get('pid')} on "
            f"{owner.get('hostname')}, since {since})"
        )

    @staticmethod
    def _parse_owner(raw: bytes | None) -> dict[str, Any] | None:
        if not raw:
            return None
        try:
            owner = json.loads(raw)
        except ValueError:
            return None
        return owner if isinstance(owner, dict) else None

    @staticmethod
    def _is_dead(owner: dict[str, Any]) -> bool:
        """A holder that is a process of this host which no longer runs."""
        if owner.get("host") != _host_id() or not isinstance(owner.get("pid"), int):
            return False
        return _start_time(owner["pid"]) != owner.get("start")

    def _acquire(self, takeover: bool) -> None:
        rados = self._rados
        self._cookie = uuidlib.uuid4().hex
        desc = f"targetvirt pid {os.getpid()} on {socket.gethostname()}"
        for _ in range(3):
            try:
                sent = self._clock.now()
                self._ioctx.lock_exclusive(
                    self.root, LOCK_NAME, self._cookie, desc, duration=self.lease
                )
                self.lease_until = sent + self.lease
                break
            except rados.ObjectBusy:
                owner = self._parse_owner(self._read_keys(["owner"]).get("owner"))
                if owner is None or not (takeover or self._is_dead(owner)):
                    raise StoreLocked(
                        f"metadata store {self.path} is in use by {self._describe_owner(owner)}"
                    ) from None
                self._fence(owner)
                self._break_lock(owner)
            except rados.Error as e:
                raise StoreError(f"cannot lock metadata store {self.path}: {describe(e)}") from None
        else:
            raise StoreLocked(f"metadata store {self.path} is in use by another writer")
        try:
            self._claim()
        except BaseException:
            self._unlock()
            raise
        Cluster.listen(self._handle_added)

    def _claim(self) -> None:
        """Holding the lock: fence an unclean previous owner, then swap ``owner`` to us."""
        rados = self._rados
        old_raw = self._read_keys(["owner"]).get("owner", b"")
        old = self._parse_owner(old_raw)
        if old_raw:
            self._unclean = True  # its last commit may have left unreferenced chunks
            if old is not None:
                self._fence(old)
        self._owner = self._identity()
        with rados.WriteOpCtx() as op:
            op.omap_cmp("owner", old_raw.decode(errors="replace"), rados.LIBRADOS_CMPXATTR_OP_EQ)
            self._ioctx.set_omap(op, ("owner",), (self._owner.encode(),))
            try:
                self._ioctx.operate_write_op(op, self.root)
            except rados.Error as e:
                if errno_of(e) == errno.ECANCELED:
                    raise StoreLocked(
                        f"metadata store {self.path} changed owner while being opened"
                    ) from None
                raise StoreError(
                    f"cannot claim metadata store {self.path}: {describe(e)}"
                ) from None

    def _fence(self, owner: dict[str, Any]) -> None:
        """Blocklist a previous writer so nothing it still sends is ever applied."""
        addrs = owner.get("addrs") or [owner.get("addr")]
        mine = set(Cluster.addrs(self._cluster.fsid))  # this very process: handles are shared
        for addr in addrs:
            if not isinstance(addr, str) or not addr or addr in mine:
                continue
            try:
                self._cluster.handle.blocklist_add(addr, BLOCKLIST_SECONDS)
            except self._rados.Error as e:
                raise StoreLocked(
                    f"metadata store {self.path}: cannot fence the previous writer "
                    f"{self._describe_owner(owner)}: {describe(e)} (the client needs the "
                    "'osd blocklist' monitor capability)"
                ) from None

    def _break_lock(self, owner: dict[str, Any]) -> None:
        client, cookie = owner.get("client"), owner.get("cookie")
        if not isinstance(client, int) or not isinstance(cookie, str):
            return
        try:
            self._ioctx.execute(
                self.root, "lock", "break_lock", _break_lock_request(LOCK_NAME, client, cookie)
            )
        except self._rados.Error as e:
            if errno_of(e) != errno.ENOENT:  # already gone (expired or released)
                raise StoreError(f"cannot break the lock on {self.path}: {describe(e)}") from None

    def _unlock(self) -> None:
        with contextlib.suppress(self._rados.Error):  # expired or broken: nothing to give
            self._ioctx.unlock(self.root, LOCK_NAME, self._cookie)

    @property
    def holds_lease(self) -> bool:
        """Whether this writer surely still holds the store (its lock's lease runs): a
        controller answers agents only then, so that no lease it grants outlives its
        own and overlaps a successor's."""
        return not self.readonly and not self.lease_lost and self._clock.now() < self.lease_until

    def _renew_loop(self) -> None:
        period = self.lease / 3
        with self._cond:
            while not self._closing:
                deadline = self._clock.now() + period
                while not self._closing and self._clock.now() < deadline:
                    self._clock.wait(self._cond, deadline)
                if self._closing:
                    return
                try:
                    sent = self._clock.now()
                    self._ioctx.lock_exclusive(
                        self.root, LOCK_NAME, self._cookie, "", duration=self.lease,
                        flags=_LOCK_FLAG_MAY_RENEW,
                    )  # fmt: skip
                    self.lease_until = sent + self.lease
                except self._rados.Error as e:
                    # Someone else holds it now: our next commit fails its compare-and-set.
                    self.lease_lost = describe(e)
                    return

    # --- reading -------------------------------------------------------------------

    def load(self) -> Image:
        for _ in range(10):
            try:
                return self._load_once()
            except _Raced:
                continue  # a writer committed while we read (readers only): again
            except StoreCorrupt:
                # a reader may see a chunk the writer has just collected: only damage
                # if the store stood still meanwhile
                if self.readonly and self._read_keys(["gen"]).get("gen") != str(self._gen).encode():
                    continue
                raise
        raise StoreError(f"metadata store {self.path} kept changing while being read")

    def _read_all(self) -> tuple[dict[str, bytes], int]:
        rados = self._rados
        values: dict[str, bytes] = {}
        gen: bytes | None = None
        after = ""
        while True:
            try:
                with rados.ReadOpCtx() as op:
                    page, _ = self._ioctx.get_omap_vals(op, after, "", PAGE)
                    genit, _ = self._ioctx.get_omap_vals_by_keys(op, ("gen",))
                    self._ioctx.operate_read_op(op, self.root)
                    items = [(k, bytes(v or b"")) for k, v in page]
                    page_gen = dict(genit).get("gen")
            except rados.ObjectNotFound:
                raise StoreError(f"no metadata store at {self.path}") from None
            except rados.Error as e:
                raise StoreError(f"cannot read metadata store {self.path}: {describe(e)}") from None
            if gen is not None and page_gen != gen:
                raise _Raced
            gen = page_gen
            values.update(items)
            if len(items) < PAGE:
                break
            after = items[-1][0]
        try:
            return values, int(gen or b"")
        except ValueError:
            raise StoreCorrupt(f"metadata store {self.path} has no valid generation") from None

    def _load_once(self) -> Image:
        values, gen = self._read_all()
        fmt = values.pop("format", None)
        if fmt != str(FORMAT_VERSION).encode():
            raise StoreCorrupt(f"{self.path}: unsupported metadata format {fmt!r}")
        values.pop("gen", None)
        values.pop("owner", None)
        records: dict[str, dict[int, dict[str, Any]]] = {}
        tables: dict[int, list[bytes]] = {}
        for key, value in values.items():
            parts = key.split("/")
            try:
                if parts[0] == "r" and len(parts) == 3:
                    kind, rid = parts[1], int(parts[2])
                    if len(value) < _CRC.size:
                        raise StoreCorrupt(f"metadata record {kind} {rid} is truncated")
                    (crc,) = _CRC.unpack_from(value)
                    records.setdefault(kind, {})[rid] = decode_record(
                        kind, rid, value[_CRC.size :], crc
                    )
                    continue
                if parts[0] == "t" and len(parts) == 2:
                    vid = int(parts[1])
                    if len(value) % HASH_BYTES:
                        raise StoreCorrupt(f"the chunk list of table {vid} has a bad length")
                    tables[vid] = [
                        value[i : i + HASH_BYTES] for i in range(0, len(value), HASH_BYTES)
                    ]
                    continue
            except ValueError:
                pass
            raise StoreCorrupt(f"metadata store {self.path} holds an unknown key {key!r}")
        data = self._read_chunks(tables)
        image_tables: dict[int, tuple[bytes, list[bytes]]] = {}
        for vid, hashes in tables.items():
            parts_: list[bytes] = []
            for idx, h in enumerate(hashes):
                chunk = data[h]
                last = idx == len(hashes) - 1
                if len(chunk) % ENTRY_BYTES or (not last and len(chunk) != CHUNK_BYTES):
                    raise StoreCorrupt(f"table {vid} chunk {idx} has a bad length {len(chunk)}")
                parts_.append(chunk)
            image_tables[vid] = (b"".join(parts_), list(hashes))
        self._gen, self._tables = gen, tables
        self._refs = Counter(h for hashes in tables.values() for h in hashes)
        if self._unclean and not self.readonly:
            self._collect_orphans()
            self._unclean = False
        return Image(records, image_tables, gen)

    def chunk_name(self, digest: bytes) -> str:
        return self._chunk_prefix + digest.hex()

    def _read_chunks(self, tables: dict[int, list[bytes]]) -> dict[bytes, bytes]:
        """Every distinct chunk, read with many reads in flight, each verified."""
        where: dict[bytes, tuple[int, int]] = {}
        for vid, hashes in sorted(tables.items()):
            for idx, h in enumerate(hashes):
                where.setdefault(h, (vid, idx))
        out: dict[bytes, bytes] = {}
        results: dict[bytes, tuple[int, bytes]] = {}

        def reader(h: bytes) -> Any:
            def cb(completion: Any, data: bytes | None) -> None:
                ret = completion.get_return_value()
                # python-rados hands over its whole buffer when it read nothing: cut by ret
                results[h] = (ret, data[:ret] if data is not None and ret > 0 else b"")

            return cb

        pending = list(where)
        for start in range(0, len(pending), IN_FLIGHT):
            batch = pending[start : start + IN_FLIGHT]
            completions = [
                self._ioctx.aio_read(self.chunk_name(h), CHUNK_BYTES + 1, 0, reader(h))
                for h in batch
            ]
            for c in completions:
                c.wait_for_complete_and_cb()
            for h in batch:
                vid, idx = where[h]
                ret, data = results.pop(h)
                if ret == -errno.ENOENT:
                    raise StoreCorrupt(f"table {vid} chunk {idx} is missing from the store")
                if ret < 0:
                    raise StoreError(
                        f"cannot read table {vid} chunk {idx} from {self.path}: "
                        f"{describe(OSError(-ret, ''))}"
                    )
                if chunk_hash(data) != h:
                    raise StoreCorrupt(f"table {vid} chunk {idx} fails its checksum")
                out[h] = data
        return out

    def _collect_orphans(self) -> None:
        """Remove chunk objects no table references (left by an interrupted writer)."""
        try:
            names = [
                o.key for o in self._ioctx.list_objects() if o.key.startswith(self._chunk_prefix)
            ]
        except self._rados.Error as e:
            raise StoreError(f"cannot list metadata store {self.path}: {describe(e)}") from None
        for name in names:
            try:
                digest = bytes.fromhex(name[len(self._chunk_prefix) :])
            except ValueError:
                continue
            if digest not in self._refs:
                self._remove_chunk(digest)

    def chunk_hashes(self, vid: int) -> list[bytes]:
        if self._gen < 0:
            self.load()
        return list(self._tables.get(vid, []))

    # --- writing -------------------------------------------------------------------

    def journal(self, boot: str, entries: Sequence[JournalEntry]) -> None:
        raise StoreError(f"metadata store {self.path} keeps no journal; commit instead")

    def commit(self, txn: Transaction) -> None:
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        if self._gen < 0:
            self.load()  # the compare-and-set needs the current generation
        staged = _Staged(self)
        for op in txn.ops:
            getattr(staged, "op_" + op[0])(*op[1:])
        staged.check()
        self._write_chunks(staged.new_chunks)
        self._commit_root(staged)
        # the new state is durable: adopt it, then drop chunks nobody references
        self._gen += 1
        for vid, hashes in staged.tables.items():
            old = self._tables.pop(vid, [])
            self._refs.subtract(old)
            if hashes:
                self._tables[vid] = hashes
                self._refs.update(hashes)
        stale = [h for h in staged.touched_hashes if self._refs[h] <= 0]
        for h in stale:
            del self._refs[h]
            self._remove_chunk(h)

    def _write_chunks(self, chunks: dict[bytes, bytes]) -> None:
        items = list(chunks.items())
        for start in range(0, len(items), IN_FLIGHT):
            batch = items[start : start + IN_FLIGHT]
            completions = []
            for h, data in batch:
                self._settle_gc(h)
                completions.append(self._ioctx.aio_write_full(self.chunk_name(h), data))
            for c in completions:
                c.wait_for_complete()
            for c in completions:
                ret = c.get_return_value()
                if ret < 0:
                    raise self._commit_error(OSError(-ret, ""))

    def _commit_root(self, staged: _Staged) -> None:
        rados = self._rados
        sets = dict(staged.sets)
        sets["gen"] = str(self._gen + 1).encode()
        with self._root_lock, rados.WriteOpCtx() as op:
            op.omap_cmp("gen", str(self._gen), rados.LIBRADOS_CMPXATTR_OP_EQ)
            op.omap_cmp("owner", self._owner, rados.LIBRADOS_CMPXATTR_OP_EQ)
            self._ioctx.set_omap(op, tuple(sets), tuple(sets.values()))
            if staged.deletes:
                self._ioctx.remove_omap_keys(op, tuple(staged.deletes))
            try:
                self._ioctx.operate_write_op(op, self.root)
            except rados.Error as e:
                if errno_of(e) == errno.ECANCELED:
                    raise self._superseded() from None
                if self._applied_anyway():
                    return
                raise self._commit_error(e) from None

    def _superseded(self) -> StoreError:
        now = self._read_keys(["owner", "gen"])
        if now.get("owner", b"") != self._owner.encode():
            holder = self._describe_owner(self._parse_owner(now.get("owner")))
            return StoreLocked(
                f"metadata store {self.path} was taken over by {holder}; this writer no "
                "longer owns it"
            )
        return StoreCorrupt(
            f"metadata store {self.path} is at generation {now.get('gen', b'?').decode()}, "
            f"not {self._gen}: it was changed behind this writer's back"
        )

    def _applied_anyway(self) -> bool:
        """After an error of uncertain outcome: did the commit land?"""
        try:
            now = self._read_keys(["owner", "gen"])
        except StoreError:
            return False
        return (
            now.get("owner") == self._owner.encode()
            and now.get("gen") == str(self._gen + 1).encode()
        )

    def _commit_error(self, e: BaseException) -> StoreError:
        if errno_of(e) == errno.ESHUTDOWN:
            return StoreLocked(
                f"metadata store {self.path}: this writer was fenced (blocklisted) by another"
            )
        return StoreError(f"metadata store {self.path}: commit failed: {describe(e)}")

    # --- chunk removal ---------------------------------------------------------------

    def _remove_chunk(self, digest: bytes) -> None:
        def done(completion: Any) -> None:
            with self._gc_cond:
                if self._gc.get(digest) is completion:
                    del self._gc[digest]
                self._gc_cond.notify_all()

        # if it cannot even be queued, the chunk stays behind: unreferenced, harmless
        with self._gc_cond, contextlib.suppress(self._rados.Error):
            self._gc[digest] = self._ioctx.aio_remove(self.chunk_name(digest), oncomplete=done)

    def _settle_gc(self, digest: bytes) -> None:
        completion = self._gc.get(digest)
        if completion is not None:
            completion.wait_for_complete_and_cb()

    def _drain_gc(self) -> None:
        with self._gc_cond:
            while self._gc:
                self._gc_cond.wait()

    # --- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Release the store: a clean close tells the next writer there is nothing to clean."""
        if self._ioctx is None:
            return
        self._stop_renewing()
        try:
            self._drain_gc()
            if not self.readonly and self._owner:
                self._release_owner()
                self._unlock()
        finally:
            self._shutdown()

    def _release_owner(self) -> None:
        rados = self._rados
        with rados.WriteOpCtx() as op:
            op.omap_cmp("owner", self._owner, rados.LIBRADOS_CMPXATTR_OP_EQ)
            self._ioctx.remove_omap_keys(op, ("owner",))
            # superseded or fenced: the owner key is not ours to clear
            with contextlib.suppress(rados.Error):
                self._ioctx.operate_write_op(op, self.root)

    def _stop_renewing(self) -> None:
        Cluster.unlisten(self._handle_added)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None

    def _shutdown(self) -> None:
        """Drop the connection without a word to the cluster (as a crash would)."""
        self._stop_renewing()
        if self._ioctx is not None:
            self._ioctx.close()
            self._ioctx = None
        cluster = getattr(self, "_cluster", None)
        if cluster is not None:
            cluster.release()
            self._cluster = None  # type: ignore[assignment]


class _Raced(Exception):
    """The store changed while a reader paged through it."""


class _Staged:
    """A transaction applied to an overlay of the committed state, in order."""

    def __init__(self, store: RadosStore) -> None:
        self.store = store
        self.sets: dict[str, bytes] = {}
        self.deletes: set[str] = set()
        self.tables: dict[int, list[bytes]] = {}  # touched tables; [] = dropped
        self.new_chunks: dict[bytes, bytes] = {}
        self.touched_hashes: set[bytes] = set()

    def _table(self, vid: int) -> list[bytes]:
        if vid not in self.tables:
            self.tables[vid] = list(self.store._tables.get(vid, []))
            self.touched_hashes.update(self.tables[vid])
        return self.tables[vid]

    def _set(self, key: str, value: bytes) -> None:
        self.sets[key] = value
        self.deletes.discard(key)

    def _delete(self, key: str) -> None:
        self.sets.pop(key, None)
        self.deletes.add(key)

    def op_put(self, kind: str, key: int, body: dict[str, Any]) -> None:
        raw, crc = encode_record(kind, key, body)
        self._set(_record_key(kind, key), _CRC.pack(crc) + raw)

    def op_delete(self, kind: str, key: int) -> None:
        self._delete(_record_key(kind, key))

    def op_chunk(self, vid: int, index: int, digest: bytes, data: bytes) -> None:
        table = self._table(vid)
        if index >= len(table):
            table.extend([b""] * (index + 1 - len(table)))
        table[index] = digest
        self.touched_hashes.add(digest)
        if digest not in self.store._refs:
            self.new_chunks[digest] = data

    def op_truncate(self, vid: int, nchunks: int) -> None:
        del self._table(vid)[nchunks:]

    def op_copy(self, src: int, dst: int) -> None:
        self._table(dst)[:] = self._table(src)

    def op_drop(self, vid: int) -> None:
        self._table(vid).clear()

    def op_unjournal(self) -> None:
        pass  # there is never a journal here (RadosStore.journals)

    def check(self) -> None:
        for vid, hashes in self.tables.items():
            if b"" in hashes:
                raise StoreError(f"table {vid} would lack chunk {hashes.index(b'')}")
            if hashes:
                self._set(_table_key(vid), b"".join(hashes))
            else:
                self._delete(_table_key(vid))
        # chunks written then replaced within this transaction need no object
        live = {h for hashes in self.tables.values() for h in hashes}
        self.new_chunks = {h: d for h, d in self.new_chunks.items() if h in live}
