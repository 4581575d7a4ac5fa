"""Shared helpers for engine tests: a reference model and invariant checks."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.pool import Pool
from targetvirt.store.sqlite import SqliteStore

SEG = 64 << 10


def data_for(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@dataclass
class Model:
    """The plain reference: every vdisk and snapshot as a bytearray."""

    disks: dict[str, bytearray] = field(default_factory=dict)
    readonly: set[str] = field(default_factory=set)

    def write(self, name: str, offset: int, data: bytes) -> None:
        self.disks[name][offset : offset + len(data)] = data

    def zero(self, name: str, offset: int, length: int) -> None:
        self.disks[name][offset : offset + length] = bytes(length)

    def resize(self, name: str, size: int) -> None:
        d = self.disks[name]
        if size < len(d):
            del d[size:]
        else:
            d.extend(bytes(size - len(d)))


def open_catalog(path: str, wallclock: Callable[[], float] = time.time) -> Catalog:
    return Catalog.open(SqliteStore(path, create=True), wallclock)


def check_refcounts(catalog: Catalog) -> None:
    """Incremental refcounts equal a recount from the tables; free lists agree."""
    for pool in catalog.pools.values():
        tables = [v.table for v in catalog.vdisks.values() if v.pool is pool]
        recount = pool.recount(tables)
        for cid in pool.containers:
            # live counts = the tables' references + those dropped but not yet durable
            live = pool.refs_view(cid)
            assert np.array_equal(pool.settled_refs(cid), recount[cid]), (
                f"refcounts of {pool.name}/{cid} drifted"
            )
            free = set(pool._free[cid].tolist())
            assert len(free) == len(pool._free[cid]), "a segment is twice in a free list"
            assert free == set(np.flatnonzero(live == 0).tolist()), "free lists disagree"
        check_sharing(catalog, pool)


def check_sharing(catalog: Catalog, pool: Pool) -> None:
    """A segment is only ever shared at one index, within one family."""
    seen: dict[int, tuple[int, int]] = {}
    for v in catalog.vdisks.values():
        if v.pool is not pool:
            continue
        for index, entry in v.table.iter_mapped():
            where = (v.family.fid, index)
            assert seen.setdefault(t.location(entry), where) == where, (
                f"segment {entry:#x} mapped at {where} and {seen[t.location(entry)]}"
            )


def check_contents(catalog: Catalog, model: Model) -> None:
    assert set(catalog.vdisks) == set(model.disks)
    for name, expected in model.disks.items():
        v = catalog.vdisks[name]
        assert v.size == len(expected), f"{name} size {v.size} != {len(expected)}"
        assert v.read(0, v.size) == expected, f"{name} differs from the model"
        assert v.readonly == (name in model.readonly)
