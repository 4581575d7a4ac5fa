"""LUN throughput: targetvirt vs the kernel's fileio backstore vs tcmu-runner's qcow.

Runs INSIDE the test guest, as root (it needs configfs, LIO and tcmu-runner)::

    tools/vm run -- .venv/bin/python -m bench.lun            # boot, measure, power off
    tools/vm exec -- .venv/bin/python -m bench.lun --json    # in a guest from tools/vm start

Every contender's backing store lives on the same tmpfs (``--dir``, default /run/ram/bench)
and is exported the same way (``--fabric``: a tcm_loop target, the default, or iSCSI to
127.0.0.1 through the Linux initiator).  Each LUN is filled once (so reads hit allocated
data), then fio runs 4 KiB random read and write and 1 MiB sequential read and write
(libaio, O_DIRECT, iodepth 16, ``--runtime`` seconds each), ``--rounds`` times per job
with the contenders interleaved (a busy host slows them alike); the median round counts.
The table shows IOPS and MiB/s and the ratios of each contender to fileio and to qcow;
``--json`` prints one JSON object with ``randread_vs_qcow``, ``randwrite_vs_qcow``,
``seqread_vs_qcow``, ``seqwrite_vs_qcow``, ``randread_vs_fileio``, ``randwrite_vs_fileio``
(targetvirt over the baseline; null if targetvirt is not available) beside the raw figures.

Absolute numbers from a TCG guest are an order of magnitude below real hardware: compare
only ratios from the same run.

``--cpu`` adds, per job, where the CPU went per operation in each contender's runs: every
thread's CPU time (bench/cputime.py) summed by process and thread name, the kernel's
kworkers as one group, over all rounds, each cell with its system time (the part spent in
the kernel) beside it.  Operations are estimated as fio's IOPS times the wall time
between the two readings (fio's start and ramp included), the same way for every
contender.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cputime
from bench.common import MIB, FioJob, FioResult, NotAvailable, dumps, fmt, run_fio, table
from tests.vm import lio
from tests.vm.stack import QCOW_CREATE_OPTS
from tests.vm.tvlun import Handler, create_lun

JOBS = [
    FioJob("randread", "randread", "4k", 16, "iops"),
    FioJob("randwrite", "randwrite", "4k", 16, "iops"),
    FioJob("seqread", "read", "1M", 16, "mib_s"),
    FioJob("seqwrite", "write", "1M", 16, "mib_s"),
]
CONTENDERS = ["fileio", "qcow", "targetvirt"]
BASELINES = ["fileio", "qcow"]
#: The keys the JSON output always has: targetvirt over each baseline, per job.
RATIO_KEYS = [
    "randread_vs_qcow",
    "randwrite_vs_qcow",
    "seqread_vs_qcow",
    "seqwrite_vs_qcow",
    "randread_vs_fileio",
    "randwrite_vs_fileio",
]


@dataclass
class Ctx:
    """What a contender gets: where to put files, the LUN size, a cleanup stack."""

    dir: Path
    size: int
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    log: Callable[[str], None] = print
    labels: dict[int, str] = field(default_factory=dict)  # pid -> name in --cpu tables

    def cleanup(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - report and keep tearing down
                self.log(f"cleanup: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- contenders
# Each creates a LIO storage object called ``name`` and registers its own cleanup.


def contender_fileio(ctx: Ctx, name: str) -> None:
    """The kernel's fileio backstore on a file in the tmpfs."""
    path = ctx.dir / f"{name}.img"
    lio.create_fileio(name, str(path), ctx.size, write_back=True)
    ctx.cleanups.append(lambda: path.unlink(missing_ok=True))
    ctx.cleanups.append(lambda: lio.delete_storage_object(name))


def contender_qcow(ctx: Ctx, name: str) -> None:
    """tcmu-runner's qcow handler on a (metadata-preallocated) qcow2 file in the tmpfs."""
    for tool in ("tcmu-runner", "qemu-img"):
        if shutil.which(tool) is None:
            raise NotAvailable(f"{tool} is not installed")
    ensure_tcmu_runner(ctx)
    path = ctx.dir / f"{name}.qcow2"
    # Metadata preallocation: tcmu-runner's qcow handler allocates clusters with
    # fallocate(FALLOC_FL_ZERO_RANGE), which tmpfs rejects (see tests/vm/stack.py).
    subprocess.run(
        ["qemu-img", "create", "-q", *QCOW_CREATE_OPTS, str(path), str(ctx.size)], check=True
    )
    ctx.cleanups.append(lambda: path.unlink(missing_ok=True))
    lio.create_user(name, f"qcow/{path}", ctx.size)
    ctx.cleanups.append(lambda: lio.delete_storage_object(name))


