"""The single-host metadata store: SQLite in WAL mode with synchronous=FULL.

One database file holds every pool, container, vdisk and table of a controller.  SQLite
gives atomic, durable transactions and survives torn writes through its WAL; checksums on
records and content addressing of table chunks catch what SQLite cannot (a flipped bit in
a value).  One writer at a time is enforced with an exclusive ``flock`` on a lock file
beside the database; the file also names the holder's pid for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from targetvirt.errors import StoreCorrupt, StoreError, StoreLocked
from targetvirt.store.base import (
    FORMAT_VERSION,
    Image,
    JournalEntry,
    JournalRow,
    Transaction,
    chunk_hash,
    decode_journal,
    decode_record,
    encode_journal,
    encode_record,
)
from targetvirt.table import CHUNK_ENTRIES, ENTRY_BYTES

# added after format 2 shipped: created on open where missing, read as empty where absent
_JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal(
    seq INTEGER PRIMARY KEY, boot TEXT NOT NULL, entries BLOB NOT NULL, crc INTEGER NOT NULL);
"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records(
    kind TEXT NOT NULL, id INTEGER NOT NULL, body BLOB NOT NULL, crc INTEGER NOT NULL,
    PRIMARY KEY(kind, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(hash BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS table_chunks(
    vid INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY(vid, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS table_chunks_by_hash ON table_chunks(hash);
"""
    + _JOURNAL_SCHEMA
)


