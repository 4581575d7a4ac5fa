"""Workload for the crash test: random I/O and metadata operations until killed.

Run as ``python -m tests.targetvirt.crash_child STATE_DIR SEED [RADOS_LOCATION]``: with a
RADOS location, the metadata store and the pool's first container live there (the second
container stays a file in STATE_DIR, so copies cross kinds).  Before each operation
it appends ``B <json op>`` to STATE_DIR/ops.log, and ``E`` after it returned, with
unbuffered writes, so the parent knows exactly which operations completed before the
SIGKILL (the page cache survives a SIGKILL; only this process dies).
"""

from __future__ import annotations

import json
import os
import random
import sys

from targetvirt.catalog import Catalog
from targetvirt.store.base import Store
from targetvirt.store.sqlite import SqliteStore
from tests.targetvirt.engine_model import SEG

VDISK_SIZE = 8 * SEG + 4096
POOL_SEGMENTS = 160


def choose(rng: random.Random, names: list[str], writable: list[str]) -> dict[str, object]:
    r = rng.random()
    if r < 0.55 and writable:
        name = rng.choice(writable)
        offset = rng.randrange(VDISK_SIZE - 1)
        length = min(rng.randint(1, 2 * SEG), VDISK_SIZE - offset)
        return {
            "op": "write",
            "name": name,
            "offset": offset,
            "length": length,
            "seed": rng.getrandbits(32),
        }
    if r < 0.65 and writable:
        name = rng.choice(writable)
        offset = rng.randrange(VDISK_SIZE - 1)
        return {
            "op": "unmap",
            "name": name,
            "offset": offset,
            "length": min(rng.randint(1, 3 * SEG), VDISK_SIZE - offset),
        }
    if r < 0.80:
        return {"op": "flush"}
    if r < 0.88 and writable:
        return {"op": "snapshot", "name": rng.choice(writable), "snap": f"s{rng.getrandbits(20)}"}
    if r < 0.93 and names:
        return {"op": "clone", "name": rng.choice(names), "clone": f"k{rng.getrandbits(20)}"}
    deletable = [n for n in names if n not in ("a", "b")]
    if deletable:
        return {"op": "delete", "name": rng.choice(deletable)}
    return {"op": "flush"}


def open_store(state: str, location: str | None) -> Store:
    """The workload's metadata store (the parent opens it the same way after a kill)."""
    if location:
        from targetvirt.store.rados import RadosStore  # noqa: PLC0415 - python3-rados

        return RadosStore(location, create=True)
    return SqliteStore(os.path.join(state, "meta.db"), create=True)


def main() -> None:
    state, seed = sys.argv[1], int(sys.argv[2])
    location = sys.argv[3] if len(sys.argv) > 3 else None
    marker = os.path.join(state, "created")
    catalog = Catalog.open(open_store(state, location))
    if not os.path.exists(marker):
        size = (1 << 20) + POOL_SEGMENTS // 2 * SEG
        if location:
            catalog.create_pool("p", location, POOL_SEGMENTS // 2 * SEG, segment_size=SEG)
        else:
            catalog.create_pool("p", os.path.join(state, "c0"), size, segment_size=SEG)
        # a preallocated container keeps freed data in place: stale bytes must never show
        catalog.add_container("p", os.path.join(state, "c1"), size, preallocate=True)
        catalog.create_vdisk("a", "p", VDISK_SIZE, "redirect")
        catalog.create_vdisk("b", "p", VDISK_SIZE, "copy")
        open(marker, "w").close()
    log = os.open(os.path.join(state, "ops.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(log, b"R\n")  # a restart: the parent's replay starts from the reopened state
    rng = random.Random(seed)
    while True:
        names = sorted(catalog.vdisks)
        writable = [n for n in names if not catalog.vdisks[n].readonly]
        op = choose(rng, names, writable)
        if catalog.pool("p").free_segments() < 40 and op["op"] in ("write", "unmap", "clone"):
            op = {"op": "flush"}  # keep clear of PoolFull: this test is about crashes
        os.write(log, b"B " + json.dumps(op).encode() + b"\n")
        apply(catalog, op)
        os.write(log, b"E\n")


def apply(catalog: Catalog, op: dict[str, object]) -> None:
    kind = op["op"]
    if kind == "write":
        data = random.Random(op["seed"]).randbytes(int(op["length"]))  # type: ignore[arg-type]
        catalog.vdisk(str(op["name"])).write(int(op["offset"]), data)  # type: ignore[arg-type]
    elif kind == "unmap":
        catalog.vdisk(str(op["name"])).unmap(int(op["offset"]), int(op["length"]))  # type: ignore[arg-type]
    elif kind == "flush":
        catalog.commit()
    elif kind == "snapshot":
        catalog.snapshot(str(op["name"]), str(op["snap"]))
    elif kind == "clone":
        catalog.clone(str(op["name"]), str(op["clone"]))
    elif kind == "delete":
        catalog.delete(str(op["name"]), recursive=True)


if __name__ == "__main__":
    main()