def contender_targetvirt(ctx: Ctx, name: str) -> None:
    """targetvirt-handler serving a thin vdisk whose pool container is on ctx.dir."""
    handler = Handler(ctx.dir / f"{name}-tv")
    handler.provision(name, ctx.size, pool_bytes=ctx.size + (64 << 20))
    handler.start()
    if handler.proc is not None:  # it runs as "python": name it in --cpu tables
        ctx.labels[handler.proc.pid] = "targetvirt-handler"
    ctx.cleanups.append(lambda: shutil.rmtree(handler.dir, ignore_errors=True))
    ctx.cleanups.append(lambda: ctx.log(f"targetvirt-handler exited {handler.stop()}"))
    create_lun(name, name, ctx.size)
    ctx.cleanups.append(lambda: lio.delete_storage_object(name))


CONTENDER_FNS: dict[str, Callable[[Ctx, str], None]] = {
    "fileio": contender_fileio,
    "qcow": contender_qcow,
    "targetvirt": contender_targetvirt,
}


def _tcmu_bus_owned() -> bool:
    proc = subprocess.run(
        [
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.NameHasOwner",
            "string:org.kernel.TCMUService1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "boolean true" in proc.stdout


def ensure_tcmu_runner(ctx: Ctx) -> None:
    """Start tcmu-runner (without --debug, which slows every command) unless one already
    owns its D-Bus name; stop it again at cleanup if we started it."""
    if _tcmu_bus_owned():
        return
    log = open(ctx.dir / "tcmu-runner.out", "ab")  # noqa: SIM115 - closed at cleanup
    proc = subprocess.Popen(
        ["tcmu-runner"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    end = time.monotonic() + 60
    while not _tcmu_bus_owned():
        if proc.poll() is not None or time.monotonic() > end:
            stop()
            raise NotAvailable(
                "tcmu-runner did not come up on the system bus (is dbus-daemon running?)"
            )
        time.sleep(0.3)
    ctx.cleanups.append(stop)


# --------------------------------------------------------------------------- exports


@contextlib.contextmanager
def exported(so_name: str, fabric: str) -> Iterator[str]:
    """Export the storage object and yield its /dev/sdX; remove the export after."""
    if fabric == "loopback":
        info = lio.export_loopback(so_name)
        try:
            yield str(info["dev"])
        finally:
            lio.delete_target(info["wwn"])
        return
    target = lio.iqn(f"bench-{so_name.replace('_', '-')}")
    lio.export_iscsi(target, so_name)
    portal = lio.PORTAL_IP
    try:
        subprocess.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", portal],
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "--login"],
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield lio.wait_for_disk(lambda: lio.iscsi_disk(target), 60, target)
        finally:
            subprocess.run(["iscsiadm", "-m", "node", "-T", target, "-p", portal, "--logout"],
                           check=False, capture_output=True)  # fmt: skip
            subprocess.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", target],
                           check=False, capture_output=True)  # fmt: skip
    finally:
        lio.delete_target(target)


def fill(dev: str, size: int) -> None:
    """Write the whole LUN once so reads measure allocated data, not holes."""
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={dev}", "bs=1M", f"count={size // MIB}", "oflag=direct",
         "conv=fsync", "status=none"],
        check=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- main


def prepare(name: str, args: argparse.Namespace, ctx: Ctx, stack: contextlib.ExitStack) -> str:
    """Create, export and fill one contender's LUN; returns its block device."""
    so_name = f"bench_{name}"
    stack.callback(ctx.cleanup)
    CONTENDER_FNS[name](ctx, so_name)
    dev = stack.enter_context(exported(so_name, args.fabric))
    ctx.log(f"{name}: {dev} ({args.fabric}), filling {ctx.size // MIB} MiB")
    fill(dev, ctx.size)
    return dev


def measure_all(
    names: list[str], args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[dict[str, dict[str, FioResult] | None], dict[str, str]]:
    """Every job on every contender, interleaved: job by job, round by round, contender by
    contender, so a noisy host slows all of them alike; the median round counts."""
    raw: dict[str, dict[str, FioResult] | None] = {}
    why: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        devs: dict[str, str] = {}
        labels = {os.getpid(): "bench"}  # pid -> name in --cpu tables
        for name in names:
            ctx = Ctx(dir=args.dir, size=args.size, log=log)
            try:
                devs[name] = prepare(name, args, ctx, stack)
            except NotAvailable as e:
                raw[name], why[name] = None, str(e)
                log(f"{name}: not available: {e}")
            labels.update(ctx.labels)
        runs: dict[str, dict[str, list[FioResult]]] = {n: {} for n in devs}
        for job in JOBS:
            for r in range(args.rounds):
                for name, dev in devs.items():
                    tally = None
                    if args.cpu:
                        tally = CPU.setdefault(job.name, {}).setdefault(name, cputime.Tally())
                    run = functools.partial(run_fio, dev, job, runtime=args.runtime, ramp=args.ramp)
                    res = cputime.run_counted(tally, labels, run, lambda r, sec: r.iops * sec)
                    runs[name].setdefault(job.name, []).append(res)
                    log(f"{name}: {job.name} round {r + 1}: {res.iops:,.0f} IOPS "
                        f"{res.mib_s:,.1f} MiB/s")  # fmt: skip
        for name, per_job in runs.items():
            raw[name] = {
                j: sorted(rs, key=lambda x: x.iops)[len(rs) // 2] for j, rs in per_job.items()
            }
            ROUNDS[name] = per_job
    return {n: raw[n] for n in names if n in raw}, why


#: every round's result, per contender and job (filled by measure_all)
ROUNDS: dict[str, dict[str, list[FioResult]]] = {}
#: with --cpu: per job, per contender, CPU time per operation over the rounds
CPU: dict[str, dict[str, cputime.Tally]] = {}


def round_ratio(a: str, b: str, job: FioJob) -> float | None:
    """The median over rounds of a/b measured in the same round: robust to a host whose
    load changes between rounds (each round runs the contenders back to back)."""
    ra, rb = ROUNDS.get(a, {}).get(job.name), ROUNDS.get(b, {}).get(job.name)
    if not ra or not rb:
        return None
    per = sorted(x.value(job.metric) / y.value(job.metric) for x, y in zip(ra, rb, strict=True)
                 if y.value(job.metric) > 0)  # fmt: skip
    return per[len(per) // 2] if per else None


def report(
    raw: dict[str, dict[str, FioResult] | None], why: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    def val(c: str, job: FioJob) -> float | None:
        r = raw.get(c)
        return r[job.name].value(job.metric) if r else None

    data: dict[str, Any] = {}
    for key in RATIO_KEYS:
        jobname, base = key.split("_vs_")
        job = next(j for j in JOBS if j.name == jobname)
        data[key] = round_ratio("targetvirt", base, job)
    data["ratios"] = {
        c: {f"{j.name}_vs_{b}": round_ratio(c, b, j) for b in BASELINES if b != c for j in JOBS}
        for c in raw
    }
    data["raw"] = {
        c: (
            {j: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(fr).items()}
             for j, fr in r.items()}
            if r else None
        )
        for c, r in raw.items()
    }  # fmt: skip
    data["not_available"] = why
    data["params"] = {
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "ramp_s": args.ramp,
        "size_mib": args.size // MIB,
        "fabric": args.fabric,
        "dir": str(args.dir),
        "jobs": [vars(j) for j in JOBS],
        "kernel": os.uname().release,
    }
    return data


def render(raw: dict[str, dict[str, FioResult] | None], why: dict[str, str]) -> str:
    header = ["contender"]
    for j in JOBS:
        header += [f"{j.name} IOPS", f"{j.name} MiB/s"]
    rows = []
    for c, r in raw.items():
        if r is None:
            rows.append([f"{c} *"] + ["n/a"] * (len(header) - 1))
            continue
        row = [c]
        for j in JOBS:
            row += [fmt(r[j.name].iops, 0), fmt(r[j.name].mib_s, 1)]
        rows.append(row)
    out = [table(header, rows), ""]
    rheader = ["ratio (metric)"] + [f"{j.name} ({j.metric})" for j in JOBS]
    rrows = []
    for c in raw:
        for b in BASELINES:
            if b == c:
                continue
            rrows.append([f"{c} / {b}", *(fmt(round_ratio(c, b, j), 2) for j in JOBS)])
    out.append(table(rheader, rrows))
    out.append("(ratios: median over rounds of the ratio measured within each round)")
    out += [f"* {c}: not available: {why.get(c, '?')}" for c, r in raw.items() if r is None]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.lun",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per job (median)")
    ap.add_argument("--ramp", type=int, default=2, help="fio ramp time per job (default 2)")
    ap.add_argument("--size", type=lio.parse_size, default=256 * MIB, help="LUN size (256M)")
    ap.add_argument("--dir", type=Path, default=Path("/run/ram/bench"), help="tmpfs folder")
    ap.add_argument("--fabric", choices=["loopback", "iscsi"], default="loopback")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {','.join(CONTENDERS)}")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--cpu", action="store_true",
                    help="also show CPU time per operation by process and thread")  # fmt: skip
    args = ap.parse_args(argv)

    if os.geteuid() != 0 or not Path("/sys/kernel/config/target").is_dir():
        print(
            "bench.lun: needs root and LIO (configfs target/): run it in the test guest, "
            "e.g. tools/vm run -- .venv/bin/python -m bench.lun",
            file=sys.stderr,
        )
        return 2
    names = [c for c in args.contenders.split(",") if c]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders: {sorted(unknown)}")
    args.dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"bench.lun: {msg}", file=sys.stderr, flush=True)

    raw, why = measure_all(names, args, log)
    if args.json:
        data = report(raw, why, args)
        if CPU:
            data["cpu_us_per_op"] = cputime.to_json(CPU)
        print(dumps(data))
    else:
        print(render(raw, why))
        if CPU:
            print(cputime.tables(CPU))
    return 0


if __name__ == "__main__":
    sys.exit(main())
