"""Engine benchmark: snapshot/clone cost, table memory, I/O overhead of the table, COW cost.

Every row is measured against a baseline in the same run, on the same filesystem
(default: a folder in /dev/shm, so the storage medium does not hide the engine's cost):

* snapshot / clone of a fully allocated 1 TiB vdisk (1,048,576 entries of 1 MiB), durable
  commit included; baseline: copying the packed table in memory (the floor of any
  table copy).  Target <= 100 ms.  The table is filled directly (no data written):
  the cost of a snapshot does not depend on the data.
* memory of a table per entry.  Target <= 16 bytes.
* 4 KiB random reads / writes to allocated segments through the table, vs plain
  os.preadv / os.pwritev on the container file in the same process.  Target >= 0.6.
* first write (4 KiB) to a shared 1 MiB segment (redirect COW), vs copying 1 MiB with
  os.copy_file_range.  Target <= 2.  The copy-mode COW, which must commit before the
  writer proceeds, is shown for information.

``python -m bench.engine [--dir DIR] [--json]``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from bench.report import Row, median_time, print_json, print_table
from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.store.sqlite import SqliteStore

MiB = 1 << 20
TiB = 1 << 40


def fill_table(catalog: Catalog, name: str) -> None:
    """Map every entry of ``name`` to its own segment of container 0, durably."""
    v = catalog.vdisk(name)
    view = v.table.view()
    view[:] = np.uint64(t.MAPPED) | np.arange(len(view), dtype=np.uint64)
    v.table.mark_all_dirty()
    v.pool.load_refcounts([v.table])
    catalog.commit()


def bench_snapshots(workdir: str, repeat: int) -> tuple[Row, Row, Row]:
    catalog = Catalog.open(SqliteStore(os.path.join(workdir, "big.db"), create=True))
    catalog.create_pool("big", os.path.join(workdir, "big0"), MiB + TiB)
    catalog.create_vdisk("tib", "big", TiB)
    fill_table(catalog, "tib")
    table = catalog.vdisk("tib").table
    memcpy = median_time(table.entries.tobytes, repeat)
    snaps, clones = [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        catalog.snapshot("tib", f"s{i}")
        snaps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        catalog.clone("tib", f"c{i}")
        clones.append(time.perf_counter() - t0)
    per_entry = sys.getsizeof(table.entries) / len(table)
    catalog.close()
    snap_ms, clone_ms, base_ms = (statistics.median(x) * 1e3 for x in (snaps, clones, [memcpy]))
    return (
        Row("snapshot 1 TiB (1,048,576 entries), durable", snap_ms, "ms", "in-memory table copy",
            base_ms, snap_ms / base_ms, "<= 100 ms"),
        Row("clone 1 TiB, durable", clone_ms, "ms", "in-memory table copy", base_ms,
            clone_ms / base_ms, "<= 100 ms"),
        Row("table memory per entry", per_entry, "bytes", "", None, None, "<= 16"),
    )  # fmt: skip


def bench_random_io(workdir: str, rounds: int, ops: int) -> tuple[Row, Row]:
    catalog = Catalog.open(SqliteStore(os.path.join(workdir, "io.db"), create=True))
    size = 1 << 30
    catalog.create_pool("io", os.path.join(workdir, "io0"), MiB + size)
    v = catalog.create_vdisk("v", "io", size)
    chunk = os.urandom(MiB)
    for off in range(0, size, MiB):
        v.write(off, chunk)
    catalog.commit()
    fd = v.pool.containers[0].fd
    rng = random.Random(7)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
    buf = [memoryview(bytearray(4096))]

    def raw_read() -> None:
        for o in offsets:
            os.preadv(fd, buf, MiB + o)

    def our_read() -> None:
        for o in offsets:
            v.readinto(o, buf)

    def raw_write() -> None:
        for o in offsets:
            os.pwritev(fd, buf, MiB + o)

    def our_write() -> None:
        for o in offsets:
            v.writev(o, buf)

    results = {}
    for name, raw, ours in (("read", raw_read, our_read), ("write", raw_write, our_write)):
        raw_t, our_t = [], []
        for _ in range(rounds):  # interleaved, so noise hits both sides alike
            raw_t.append(median_time(raw, 1))
            our_t.append(median_time(ours, 1))
        raw_us = statistics.median(raw_t) / ops * 1e6
        our_us = statistics.median(our_t) / ops * 1e6
        results[name] = (our_us, raw_us)
    catalog.close()
    return tuple(  # type: ignore[return-value]
        Row(f"4 KiB random {name} through the table", ours, "us/op", f"os.p{name}v", raw,
            raw / ours, ">= 0.6 (ratio = baseline/ours)")
        for name, (ours, raw) in results.items()
    )  # fmt: skip


def bench_cow(workdir: str, segments: int) -> tuple[Row, Row]:
    rows = []
    for mode in ("redirect", "copy"):
        catalog = Catalog.open(SqliteStore(os.path.join(workdir, f"cow-{mode}.db"), create=True))
        catalog.create_pool("cow", os.path.join(workdir, f"cow-{mode}"), MiB + 4 * segments * MiB)
        v = catalog.create_vdisk("v", "cow", segments * MiB, mode)  # type: ignore[arg-type]
        chunk = os.urandom(MiB)
        for i in range(segments):
            v.write(i * MiB, chunk)
        catalog.snapshot("v", "s")
        c = v.pool.containers[0]
        base = []
        for i in range(segments):  # baseline: the bare 1 MiB copy the fault must do,
            # into never-touched space as the fault's copy is (COW takes segments..2*segments)
            src, dst = c.offset_of(i), c.offset_of(3 * segments + i)
            t0 = time.perf_counter()
            os.copy_file_range(c.fd, c.fd, MiB, src, dst)
            base.append(time.perf_counter() - t0)
        faults = []
        for i in range(segments):
            t0 = time.perf_counter()
            v.write(i * MiB + 8192, b"w" * 4096)
            faults.append(time.perf_counter() - t0)
        catalog.close()
        ours, raw = statistics.median(faults) * 1e6, statistics.median(base) * 1e6
        target = "<= 2 (ratio = ours/baseline)" if mode == "redirect" else "(informational)"
        rows.append(Row(f"first 4 KiB write to a shared 1 MiB segment ({mode})", ours, "us",
                        "copy_file_range 1 MiB", raw, ours / raw, target))  # fmt: skip
    return rows[0], rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (for CI smoke)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tv-bench-", dir=args.dir)
    try:
        snap, clone, mem = bench_snapshots(workdir, 3 if args.quick else 10)
        read, write = bench_random_io(
            workdir, 3 if args.quick else 7, 5000 if args.quick else 40000
        )
        cow, cow_copy = bench_cow(workdir, 16 if args.quick else 64)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [snap, clone, mem, read, write, cow, cow_copy]
    if args.json:
        print_json({
            "snapshot_1tib_ms": snap.value,
            "clone_1tib_ms": clone.value,
            "table_bytes_per_entry": mem.value,
            "rand4k_read_ratio": read.ratio,
            "rand4k_write_ratio": write.ratio,
            "cow_first_write_ratio": cow.ratio,
            "cow_first_write_copy_mode_ratio": cow_copy.ratio,
            "rows": [r.__dict__ for r in rows],
        })  # fmt: skip
    else:
        print_table("targetvirt engine benchmark (medians; same run, same filesystem)", rows)


if __name__ == "__main__":
    main()
