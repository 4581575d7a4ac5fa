"""The SQLite store: atomicity, single writer, and damage detection (with a fuzz target
over damaged store files and container headers, scaled by TV_FUZZ_SCALE)."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from targetvirt.catalog import Catalog
from targetvirt.check import check
from targetvirt.check import main as check_main
from targetvirt.container import HEADER_BYTES
from targetvirt.errors import NotFound, StoreCorrupt, StoreError, StoreLocked, TargetvirtError
from targetvirt.store.base import Transaction
from targetvirt.store.sqlite import SqliteStore
from targetvirt.vdisk import Freeze
from tests.fuzzing import fuzz_settings, one_line
from tests.targetvirt.engine_model import SEG

ROOT = Path(__file__).resolve().parents[3]


def make_store(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    """A store with a pool, two vdisks, a snapshot and a clone; returns expected contents."""
    db = str(tmp_path / "meta.db")
    cat = Catalog.open(SqliteStore(db, create=True))
    cat.create_pool("p", str(tmp_path / "c0"), (1 << 20) + 64 * SEG, segment_size=SEG)
    a = cat.create_vdisk("a", "p", 20 * SEG)
    rng = random.Random(5)
    for _ in range(30):
        a.write(rng.randrange(19 * SEG), rng.randbytes(rng.randrange(1, SEG)))
    cat.snapshot("a", "s")
    cat.clone("a@s", "b").write(0, b"clone data")
    expected = {n: v.read(0, v.size) for n, v in cat.vdisks.items()}
    cat.close()
    return db, expected


def reopen(db: str) -> Catalog:
    return Catalog.open(SqliteStore(db))


def test_reopen_reads_back_everything(tmp_path: Path) -> None:
    db, expected = make_store(tmp_path)
    cat = reopen(db)
    assert {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
    cat.close()


def test_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from targetvirt.store.sqlite import SqliteStore; "
         "s=SqliteStore(sys.argv[1]); print('ready', flush=True); time.sleep(60)", db],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match=f"in use by another process \\(pid {holder.pid}\\)"):
            SqliteStore(db)
        SqliteStore(db, readonly=True).close()  # readers are fine
    finally:
        holder.kill()
        holder.wait()
    SqliteStore(db).close()  # the lock died with its holder


def test_missing_store_and_missing_container_are_named(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no metadata store"):
        SqliteStore(str(tmp_path / "nope.db"))
    db, _ = make_store(tmp_path)
    os.rename(tmp_path / "c0", tmp_path / "moved")
    with pytest.raises(NotFound, match="container 0 is missing"):
        reopen(db)


def test_swapped_container_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    make_store(other)
    os.replace(other / "c0", tmp_path / "c0")
    with pytest.raises(StoreCorrupt, match="not container"):
        reopen(db)


def test_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    db, expected = make_store(tmp_path)
    store = SqliteStore(db)
    txn = Transaction()
    txn.put("vdisk", 999, {"name": "ghost"})
    txn.ops.append(("bogus",))
    with pytest.raises(AttributeError):
        store.commit(txn)
    store.close()
    cat = reopen(db)
    assert set(cat.vdisks) == set(expected)
    cat.close()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _checkpoint(db: str) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def test_damaged_table_chunk_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    con = sqlite3.connect(db)
    (h, data) = con.execute("SELECT hash, data FROM chunks LIMIT 1").fetchone()
    bad = bytearray(data)
    bad[100] ^= 1
    con.execute("UPDATE chunks SET data=? WHERE hash=?", (bytes(bad), h))
    con.commit()
    con.close()
    with pytest.raises(StoreCorrupt, match="fails its checksum"):
        reopen(db)


def test_damaged_record_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    con = sqlite3.connect(db)
    body = con.execute("SELECT body FROM records WHERE kind='vdisk' LIMIT 1").fetchone()[0]
    con.execute(
        "UPDATE records SET body=? WHERE body=?", (body.replace(b'"size":', b'"sizf":'), body)
    )
    con.commit()
    con.close()
    with pytest.raises(StoreCorrupt, match="fails its checksum"):
        reopen(db)


def _damaged(db: str, sql: str) -> None:
    con = sqlite3.connect(db)
    con.execute(sql)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "sql",
    [
        # found by the fuzzer: a record under another kind or id passed its checksum, and
        # the catalog opened without that vdisk (its segments counted free) or container
        "UPDATE records SET kind='vdisj' WHERE kind='vdisk' AND id=(SELECT MIN(id) FROM "
        "records WHERE kind='vdisk')",
        "UPDATE records SET kind='containeR' WHERE kind='container'",
        "UPDATE records SET id=id+100 WHERE kind='vdisk' AND id=(SELECT MAX(id) FROM records "
        "WHERE kind='vdisk')",
        # ... or a value of another type reached code that expected bytes
        "UPDATE records SET body=CAST(body AS TEXT) WHERE kind='pool'",
        "UPDATE records SET body=42 WHERE kind='container'",
        "UPDATE table_chunks SET hash=1099511627776 WHERE idx=0",
        "UPDATE chunks SET data=CAST(data AS TEXT)",
        "UPDATE meta SET value='x' WHERE key='generation'",
    ],
)
def test_damaged_record_key_or_type_is_detected(tmp_path: Path, sql: str) -> None:
    db, _ = make_store(tmp_path)
    _damaged(db, sql)
    with pytest.raises(StoreCorrupt) as e:
        reopen(db)
    assert one_line(str(e.value))


def test_damaged_schema_quoted_in_an_error_is_detected(tmp_path: Path) -> None:
    """Found by the fuzzer: SQLite's message quoted schema text that is not UTF-8, and
    the sqlite3 module raised UnicodeDecodeError instead of DatabaseError."""
    db, _ = make_store(tmp_path)
    con = sqlite3.connect(db)
    con.execute("PRAGMA writable_schema=ON")
    con.execute(
        "UPDATE sqlite_master SET sql=CAST(? AS TEXT) WHERE name='chunks'",
        (b"CREATE TABLE chunks(a int) \xf2\xf2",),
    )
    con.commit()
    con.close()
    with pytest.raises(StoreCorrupt, match="unknown table option") as e:
        reopen(db)
    assert one_line(str(e.value))


def test_damaged_table_index_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM table_chunks WHERE idx=0 AND vid=(SELECT MIN(vid) FROM table_chunks)")
    con.commit()
    con.close()
    with pytest.raises(StoreCorrupt):
        reopen(db)


def test_truncated_store_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    _checkpoint(db)
    size = os.path.getsize(db)
    os.truncate(db, size // 2)
    with pytest.raises(StoreCorrupt, match="damaged"):
        reopen(db)


def test_random_byte_flips_never_go_unnoticed(tmp_path: Path) -> None:
    """Flip one byte anywhere: the store is refused with a clear error, or reads back intact.

    (A flip in unused space of the file changes nothing anyone reads.)
    """
    db, expected = make_store(tmp_path)
    _checkpoint(db)
    pristine = Path(db).read_bytes()
    rng = random.Random(11)
    detected = 0
    for _ in range(150):
        Path(db).write_bytes(pristine)
        for name in ("meta.db-wal", "meta.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        _flip(Path(db), rng.randrange(len(pristine)))
        try:
            cat = reopen(db)
        except TargetvirtError as e:
            assert str(e) and "\n" not in str(e)
            detected += 1
            continue
        try:
            assert {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
        finally:
            cat.store.close()
    assert detected > 10  # most of a small store is live data


def test_a_refused_store_is_released(tmp_path: Path) -> None:
    """A store that fails to load is closed at once (lock and connection), not left to the
    garbage collector: the fixed file opens again in the same process."""
    db, expected = make_store(tmp_path)
    con = sqlite3.connect(db)
    body = con.execute("SELECT body FROM records WHERE kind='vdisk' LIMIT 1").fetchone()[0]
    con.execute("UPDATE records SET crc=crc+1 WHERE body=?", (body,))
    con.commit()
    with pytest.raises(StoreCorrupt):
        reopen(db)
    con.execute("UPDATE records SET crc=crc-1 WHERE body=?", (body,))
    con.commit()
    con.close()
    cat = reopen(db)  # StoreLocked here if the refused open still held the lock
    assert {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
    cat.close()


# --- fuzz: damaged store files and container headers -----------------------------------


class Pristine:
    """A store and its container, checkpointed, with their bytes and contents."""

    def __init__(self, root: Path) -> None:
        self.root = root
        db, self.expected = make_store(root)
        _checkpoint(db)
        self.db = Path(db)
        self.container = root / "c0"
        self.db_bytes = self.db.read_bytes()
        self.container_bytes = self.container.read_bytes()

    def restore(self) -> None:
        self.db.write_bytes(self.db_bytes)
        for suffix in ("-wal", "-shm"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
        with open(self.container, "r+b") as f:
            f.write(self.container_bytes[:HEADER_BYTES])
            if os.fstat(f.fileno()).st_size != len(self.container_bytes):
                f.seek(0)
                f.write(self.container_bytes)  # a truncation took data with it


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return Pristine(tmp_path_factory.mktemp("damage"))


def damage(data: bytearray, how: str, where: int, value: bytes) -> bytearray:
    at = where % (len(data) + 1)
    if how == "flip" and at < len(data):
        data[at] ^= value[0] or 0x80
    elif how == "set":
        data[at : at + len(value)] = value[: len(data) - at]
    elif how == "zero_page":  # a lost 4 KiB write
        start = at // 4096 * 4096
        data[start : start + 4096] = bytes(len(data[start : start + 4096]))
    elif how == "truncate":
        del data[at:]
    return data


damages = st.lists(
    st.tuples(
        st.sampled_from(["flip", "flip", "flip", "set", "zero_page", "truncate"]),
        st.integers(0, 2**24),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)
header_damages = st.lists(
    st.tuples(
        st.sampled_from(["flip", "flip", "set", "truncate"]),
        st.one_of(st.integers(0, 80), st.integers(0, HEADER_BYTES)),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


@fuzz_settings(200)
@given(
    db_damage=st.one_of(st.just([]), damages),
    header_damage=st.one_of(st.just([]), header_damages),
)
def test_damaged_store_or_container_header_is_refused_or_intact(
    pristine: Pristine,
    db_damage: list[tuple[str, int, bytes]],
    header_damage: list[tuple[str, int, bytes]],
) -> None:
    """Any flips, overwrites, lost pages or truncation of the store file, and of a
    container's header: opening and reading every vdisk either raises a one-line
    TargetvirtError or gives back exactly what was written."""
    pristine.restore()
    db = bytearray(pristine.db_bytes)
    for how, where, value in db_damage:
        db = damage(db, how, where, value)
    pristine.db.write_bytes(db)
    header = bytearray(pristine.container_bytes[:HEADER_BYTES])
    for how, where, value in header_damage:
        header = damage(header, how, where, value)
    with open(pristine.container, "r+b") as f:
        f.write(header)
        if len(header) < HEADER_BYTES:
            f.truncate(len(header))
    try:
        cat = reopen(str(pristine.db))
        try:
            contents = {n: v.read(0, v.size) for n, v in cat.vdisks.items()}
        finally:
            cat.close()
    except TargetvirtError as e:
        assert one_line(str(e)), str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("intact" if db_damage or header_damage else "undamaged")
    assert contents == pristine.expected


# --- the journal of data-path mapping changes ---------------------------------------------


def unflushed_writes(db: str, boot: str) -> dict[str, bytes]:
    """Open with ``boot``, write into new and shared segments and unmap some, flush
    nothing, and 'die' (drop the catalog without closing it); returns what was written."""
    cat = Catalog.open(SqliteStore(db), boot_id=boot)
    a, b = cat.vdisk("a"), cat.vdisk("b")
    a.unmap(19 * SEG, SEG)
    cat.commit()  # (durable: segment 19 is unallocated)
    a.write(19 * SEG + 5, b"new segment")  # allocation
    shared = next(i for i, _ in b.table.iter_mapped() if i > 0)  # shared with a@s
    b.write(shared * SEG + 3, b"redirected")  # copy-on-write
    a.unmap(0, 2 * SEG)  # whole segments dropped
    expected = {n: v.read(0, v.size) for n, v in cat.vdisks.items()}
    assert cat.store.journals and cat._journaled
    cat.store._release_lock()  # type: ignore[attr-defined] - what a dying process does
    return expected


def test_a_journal_of_the_same_boot_is_replayed_and_committed(tmp_path: Path) -> None:
    db, before = make_store(tmp_path)
    expected = unflushed_writes(db, "boot-1")
    assert expected != before
    cat = Catalog.open(SqliteStore(db), boot_id="boot-1")
    assert cat.replayed >= 2 and not cat._journaled
    assert {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
    cat.close()
    # the replay was committed durably: a later boot sees it without the journal
    cat = Catalog.open(SqliteStore(db), boot_id="boot-2")
    assert cat.replayed == 0 and {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
    assert check(cat).clean
    cat.close()


def test_a_journal_of_another_boot_is_discarded(tmp_path: Path) -> None:
    db, before = make_store(tmp_path)
    unflushed_writes(db, "boot-1")
    cat = Catalog.open(SqliteStore(db), boot_id="boot-2")
    assert cat.replayed == 0
    # the tables are the flushed ones; the data written in place into mapped segments
    # since then may or may not be there (a write cache lost), new segments are gone
    assert cat.vdisk("a").read(19 * SEG, SEG) == bytes(SEG)
    assert cat.vdisk("a").read(0, 2 * SEG) == before["a"][: 2 * SEG]
    assert cat.vdisk("b").read(0, cat.vdisk("b").size) == before["b"]
    assert check(cat, repair=True).reclaimed_segments >= 0  # a leak is allowed, no damage
    assert check(cat).clean
    cat.close()
    assert Catalog.open(SqliteStore(db), boot_id="boot-1").replayed == 0  # cleared


def test_a_flush_clears_the_journal(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    cat = Catalog.open(SqliteStore(db), boot_id="boot-1")
    cat.vdisk("a").write(19 * SEG, b"x")
    assert cat.store.load().journal
    cat.commit()
    assert cat.store.load().journal == []
    cat.close()


@pytest.mark.parametrize(
    "sql, message",
    [
        ("UPDATE journal SET entries=x'00'", "journal record fails its checksum"),
        ("UPDATE journal SET boot='boot-9'", "journal record fails its checksum"),
        ("UPDATE journal SET entries=42", "journal record fails its checksum"),
        ("UPDATE journal SET crc=crc+1", "journal record fails its checksum"),
    ],
)
def test_a_damaged_journal_is_detected(tmp_path: Path, sql: str, message: str) -> None:
    db, _ = make_store(tmp_path)
    unflushed_writes(db, "boot-1")
    _damaged(db, sql)
    with pytest.raises(StoreCorrupt, match=message) as e:
        Catalog.open(SqliteStore(db), boot_id="boot-1")
    assert one_line(str(e.value))


def test_a_journal_row_that_fits_no_table_is_detected(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    store = SqliteStore(db)
    store.journal("boot-1", [(999, 0, 0)])
    store.close()
    with pytest.raises(StoreCorrupt, match="fits no table"):
        Catalog.open(SqliteStore(db), boot_id="boot-1")


def test_a_store_from_before_the_journal_opens(tmp_path: Path) -> None:
    """Stores written before the journal existed have no journal table: read-only opens
    see an empty journal, writable ones add the table."""
    db, expected = make_store(tmp_path)
    _damaged(db, "DROP TABLE journal")
    cat = Catalog.open(SqliteStore(db, readonly=True))
    assert {n: v.read(0, v.size) for n, v in cat.vdisks.items()} == expected
    cat.close()
    cat = Catalog.open(SqliteStore(db))
    cat.vdisk("a").write(19 * SEG, b"x")
    assert cat.store.load().journal
    cat.close()


# --- users' freezes, kept in vdisk records ------------------------------------------------


def test_a_freeze_is_stored_with_its_vdisk(tmp_path: Path) -> None:
    db, _ = make_store(tmp_path)
    cat = reopen(db)
    cat.set_freezes({"a": Freeze("invalid", 2e9), "b": Freeze("nowrite")})
    cat.set_freezes({"b": None})
    cat.close()
    cat = reopen(db)
    try:
        assert {n: v.freeze for n, v in cat.vdisks.items()} == {
            "a": Freeze("invalid", 2e9), "a@s": None, "b": None,
        }  # fmt: skip
        assert check(cat).frozen == ["a (invalid, until 2033-05-18 03:33:20 UTC)"]
    finally:
        cat.close()


def test_a_freeze_the_store_refuses_is_not_left_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = make_store(tmp_path)
    cat = reopen(db)

    def broken(txn: Transaction) -> None:
        raise StoreError("the disk is gone")

    with monkeypatch.context() as m:
        m.setattr(cat.store, "commit", broken)
        with pytest.raises(StoreError):
            cat.set_freezes({"a": Freeze("nowrite"), "b": Freeze("nowrite")})
    assert cat.vdisk("a").freeze is None and cat.vdisk("b").freeze is None
    cat.close()  # commits what is pending: nothing of the failed freeze
    cat = reopen(db)
    assert all(v.freeze is None for v in cat.vdisks.values())
    cat.close()


def put_freeze(db: str, name: str, freeze: object) -> None:
    """Store ``freeze`` in the vdisk's record as a (buggy) writer would: checksum valid."""
    store = SqliteStore(db)
    try:
        vdisks = store.load().records["vdisk"]
        vid, body = next((k, b) for k, b in vdisks.items() if b["name"] == name)
        txn = Transaction()
        txn.put("vdisk", vid, {**body, "freeze": freeze})
        store.commit(txn)
    finally:
        store.close()


@pytest.mark.parametrize(
    "freeze",
    [
        None,
        "nowrite",
        {"mode": "nowrite"},
        {"mode": "sideways", "until": None},
        {"mode": "nowrite", "until": "soon"},
        {"mode": "nowrite", "until": True},
        {"mode": "nowrite", "until": 1e300},
        {"mode": "nowrite", "until": -1.0},
        {"mode": "nowrite", "until": None, "extra": 1},
    ],
)
def test_a_damaged_freeze_is_named_not_thawed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], freeze: object
) -> None:
    db, _ = make_store(tmp_path)
    put_freeze(db, "a", freeze)
    with pytest.raises(StoreCorrupt, match="the freeze of vdisk a is damaged") as e:
        reopen(db)
    assert one_line(str(e.value))
    os.rename(db, tmp_path / "targetvirt.db")
    assert check_main(["--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("targetvirt-check: DAMAGE: the freeze of vdisk a is damaged"), err
