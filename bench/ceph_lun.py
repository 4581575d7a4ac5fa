"""``bench.ceph --lun``: the Ceph rows measured through a LUN, in the test guest.

The vdisk lives on the cluster (RADOS container, 1 MiB segments, one object each) and is
served by ``targetvirt-handler`` (the default single-host daemon; its catalog on SQLite)
as a tcm_loop LUN; fio (libaio, O_DIRECT, ``--qd`` in flight) measures through the
kernel's block layer, LIO, TCMU and the Python handler.  The baseline is the same as in
``bench.ceph``: direct librados on objects of the same size at the same queue depth, on
the same cluster, the rounds interleaved, each side's best round.

Needs LIO (configfs, tcm_loop, target_core_user): run it in the guest::

    tools/vm run -- .venv/bin/python -m bench.ceph --lun --size 128
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cputime
from bench.common import FioJob, run_fio
from bench.report import Row

MiB = 1 << 20
KiB4 = 4096
SO_NAME = "bench_ceph"


def best_rates(
    ours: Callable[[], float],
    n: int,
    aio: Callable[[int, Callable[..., None]], Any],
    sync: Callable[[int], None],
    qd: int,
    rounds: int,
    cpu: dict[str, cputime.Tally] | None = None,
) -> tuple[float, float, str]:
    """(our best rate, direct librados's best rate in operations/s, how), interleaved.
    With ``cpu`` (``--cpu``), each side's CPU per operation is added to ``cpu[side]``."""
    from bench.ceph import run_aio, run_threads  # noqa: PLC0415 - bench.ceph imports us

    def counted(side: str, run: Callable[[], float], ops: Callable[[float, float], float]) -> float:
        tally = None if cpu is None else cpu.setdefault(side, cputime.Tally())
        return cputime.run_counted(tally, LABELS, run, ops)

    def n_ops(_seconds: float, _elapsed: float) -> float:
        return n

    r_ours, t_aio, t_sync = [], [], []
    for _ in range(rounds):
        r_ours.append(counted("LUN", ours, lambda rate, elapsed: rate * elapsed))
        t_aio.append(counted("librados aio", lambda: run_aio(qd, n, aio), n_ops))
        t_sync.append(counted(f"librados {qd} threads", lambda: run_threads(qd, n, sync), n_ops))
    direct, how = min((min(t_aio), "aio"), (min(t_sync), f"{qd} threads"))
    return max(r_ours), n / direct, how


#: with --cpu: per row, per side, CPU per operation over the rounds
CPU: dict[str, dict[str, cputime.Tally]] = {}
#: pid -> name in the --cpu tables (the handler and this process both run as "python")
LABELS: dict[int, str] = {os.getpid(): "bench"}


class Lun:
    """The vdisk exported by a targetvirt-handler of its own, as a local /dev/sdX."""

    def __init__(self, location: str, size: int, where: Path, workers: int) -> None:
        from tests.vm import lio  # noqa: PLC0415 - guest only (configfs)
        from tests.vm.tvlun import Handler, create_lun  # noqa: PLC0415

        self.lio = lio
        self.handler = Handler(where / "tv")
        cat = self.handler.catalog()
        try:
            cat.create_pool("bench", location, 2 * size, segment_size=MiB)
            cat.create_vdisk("v", "bench", size)
        finally:
            cat.close()
        self.handler.start("--no-dbus", "--network-workers", str(workers), timeout=300)
        if self.handler.proc is not None:
            LABELS[self.handler.proc.pid] = "targetvirt-handler"
        create_lun(SO_NAME, "v", size)
        self.dev = str(lio.export_loopback(SO_NAME)["dev"])

    def close(self) -> None:
        try:
            self.lio.clear()
        finally:
            self.handler.stop()
            shutil.rmtree(self.handler.dir, ignore_errors=True)


def fio_rate(dev: str, job: FioJob, runtime: int, size: int) -> float:
    """Operations per second of one time-based fio job."""
    return run_fio(dev, job, runtime=runtime, ramp=1, size=f"{size // MiB}M").iops


def first_write(dev: str, size: int) -> float:
    """MiB/s of writing the whole LUN once with 1 MiB writes (allocates every segment)."""
    t0 = time.perf_counter()
    subprocess.run(
        ["fio", "--name=fill", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
         "--rw=write", "--bs=1M", "--iodepth=16", f"--size={size // MiB}M",
         "--output-format=terse"],
        check=True, capture_output=True,
    )  # fmt: skip
    return size / MiB / (time.perf_counter() - t0)


def bench_lun(location: str, client: Any, args: argparse.Namespace) -> list[Row]:
    from targetvirt.ceph import RadosLocation  # noqa: PLC0415

    nseg, size = args.size, args.size * MiB
    loc = RadosLocation.parse(location)
    ioctx = client.open_ioctx(loc.pool)
    ioctx.set_namespace(loc.namespace)
    lun = Lun(location, size, Path(args.dir), args.workers)
    try:
        first = first_write(lun.dev, size)
        rows = sequential(lun.dev, ioctx, args, nseg)
        rows.append(Row("1 MiB first write (allocating)", first, "MiB/s", "",
                        None, None, "(informational)"))  # fmt: skip
        rows += rand(lun.dev, ioctx, args, nseg)
        return rows
    finally:
        lun.close()
        ioctx.close()


def sequential(dev: str, ioctx: Any, args: argparse.Namespace, nseg: int) -> list[Row]:
    qd, runtime = args.qd, args.runtime
    chunk = random.Random(1).randbytes(MiB)
    names = [f"direct.{i:012x}" for i in range(nseg)]
    rows = []
    for name, rw, aio, sync in (
        ("write", "write",
         lambda i, cb: ioctx.aio_write_full(names[i], chunk, oncomplete=cb),
         lambda i: ioctx.write_full(names[i], chunk)),
        ("read", "read",
         lambda i, cb: ioctx.aio_read(names[i], MiB, 0, cb),
         lambda i: ioctx.read(names[i], MiB, 0)),
    ):  # fmt: skip
        job, row = FioJob(f"seq{name}", rw, "1M", qd, "mib_s"), f"1 MiB sequential {name}"
        ours, direct, how = best_rates(
            lambda job=job: fio_rate(dev, job, runtime, nseg * MiB),  # type: ignore[misc]
            nseg, aio, sync, qd, args.io_rounds, CPU.setdefault(row, {}) if args.cpu else None,
        )  # fmt: skip
        rows.append(Row(row, ours, "MiB/s",
                        f"librados {name} ({how})", direct, ours / direct, ">= 0.7"))  # fmt: skip
    return rows


def rand(dev: str, ioctx: Any, args: argparse.Namespace, nseg: int) -> list[Row]:
    qd, ops, runtime = args.qd, args.ops, args.runtime
    rng = random.Random(2)
    offsets = [rng.randrange(nseg * MiB // KiB4) * KiB4 for _ in range(ops)]
    objs = [f"direct.{o // MiB:012x}" for o in offsets]
    data = random.Random(3).randbytes(KiB4)
    rows = []
    for name, rw, aio, sync in (
        ("write", "randwrite",
         lambda i, cb: ioctx.aio_write(objs[i], data, offsets[i] % MiB, oncomplete=cb),
         lambda i: ioctx.write(objs[i], data, offsets[i] % MiB)),
        ("read", "randread",
         lambda i, cb: ioctx.aio_read(objs[i], KiB4, offsets[i] % MiB, cb),
         lambda i: ioctx.read(objs[i], KiB4, offsets[i] % MiB)),
    ):  # fmt: skip
        job, row = FioJob(rw, rw, "4k", qd, "iops"), f"4 KiB random {name}"
        ours, direct, how = best_rates(
            lambda job=job: fio_rate(dev, job, runtime, nseg * MiB),  # type: ignore[misc]
            ops, aio, sync, qd, args.io_rounds, CPU.setdefault(row, {}) if args.cpu else None,
        )  # fmt: skip
        rows.append(Row(row, ours, "IOPS", f"librados {name} ({how})",
                        direct, ours / direct, ">= 0.5"))  # fmt: skip
    return rows
