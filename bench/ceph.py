"""Ceph benchmark: vdisk I/O on RADOS against direct librados I/O, same cluster, same run.

Every row compares I/O through a vdisk (RADOS store, one RADOS container, 1 MiB
segments: one object per segment) with the same I/O issued straight to librados on
objects of the same size, at the same queue depth:

* through the vdisk: ``--qd`` threads, each calling ``VDisk.writev``/``readinto``
  (the data path's entry points; python-rados releases the GIL while it waits);
* direct: the faster of one thread keeping ``--qd`` asynchronous librados operations in
  flight and ``--qd`` threads of synchronous calls.

Each side's best of three rounds, the rounds interleaved (the machine may be shared).

Rows: 1 MiB sequential writes (allocated segments) and reads; 4 KiB random writes and
reads over the allocated area; the first write to fresh segments (allocation included)
for information.  Targets (issue 7): >= 0.7x direct on sequential, >= 0.5x on random.
Last, on the same cluster: the controller-command round trip to ``--agents`` agent
processes over RADOS watch/notify against the gRPC command stream (bench/notify.py).

By default the benchmark starts its own throwaway single-node cluster (bluestore on a
sparse file; ``--objectstore memstore`` for a RAM-only one), or uses an existing one
with ``--conf FILE --pool POOL [--id CLIENT]``.

``--lun`` measures the same rows through a LUN instead (bench/ceph_lun.py: fio on a
tcm_loop LUN served by targetvirt-handler; in the test guest, which has LIO).  ``--agents
0`` leaves out the round trips.

``python -m bench.ceph [--qd N] [--size MiB] [--ops N] [--agents N] [--rounds N] [--json]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import cputime
from bench.ceph_lun import CPU, bench_lun
from bench.notify import p99, round_trips
from bench.report import Row, print_json, print_table
from targetvirt.catalog import Catalog
from targetvirt.ceph import RadosLocation
from targetvirt.store.rados import RadosStore
from targetvirt.vdisk import VDisk

MiB = 1 << 20
KiB4 = 4096


@contextmanager
def cluster_location(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """(RADOS location of a fresh namespace, a connected rados.Rados) for the run."""
    import rados  # noqa: PLC0415 - python3-rados only when benchmarking Ceph

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    if args.conf:
        opts = f"?conf={args.conf}" + (f"&id={args.id}" if args.id else "")
        client = rados.Rados(conffile=args.conf, rados_id=args.id or "admin")
        client.connect()
        try:
            yield f"rados:{args.pool}/{ns}{opts}", client
        finally:
            client.shutdown()
        return
    from tests.ceph_cluster import CephCluster  # noqa: PLC0415 - a throwaway cluster

    root = None
    if args.lun:  # the guest: its tmpfs, not the host's folder mounted read-only
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        root = tempfile.mkdtemp(prefix="ceph-", dir=args.dir)
    with CephCluster(root, objectstore=args.objectstore) as cluster:
        client = cluster.connect()
        try:
            yield f"rados:{cluster.pool}/{ns}?conf={cluster.client_conf}", client
        finally:
            client.shutdown()


def run_threads(qd: int, n: int, op: Callable[[int], None]) -> float:
    """``op(i)`` for i in range(n) on ``qd`` threads; returns seconds."""
    counter = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            op(i)

    threads = [threading.Thread(target=worker) for _ in range(qd)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_aio(qd: int, n: int, submit: Callable[[int, Callable[..., None]], Any]) -> float:
    """``submit(i, callback)`` for i in range(n), ``qd`` in flight; returns seconds."""
    window = threading.Semaphore(qd)
    errors: list[int] = []

    def done(completion: Any, *_: Any) -> None:
        if completion.get_return_value() < 0:
            errors.append(completion.get_return_value())
        window.release()

    t0 = time.perf_counter()
    for i in range(n):
        window.acquire()
        submit(i, done)
    for _ in range(qd):
        window.acquire()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"librados errors: {errors[:3]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qd", type=int, default=16, help="operations in flight")
    parser.add_argument("--size", type=int, default=256, help="MiB of vdisk / objects")
    parser.add_argument("--ops", type=int, default=4000, help="4 KiB operations per row")
    parser.add_argument("--agents", type=int, default=3, help="agent processes (round trip)")
    parser.add_argument("--rounds", type=int, default=300, help="command round trips")
    parser.add_argument("--objectstore", default="bluestore", choices=["bluestore", "memstore"])
    parser.add_argument("--conf", help="an existing cluster's ceph.conf")
    parser.add_argument("--pool", default="tv")
    parser.add_argument("--id", help="cephx user (without client.)")
    parser.add_argument(
        "--lun", action="store_true",
        help="measure through a targetvirt LUN (tcm_loop, fio) instead of the vdisk API; "
        "needs LIO: run it in the test guest (bench/ceph_lun.py)",
    )  # fmt: skip
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job (--lun)")
    parser.add_argument("--io-rounds", type=int, default=3, help="interleaved rounds (--lun)")
    parser.add_argument("--dir", default="/run/ram/bench-ceph", help="scratch folder (--lun)")
    parser.add_argument(
        "--workers", type=int, default=16, help="the handler's --network-workers (--lun)"
    )
    parser.add_argument(
        "--cpu", action="store_true",
        help="with --lun: also show CPU time per operation by process and thread, each side",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cpu and not args.lun:
        parser.error("--cpu needs --lun")
    with cluster_location(args) as (location, client):
        rows = (bench_lun if args.lun else bench)(location, client, args)
        if args.agents > 0:
            rows += bench_commands(location, args.agents, args.rounds)
    if args.json:
        by = {r.name: r for r in rows}
        rtt = by.get("command round trip, median"), by.get("command round trip, p99")
        seq = min(by["1 MiB sequential write"].ratio or 0, by["1 MiB sequential read"].ratio or 0)
        rand = min(by["4 KiB random write"].ratio or 0, by["4 KiB random read"].ratio or 0)
        figures: dict[str, object] = {
            "seq_vs_librados": seq,
            "rand_vs_librados": rand,
            "notify_rtt_median_ms": rtt[0].value if rtt[0] else None,
            "notify_rtt_p99_ms": rtt[1].value if rtt[1] else None,
            "through": "LUN (tcm_loop, fio)" if args.lun else "vdisk API",
            "rows": [r.__dict__ for r in rows],
        }  # fmt: skip
        if CPU:
            figures["cpu_us_per_op"] = cputime.to_json(CPU)
        print_json(figures)
    else:
        print_table(
            f"targetvirt on Ceph: {'LUN' if args.lun else 'vdisk'} vs direct librados "
            f"(qd {args.qd}, 1 MiB objects, same run, same cluster)",
            rows,
        )
        if CPU:
            print(cputime.tables(CPU))


def bench(location: str, client: Any, args: argparse.Namespace) -> list[Row]:
    qd, nseg, ops = args.qd, args.size, args.ops
    catalog = Catalog.open(RadosStore(location, create=True))
    rows: list[Row] = []
    try:
        catalog.create_pool("bench", location, 2 * nseg * MiB, segment_size=MiB)
        v = catalog.create_vdisk("v", "bench", nseg * MiB)
        loc = RadosLocation.parse(location)
        ioctx = client.open_ioctx(loc.pool)
        ioctx.set_namespace(loc.namespace)
        rows += bench_sequential(v, ioctx, qd, nseg)
        catalog.commit()
        rows += bench_random(v, ioctx, qd, nseg, ops)
        ioctx.close()
    finally:
        catalog.close()
    return rows


def bench_commands(location: str, agents: int, rounds: int) -> list[Row]:
    """Controller command round trips (ms) to ``agents`` processes: watch/notify on this
    cluster (its own namespace) against the gRPC stream, same run."""
    where, _, opts = location.partition("?")
    notify_location = f"{where}-notify" + (f"?{opts}" if opts else "")
    with tempfile.TemporaryDirectory() as tmp:
        notify = [t * 1000 for t in round_trips(Path(tmp), notify_location, agents, rounds)]
        grpc = [t * 1000 for t in round_trips(Path(tmp), None, agents, rounds)]
    return [
        Row(f"command round trip, {name}", fn(notify), "ms", f"gRPC stream, {agents} agents",
            fn(grpc), fn(notify) / fn(grpc))
        for name, fn in (("median", statistics.median), ("p99", p99))
    ]  # fmt: skip


def compare(
    qd: int,
    n: int,
    ours: Callable[[int], None],
    aio: Callable[[int, Callable[..., None]], Any],
    sync: Callable[[int], None],
    rounds: int = 3,
) -> tuple[float, float, str]:
    """Best times of ours and of direct librados (aio or threads), rounds interleaved.

    The machine may be shared: interleaving lets a slow spell hit every side alike, and
    the best of a few rounds is what each side can do.
    """
    t_ours, t_aio, t_sync = [], [], []
    for _ in range(rounds):
        t_ours.append(run_threads(qd, n, ours))
        t_aio.append(run_aio(qd, n, aio))
        t_sync.append(run_threads(qd, n, sync))
    direct, how = min((min(t_aio), "aio"), (min(t_sync), f"{qd} threads"))
    return min(t_ours), direct, how


def bench_sequential(v: VDisk, ioctx: Any, qd: int, nseg: int) -> list[Row]:
    chunk = random.Random(1).randbytes(MiB)
    local = threading.local()

    def our_write(i: int) -> None:
        v.writev(i * MiB, [chunk])

    def our_read(i: int) -> None:
        b = getattr(local, "buf", None)
        if b is None:
            b = local.buf = [bytearray(MiB)]
        v.readinto(i * MiB, b)

    names = [f"direct.{i:012x}" for i in range(nseg)]
    first = run_threads(qd, nseg, our_write)  # allocates: zero (remove) + write per segment
    ours_w, direct_w, how_w = compare(
        qd, nseg, our_write,
        lambda i, cb: ioctx.aio_write_full(names[i], chunk, oncomplete=cb),
        lambda i: ioctx.write_full(names[i], chunk),
    )  # fmt: skip
    ours_r, direct_r, how_r = compare(
        qd, nseg, our_read,
        lambda i, cb: ioctx.aio_read(names[i], MiB, 0, cb),
        lambda i: ioctx.read(names[i], MiB, 0),
    )  # fmt: skip
    mibs = float(nseg)
    return [
        Row("1 MiB sequential write", mibs / ours_w, "MiB/s", f"librados write_full ({how_w})",
            mibs / direct_w, direct_w / ours_w, ">= 0.7"),
        Row("1 MiB sequential read", mibs / ours_r, "MiB/s", f"librados read ({how_r})",
            mibs / direct_r, direct_r / ours_r, ">= 0.7"),
        Row("1 MiB first write (allocating)", mibs / first, "MiB/s",
            f"librados write_full ({how_w})", mibs / direct_w, direct_w / first,
            "(informational)"),
    ]  # fmt: skip


def bench_random(v: VDisk, ioctx: Any, qd: int, nseg: int, ops: int) -> list[Row]:
    rng = random.Random(2)
    offsets = [rng.randrange(nseg * MiB // KiB4) * KiB4 for _ in range(ops)]
    objs = [f"direct.{o // MiB:012x}" for o in offsets]
    data = random.Random(3).randbytes(KiB4)
    mv = memoryview(data)
    local = threading.local()

    def our_write(i: int) -> None:
        v.writev(offsets[i], [mv])

    def our_read(i: int) -> None:
        b = getattr(local, "buf", None)
        if b is None:
            b = local.buf = [bytearray(KiB4)]
        v.readinto(offsets[i], b)

    rows = []
    for name, ours, aio, sync in (
        ("write", our_write,
         lambda i, cb: ioctx.aio_write(objs[i], data, offsets[i] % MiB, oncomplete=cb),
         lambda i: ioctx.write(objs[i], data, offsets[i] % MiB)),
        ("read", our_read,
         lambda i, cb: ioctx.aio_read(objs[i], KiB4, offsets[i] % MiB, cb),
         lambda i: ioctx.read(objs[i], KiB4, offsets[i] % MiB)),
    ):  # fmt: skip
        t_ours, t_direct, how = compare(qd, ops, ours, aio, sync)
        rows.append(
            Row(f"4 KiB random {name}", ops / t_ours, "IOPS", f"librados {name} ({how})",
                ops / t_direct, t_direct / t_ours, ">= 0.5")
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
