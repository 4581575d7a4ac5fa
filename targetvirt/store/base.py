"""The metadata store interface.

The controller's durable state is a set of *records* (pools, containers, vdisks; small,
JSON-encoded, each with a checksum) and *tables*, stored as content-addressed chunks of
packed entries.  A table's chunk list hashes to a root that its vdisk record carries, so
every byte of every table is verified on load (a Merkle tree of depth two).

A :class:`Transaction` is an ordered list of operations that a backend applies
atomically: after a crash either all of it or none of it is visible.  Backends: SQLite
(one host) and RADOS (omap with compare-and-set).

A store may also keep a *journal* of data-path mapping changes (allocations, unmaps)
written without waiting for the medium: it survives the death of the process, not of the
host, so each journal write carries the host's boot id and only a journal of the same boot
is replayed (the page cache then still holds the data those mappings point at).  Every
durable commit of the catalog covers everything journaled before it and clears the journal.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from targetvirt.errors import StoreCorrupt

# 2: a record's checksum covers its kind and id as well as its body
FORMAT_VERSION = 2


def chunk_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def table_root(hashes: list[bytes]) -> str:
    return hashlib.blake2b(b"".join(hashes), digest_size=16).hexdigest()


def record_crc(kind: str, key: int, raw: bytes) -> int:
    """The checksum of a record: its key too, so a damaged kind or id cannot move a
    record (a vdisk would silently vanish, its segments counted free)."""
    return zlib.crc32(raw, zlib.crc32(f"{kind}\0{key}\0".encode()))


def encode_record(kind: str, key: int, body: dict[str, Any]) -> tuple[bytes, int]:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return raw, record_crc(kind, key, raw)


def decode_record(kind: object, key: object, raw: object, crc: object) -> dict[str, Any]:
    """A record's body, as read back: any field may be damaged, even in its type."""
    if (
        not isinstance(kind, str)
        or type(key) is not int
        or not isinstance(raw, bytes)
        or record_crc(kind, key, raw) != crc
    ):
        raise StoreCorrupt(f"metadata record {kind!r} {key!r} fails its checksum")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise StoreCorrupt(f"metadata record {kind} {key} is not valid JSON") from None
    if not isinstance(body, dict):
        raise StoreCorrupt(f"metadata record {kind} {key} is not an object")
    return body


Op = tuple[Any, ...]


@dataclass
class Transaction:
    """Operations applied atomically, in the order they were added.

    ``("put", kind, id, body)``, ``("delete", kind, id)``, ``("chunk", vid, index, hash,
    data)``, ``("truncate", vid, nchunks)``, ``("copy", src_vid, dst_vid)`` (dst gets
    exactly src's chunk list), ``("drop", vid)`` (the table goes), ``("unjournal",)`` (the
    journal is covered by this commit and goes).  Order matters: a copy sees the chunks
    written before it, and chunks written after it change only dst.
    """

    ops: list[Op] = field(default_factory=list)

    def put(self, kind: str, key: int, body: dict[str, Any]) -> None:
        self.ops.append(("put", kind, key, body))

    def delete(self, kind: str, key: int) -> None:
        self.ops.append(("delete", kind, key))

    def chunk(self, vid: int, index: int, digest: bytes, data: bytes) -> None:
        self.ops.append(("chunk", vid, index, digest, data))

    def truncate(self, vid: int, nchunks: int) -> None:
        self.ops.append(("truncate", vid, nchunks))

    def copy(self, src: int, dst: int) -> None:
        self.ops.append(("copy", src, dst))

    def drop(self, vid: int) -> None:
        self.ops.append(("drop", vid))

    def clear_journal(self) -> None:
        self.ops.append(("unjournal",))

    def extend(self, other: Transaction) -> None:
        self.ops.extend(other.ops)

    @property
    def empty(self) -> bool:
        return not self.ops


@dataclass
class Image:
    """Everything a store holds, as loaded and verified."""

    records: dict[str, dict[int, dict[str, Any]]]
    tables: dict[int, tuple[bytes, list[bytes]]]  # vid -> (packed entries, chunk hashes)
    generation: int
    # mapping changes journaled since the last durable commit: (boot id, vid, index, entry)
    journal: list[JournalRow] = field(default_factory=list)


# (vid, index, entry): entry ``index`` of vdisk ``vid`` became ``entry`` (0: unallocated)
JournalEntry = tuple[int, int, int]
JournalRow = tuple[str, int, int, int]
_JOURNAL_ENTRY = struct.Struct("<QQQ")


def encode_journal(boot: str, entries: Sequence[JournalEntry]) -> tuple[bytes, int]:
    """One journal write: packed entries and a checksum that also covers the boot id."""
    raw = b"".join(_JOURNAL_ENTRY.pack(*e) for e in entries)
    return raw, zlib.crc32(raw, zlib.crc32(boot.encode()))


def decode_journal(boot: object, raw: object, crc: object) -> list[JournalRow]:
    """The rows of one journal write, as read back: any field may be damaged."""
    if (
        not isinstance(boot, str)
        or not isinstance(raw, bytes)
        or len(raw) % _JOURNAL_ENTRY.size
        or zlib.crc32(raw, zlib.crc32(boot.encode())) != crc
    ):
        raise StoreCorrupt("a metadata journal record fails its checksum")
    return [(boot, *e) for e in _JOURNAL_ENTRY.iter_unpack(raw)]


class Store(Protocol):
    path: str
    readonly: bool
    # whether journal() is kept (a store that cannot keep one makes mapping changes
    # durable at flush only, like a disk's volatile cache)
    journals: bool

    def load(self) -> Image:
        """Read and verify everything; raise StoreCorrupt on any damage."""
        ...

    def commit(self, txn: Transaction) -> None:
        """Apply ``txn`` atomically and durably."""
        ...

    def journal(self, boot: str, entries: Sequence[JournalEntry]) -> None:
        """Append to the journal atomically, without waiting for the medium."""
        ...

    def chunk_hashes(self, vid: int) -> list[bytes]: ...

    def close(self) -> None: ...
