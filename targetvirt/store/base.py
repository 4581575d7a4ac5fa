"""The metadata store interface.

The controller's durable state is a set of *records* (pools, containers, vdisks; small,
JSON-encoded, each with a checksum) and *tables*, stored as content-addressed chunks of
packed entries.  A table's chunk list hashes to a root that its vdisk record carries, so
every byte of every table is verified on load (a Merkle tree of depth two).

A :class:`Transaction` is an ordered list of operations that a backend applies
atomically: after a crash either all of it or none of it is visible.  Backends: SQLite
(one host) and, later, RADOS (omap with compare-and-set).
"""

from __future__ import annotations

import hashlib
import json
import zlib
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
    exactly src's chunk list), ``("drop", vid)`` (the table goes).  Order matters: a copy
    sees the chunks written before it, and chunks written after it change only dst.
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


class Store(Protocol):
    path: str
    readonly: bool

    def load(self) -> Image:
        """Read and verify everything; raise StoreCorrupt on any damage."""
        ...

    def commit(self, txn: Transaction) -> None:
        """Apply ``txn`` atomically and durably."""
        ...

    def chunk_hashes(self, vid: int) -> list[bytes]: ...

    def close(self) -> None: ...