@contextmanager
def _damage_is_corruption(path: str) -> Iterator[None]:
    """SQLite's own damage reports become StoreCorrupt with the file named."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise StoreLocked(f"metadata store {path} is locked: {e}") from None
        raise StoreCorrupt(
            f"metadata store {path} is damaged: {' '.join(str(e).split())}"
        ) from None
    except UnicodeDecodeError as e:  # SQLite quoted damaged text that is not UTF-8
        raise StoreCorrupt(f"metadata store {path} is damaged: {e.object[:80]!r}") from None


def _blob(value: object, what: str) -> bytes:
    """A BLOB column's value; damage can change a value's type (bytes(n) of an integer
    would allocate n bytes)."""
    if not isinstance(value, bytes):
        raise StoreCorrupt(f"{what} is damaged: a {type(value).__name__}, not bytes")
    return value


class SqliteStore:
    """A :class:`targetvirt.store.base.Store` in one SQLite file."""

    journals = True

    def __init__(self, path: str, *, readonly: bool = False, create: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock_fd = -1
        exists = os.path.exists(path)
        if not exists and not create:
            raise StoreError(f"no metadata store at {path}")
        if not readonly:
            self._take_lock()
        try:
            self._db = self._connect(exists)
        except BaseException:
            self._release_lock()
            raise

    # --- opening -------------------------------------------------------------------

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreLocked(
                    f"metadata store {self.path} is in use by another process (pid {holder})"
                ) from None
            raise StoreError(f"cannot lock {lock_path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _connect(self, exists: bool) -> sqlite3.Connection:
        with _damage_is_corruption(self.path):
            if self.readonly:
                uri = f"file:{self.path}?mode=ro"
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                if not self.readonly:
                    if not exists:
                        os.chmod(self.path, 0o600)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=OFF")
                if exists:
                    self._verify_structure(db)
                    if not self.readonly:
                        db.executescript(_JOURNAL_SCHEMA)
                else:
                    db.executescript(_SCHEMA)
                    db.execute("INSERT INTO meta VALUES('format', ?)", (str(FORMAT_VERSION),))
                    db.execute("INSERT INTO meta VALUES('generation', '0')")
            except BaseException:
                db.close()  # not left to the garbage collector (see Catalog.open)
                raise
            return db

    def _verify_structure(self, db: sqlite3.Connection) -> None:
        rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            detail = "; ".join(" ".join(str(r[0]).split()) for r in rows[:3])  # one line
            raise StoreCorrupt(f"metadata store {self.path} is damaged: {detail}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "records", "chunks", "table_chunks"} <= tables:
            raise StoreCorrupt(f"{self.path} is not a targetvirt metadata store")
        fmt = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if fmt is None or fmt[0] != str(FORMAT_VERSION):
            raise StoreCorrupt(f"{self.path}: unsupported metadata format {fmt}")

    def close(self) -> None:
        self._db.close()
        self._release_lock()

    # --- reading -------------------------------------------------------------------

    def load(self) -> Image:
        with _damage_is_corruption(self.path):
            records: dict[str, dict[int, dict[str, object]]] = {}
            for kind, key, body, crc in self._db.execute("SELECT kind, id, body, crc FROM records"):
                records.setdefault(kind, {})[key] = decode_record(kind, key, body, crc)
            tables = {vid: self._load_table(vid) for vid in self._table_ids()}
            gen = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
            journal = self._load_journal()
        try:
            return Image(records, tables, int(gen[0]) if gen else 0, journal)
        except (TypeError, ValueError):
            raise StoreCorrupt(f"metadata store {self.path}: bad generation {gen}") from None

    def _load_journal(self) -> list[JournalRow]:
        db = self._db
        if db.execute("SELECT 1 FROM sqlite_master WHERE name='journal'").fetchone() is None:
            return []  # a store written before the journal, opened read-only
        rows: list[JournalRow] = []
        for boot, entries, crc in db.execute("SELECT boot, entries, crc FROM journal ORDER BY seq"):
            rows.extend(decode_journal(boot, entries, crc))
        return rows

    def _table_ids(self) -> list[int]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT vid FROM table_chunks")]

    def chunk_hashes(self, vid: int) -> list[bytes]:
        with _damage_is_corruption(self.path):
            rows = self._db.execute(
                "SELECT idx, hash FROM table_chunks WHERE vid=? ORDER BY idx", (vid,)
            ).fetchall()
        for expect, (idx, h) in enumerate(rows):
            if idx != expect:
                raise StoreCorrupt(f"table {vid} lacks chunk {expect}")
            _blob(h, f"table {vid} chunk {idx} hash")
        return [h for _, h in rows]

    def _load_table(self, vid: int) -> tuple[bytes, list[bytes]]:
        hashes = self.chunk_hashes(vid)
        parts = []
        for idx, h in enumerate(hashes):
            row = self._db.execute("SELECT data FROM chunks WHERE hash=?", (h,)).fetchone()
            if row is None:
                raise StoreCorrupt(f"table {vid} chunk {idx} is missing from the store")
            data = _blob(row[0], f"table {vid} chunk {idx}")
            if chunk_hash(data) != h:
                raise StoreCorrupt(f"table {vid} chunk {idx} fails its checksum")
            last = idx == len(hashes) - 1
            if len(data) % ENTRY_BYTES or (not last and len(data) != CHUNK_ENTRIES * ENTRY_BYTES):
                raise StoreCorrupt(f"table {vid} chunk {idx} has a bad length {len(data)}")
            parts.append(data)
        return b"".join(parts), hashes

    # --- writing -------------------------------------------------------------------

    def commit(self, txn: Transaction) -> None:
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        stale: set[bytes] = set()
        db = self._db
        with _damage_is_corruption(self.path):
            db.execute("BEGIN IMMEDIATE")
            try:
                self._apply(txn, stale)
                db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'"
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def journal(self, boot: str, entries: Sequence[JournalEntry]) -> None:
        """Append to the journal with synchronous=NORMAL: SQLite's WAL then survives the
        process (the write is in the page cache) but not necessarily the host, which is
        why rows carry the boot id.  The next FULL commit syncs these frames too."""
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        raw, crc = encode_journal(boot, entries)
        db = self._db
        with _damage_is_corruption(self.path):
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute(
                    "INSERT INTO journal(boot, entries, crc) VALUES(?,?,?)", (boot, raw, crc)
                )
            finally:
                db.execute("PRAGMA synchronous=FULL")

    def _apply(self, txn: Transaction, stale: set[bytes]) -> None:
        for op in txn.ops:
            getattr(self, "_op_" + op[0])(stale, *op[1:])
        db = self._db
        for h in stale:  # drop chunks that no table references any more
            if (
                db.execute("SELECT 1 FROM table_chunks WHERE hash=? LIMIT 1", (h,)).fetchone()
                is None
            ):
                db.execute("DELETE FROM chunks WHERE hash=?", (h,))

    def _hashes_from(self, stale: set[bytes], vid: int, first: int = 0) -> None:
        rows = self._db.execute(
            "SELECT hash FROM table_chunks WHERE vid=? AND idx>=?", (vid, first)
        )
        stale.update(bytes(r[0]) for r in rows)

    def _op_put(self, stale: set[bytes], kind: str, key: int, body: dict[str, object]) -> None:
        raw, crc = encode_record(kind, key, body)
        self._db.execute("INSERT OR REPLACE INTO records VALUES(?,?,?,?)", (kind, key, raw, crc))

    def _op_delete(self, stale: set[bytes], kind: str, key: int) -> None:
        self._db.execute("DELETE FROM records WHERE kind=? AND id=?", (kind, key))

    def _op_chunk(self, stale: set[bytes], vid: int, idx: int, digest: bytes, data: bytes) -> None:
        db = self._db
        old = db.execute(
            "SELECT hash FROM table_chunks WHERE vid=? AND idx=?", (vid, idx)
        ).fetchone()
        if old is not None:
            stale.add(bytes(old[0]))
        db.execute("INSERT OR IGNORE INTO chunks VALUES(?,?)", (digest, data))
        db.execute("INSERT OR REPLACE INTO table_chunks VALUES(?,?,?)", (vid, idx, digest))

    def _op_truncate(self, stale: set[bytes], vid: int, nchunks: int) -> None:
        self._hashes_from(stale, vid, nchunks)
        self._db.execute("DELETE FROM table_chunks WHERE vid=? AND idx>=?", (vid, nchunks))

    def _op_copy(self, stale: set[bytes], src: int, dst: int) -> None:
        self._op_drop(stale, dst)
        self._db.execute(
            "INSERT INTO table_chunks SELECT ?, idx, hash FROM table_chunks WHERE vid=?", (dst, src)
        )

    def _op_unjournal(self, stale: set[bytes]) -> None:
        self._db.execute("DELETE FROM journal")

    def _op_drop(self, stale: set[bytes], vid: int) -> None:
        self._hashes_from(stale, vid)
        self._db.execute("DELETE FROM table_chunks WHERE vid=?", (vid,))
