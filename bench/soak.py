"""Soak: fio random read/write with verification for a long time while snapshots are taken
and deleted every few seconds and a clone is flattened; IOPS, the daemon's memory and
errors over time, as a table, a summary, a PNG plot and ``--json``.

Runs INSIDE the test guest, as root (it needs configfs, LIO and the system bus)::

    tools/vm start                                     # prints the guest's workdir W
    tools/vm exec -- .venv/bin/python -m bench.soak --plot W/results/soak.png   # 30 min
    tools/vm stop

(the checkout is read-only in the guest; ``W/results`` is shared read-write.)  A CI test
runs a short version (tests/vm/test_soak.py).

The stack: ``targetvirt-handler`` (the real daemon, on the system bus) serves a thin
vdisk (pool container on ``--dir``, a tmpfs by default) as a LIO user backstore,
exported through tcm_loop (``--fabric loopback``, the default) or iSCSI to 127.0.0.1.
fio runs ``randrw`` on the whole LUN (libaio, O_DIRECT) for ``--duration`` seconds with
``--verify=crc32c --verify_backlog``: written blocks are read back and checked while the
run goes on, and ``--continue_on_error=all`` counts every error instead of stopping at
the first.  Meanwhile, through the daemon's management API (``--via api``, what the
shell calls) or the ``targetvirt`` shell itself (``--via shell``):

- every ``--interval`` seconds a snapshot ``<vdisk>@sNNNN``; the oldest are deleted so
  that ``--keep`` remain;
- once, a quarter into the run, a clone of the live vdisk is made and flattened (it is
  not exported: the flatten copies every shared segment while the source is written);
- at the end, the metadata checker (``check``) must find the catalog clean.

Every second (fio's ``--status-interval``) one sample: read and write IOPS, fio's error
count, and the daemon's VmRSS, threads and open files from ``/proc``.  The table groups
samples in time buckets; the summary compares the median RSS of a window after warm-up
with that of the last window and fits a trend.  Errors are fio errors (I/O or verify),
failed management operations, the daemon exiting, and a dirty check.  The exit code is
1 when there was any error, 0 otherwise.  Figures from a TCG guest are low and noisy:
nothing here judges speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from bench.common import MIB, dumps, fmt, table

FIO_GRACE = 300.0  # seconds fio may take past its runtime (draining under TCG) before a kill
JOB_POLL = 0.5  # seconds between two looks at a running job
OP_TIMEOUT = 1800.0  # seconds one management operation may take before it counts as failed


# --------------------------------------------------------------------------- records


@dataclass
class Sample:
    """One second of the run: ``t`` seconds since fio started."""

    t: float
    read_iops: float
    write_iops: float
    fio_errors: int  # cumulative, as fio counts them
    rss_mib: float | None  # None once the daemon is gone
    threads: int | None
    fds: int | None

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops


@dataclass
class Event:
    """One management operation: what, on what, when, how long, and how it ended."""

    t: float
    op: str
    name: str
    ok: bool
    seconds: float
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class FioCounters:
    """What one fio status document says, summed over its jobs (one here)."""

    ms: int
    reads: int
    writes: int
    errors: int


# --------------------------------------------------------------------------- fio


def fio_argv(dev: str, args: argparse.Namespace) -> list[str]:
    fio = shutil.which("fio")
    if fio is None:
        raise RuntimeError("fio is not installed")
    return [
        fio, "--name=soak", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
        "--rw=randrw", f"--rwmixread={args.rwmixread}", f"--bs={args.bs}",
        f"--iodepth={args.iodepth}", "--numjobs=1", "--time_based",
        f"--runtime={args.duration}", "--randrepeat=0",
        # written blocks are read back and checked during the run, not only at its end
        "--verify=crc32c", f"--verify_backlog={args.verify_backlog}",
        # count every error and keep going: a soak reports them all
        "--continue_on_error=all",
        # on a failure fio would save its verify state into the (read-only) cwd
        "--verify_state_save=0",
        "--status-interval=1", "--output-format=json",
    ]  # fmt: skip


def fio_docs(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON documents fio prints (one per status interval, then the final one).

    fio pretty-prints each: it opens with ``{`` and closes with ``}`` at column 0, and
    nothing nested starts at column 0.  Other lines (warnings) are skipped."""
    buf: list[str] = []
    for line in lines:
        if line.startswith("{"):
            buf = []
        if line.startswith("{") or buf:
            buf.append(line)
        if buf and line.startswith("}"):
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads("".join(buf))
            buf = []


def fio_counters(doc: dict[str, Any]) -> FioCounters:
    jobs = doc.get("jobs") or []
    return FioCounters(
        ms=int(doc.get("timestamp_ms", 0)),
        reads=sum(int(j.get("read", {}).get("total_ios", 0)) for j in jobs),
        writes=sum(int(j.get("write", {}).get("total_ios", 0)) for j in jobs),
        # total_err counts every error under continue_on_error; error is the first one
        errors=sum(max(int(j.get("total_err", 0)), 1 if j.get("error") else 0) for j in jobs),
    )


def verify_failures(stderr: str) -> list[str]:
    """fio's lines about blocks that failed verification ("verify: bad magic ...")."""
    return [line for line in stderr.splitlines() if line.startswith("verify:")]


# --------------------------------------------------------------------------- the daemon


@dataclass
class ProcMem:
    rss_mib: float
    threads: int
    fds: int


def proc_mem(pid: int) -> ProcMem | None:
    """The process's resident memory, threads and open files; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie has no memory left
        return None
    return ProcMem(
        rss_mib=int(fields["VmRSS"].split()[0]) / 1024.0,
        threads=int(fields["Threads"].strip()),
        fds=fds,
    )


# --------------------------------------------------------------------------- operations


class OpFailed(Exception):
    """A management operation failed (the message is the daemon's or the shell's line)."""


class Ops(Protocol):
    """The management operations the churn needs; each blocks until done."""

    def snapshot(self, vdisk: str, snap: str) -> dict[str, Any]: ...
    def delete(self, name: str) -> dict[str, Any]: ...
    def clone(self, source: str, name: str) -> dict[str, Any]: ...
    def flatten(self, vdisk: str) -> dict[str, Any]: ...
    def check(self) -> dict[str, Any]: ...


class ApiOps:
    """Through ``org.targetvirt.Manager1`` on the system bus (one connection per thread:
    several threads call at once)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            from targetvirt.manage.client import ManagerClient  # noqa: PLC0415 - needs dbus

            client = self._local.client = ManagerClient()
        return client

    def _call(self, method: str, *args: Any) -> dict[str, Any]:
        from targetvirt.errors import TargetvirtError  # noqa: PLC0415

        try:
            result = getattr(self._client(), method)(*args)
            return self._wait(result) if "state" in result and "id" in result else dict(result)
        except TargetvirtError as e:
            raise OpFailed(str(e)) from None

    def _wait(self, job: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + OP_TIMEOUT
        while job["state"] == "running":
            if time.monotonic() > deadline:
                raise OpFailed(f"job {job['id']} ({job['kind']}) still running after "
                               f"{OP_TIMEOUT:.0f} s")  # fmt: skip
            time.sleep(JOB_POLL)
            job = self._client().job(job["id"])
        if job["state"] != "done":
            raise OpFailed(job.get("error") or f"job {job['id']} {job['state']}")
        result = job.get("result")
        return dict(result) if isinstance(result, dict) else {"message": str(result)}

    def snapshot(self, vdisk: str, snap: str) -> dict[str, Any]:
        return self._call("snapshot", vdisk, snap)

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("delete_vdisk", name)

    def clone(self, source: str, name: str) -> dict[str, Any]:
        return self._call("clone", source, name)

    def flatten(self, vdisk: str) -> dict[str, Any]:
        return self._call("flatten", vdisk)

    def check(self) -> dict[str, Any]:
        return self._call("check")


class ShellOps:
    """Through the ``targetvirt`` shell's one-shot form, as an administrator types it."""

    def _run(self, *words: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "targetvirt.manage.shell", *words]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=OP_TIMEOUT,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise OpFailed(
                f"targetvirt {' '.join(words)}: no answer in {OP_TIMEOUT:.0f} s"
            ) from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
            raise OpFailed(lines[-1])
        return {"message": proc.stdout.strip()}

    def snapshot(self, vdisk: str, snap: str) -> dict[str, Any]:
        return self._run(f"/vdisks/{vdisk}", "snapshot", f"name={snap}")

    def delete(self, name: str) -> dict[str, Any]:
        return self._run("/vdisks", "delete", f"name={name}")

    def clone(self, source: str, name: str) -> dict[str, Any]:
        return self._run(f"/vdisks/{source}", "clone", f"name={name}")

    def flatten(self, vdisk: str) -> dict[str, Any]:
        return self._run(f"/vdisks/{vdisk}", "flatten")

    def check(self) -> dict[str, Any]:
        out = self._run("check")
        # the shell exits 1 on a dirty catalog; a clean one ends with "clean"
        return {**out, "clean": out["message"].endswith("clean")}


# --------------------------------------------------------------------------- the churn


class Churn:
    """Snapshots and deletes on one thread, the clone and its flatten on another, so a
    long flatten runs while snapshots go on; every operation becomes an :class:`Event`."""

    def __init__(self, ops: Ops, vdisk: str, args: argparse.Namespace, t0: float,
                 log: Callable[[str], None]) -> None:  # fmt: skip
        self.ops, self.vdisk, self.args, self.t0, self.log = ops, vdisk, args, t0, log
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._snapshots, name="snapshots", daemon=True),
            threading.Thread(target=self._flatten, name="flatten", daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Let the running operations finish (they hold the vdisk), then return."""
        self.stopping.set()
        for t in self.threads:
            t.join()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def op(self, kind: str, name: str, fn: Callable[[], dict[str, Any]]) -> Event:
        t = self.now()
        try:
            detail = fn()
            ev = Event(t, kind, name, True, self.now() - t, detail=detail)
        except Exception as e:  # noqa: BLE001 - any failure is a soak error to count, not a crash
            ev = Event(t, kind, name, False, self.now() - t, f"{type(e).__name__}: {e}")
            self.log(f"{kind} {name} failed: {ev.error}")
        with self.lock:
            self.events.append(ev)
        return ev

    def _snapshots(self) -> None:
        kept: deque[str] = deque()
        n = 0
        while not self.stopping.wait(max(0.0, n * self.args.interval - self.now())):
            n += 1
            snap = f"s{n:04d}"
            name = f"{self.vdisk}@{snap}"
            if self.op("snapshot", name, partial(self.ops.snapshot, self.vdisk, snap)).ok:
                kept.append(name)
            while len(kept) > self.args.keep and not self.stopping.is_set():
                old = kept.popleft()
                self.op("delete", old, partial(self.ops.delete, old))

    def _flatten(self) -> None:
        if self.stopping.wait(self.args.duration / 4):
            return
        clone = f"{self.vdisk}-clone"
        if self.op("clone", clone, partial(self.ops.clone, self.vdisk, clone)).ok:
            self.op("flatten", clone, partial(self.ops.flatten, clone))


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything one soak produced."""

    samples: list[Sample]
    events: list[Event]
    fio_rc: int | None
    fio_final: FioCounters | None
    verify_failures: list[str]
    daemon_exited: bool
    check: Event | None
    notes: list[str] = field(default_factory=list)

    def all_events(self) -> list[Event]:
        return [*self.events, *([self.check] if self.check else [])]

    def check_clean(self) -> bool:
        return bool(self.check and self.check.ok and self.check.detail.get("clean"))


def sample_loop(
    proc: subprocess.Popen[str], pid: int, t0: float, max_errors: int, log: Callable[[str], None]
) -> tuple[list[Sample], FioCounters | None, bool]:
    """One sample per fio status document until fio ends; stops fio if the daemon exits
    or fio has counted more than ``max_errors`` (a dead LUN fails I/O as fast as fio
    issues it, each with a line on stderr).  Returns the samples, fio's last counters
    and whether the daemon exited."""
    assert proc.stdout is not None
    samples: list[Sample] = []
    prev: FioCounters | None = None
    gone = False
    for doc in fio_docs(proc.stdout):
        cur = fio_counters(doc)
        mem = proc_mem(pid)
        if prev is not None and cur.ms > prev.ms:
            dt = (cur.ms - prev.ms) / 1000.0
            samples.append(Sample(
                t=round(time.monotonic() - t0, 2),
                read_iops=(cur.reads - prev.reads) / dt, write_iops=(cur.writes - prev.writes) / dt,
                fio_errors=cur.errors, rss_mib=mem.rss_mib if mem else None,
                threads=mem.threads if mem else None, fds=mem.fds if mem else None,
            ))  # fmt: skip
            progress(samples, log)
        if cur.errors > max_errors >= prev_errors(prev):
            log(f"fio counted {cur.errors} errors: stopping it")
            proc.terminate()
        prev = cur
        if mem is None and not gone:
            gone = True
            log("targetvirt-handler exited: stopping fio")
            proc.terminate()
    return samples, prev, gone


def prev_errors(prev: FioCounters | None) -> int:
    return prev.errors if prev else 0


def progress(samples: list[Sample], log: Callable[[str], None], every: int = 30) -> None:
    if len(samples) % every:
        return
    last = samples[-every:]
    rss = samples[-1].rss_mib
    log(f"t={samples[-1].t:.0f}s IOPS {statistics.median(s.iops for s in last):,.0f} "
        f"RSS {fmt(rss)} MiB fio errors {samples[-1].fio_errors}")  # fmt: skip


def run_fio(dev: str, args: argparse.Namespace, pid: int, churn_for: Callable[[float], Churn],
            log: Callable[[str], None]) -> tuple[Run, Churn]:  # fmt: skip
    """fio on ``dev`` with the churn alongside; both stopped and accounted for on return."""
    stderr_path = args.dir / "fio.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(fio_argv(dev, args), stdout=subprocess.PIPE, stderr=err,
                                text=True)  # fmt: skip
    t0 = time.monotonic()
    churn = churn_for(t0)
    churn.start()
    # a LUN that hangs would keep fio waiting for its I/O for ever
    watchdog = threading.Timer(args.duration + FIO_GRACE, proc.kill)
    watchdog.start()
    try:
        samples, final, gone = sample_loop(proc, pid, t0, args.max_errors, log)
        rc = proc.wait()
    finally:
        watchdog.cancel()
        churn.stop()
    run = Run(samples, list(churn.events), rc, final, verify_failures(stderr_path.read_text()),
              gone, None)  # fmt: skip
    if rc != 0:
        tail = stderr_path.read_text().strip().splitlines()[-3:]
        run.notes.append(f"fio exited {rc}: {' / '.join(tail)}")
    return run, churn


# --------------------------------------------------------------------------- analysis


def windows(duration: float, warmup: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first window (after warm-up) and the last one, each a tenth of the run (at
    least 10 s); warm-up shrinks to a fifth of a short run."""
    width = max(10.0, duration / 10)
    start = min(warmup, duration / 5)
    return (start, start + width), (max(start, duration - width), duration + 1e9)


def in_window(samples: Sequence[Sample], w: tuple[float, float]) -> list[Sample]:
    return [s for s in samples if w[0] <= s.t < w[1]]


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def trend_per_hour(samples: Sequence[Sample], start: float) -> float | None:
    """Least-squares slope of RSS over time after warm-up, in MiB per hour."""
    pts = [(s.t, s.rss_mib) for s in samples if s.t >= start and s.rss_mib is not None]
    if len(pts) < 3 or len({t for t, _ in pts}) < 2:
        return None
    fit = statistics.linear_regression([t for t, _ in pts], [r for _, r in pts])
    return fit.slope * 3600.0


def op_stats(events: Sequence[Event]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in ("snapshot", "delete", "clone", "flatten", "check"):
        evs = [e for e in events if e.op == kind]
        secs = [e.seconds for e in evs if e.ok]
        out[kind] = {
            "ok": len(secs),
            "failed": len(evs) - len(secs),
            "median_s": round(statistics.median(secs), 3) if secs else None,
            "max_s": round(max(secs), 3) if secs else None,
        }
    return out


def rnd(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


def count_errors(run: Run) -> dict[str, int]:
    fio_errors = run.fio_final.errors if run.fio_final else 0
    errors = {
        "fio": fio_errors,  # I/O and verify errors: fio counts both
        "verify": len(run.verify_failures),  # (part of "fio", not added again)
        # fio failing without counting an error (killed, a bad option) is one more
        "fio_exit": int(run.fio_rc != 0 and fio_errors == 0),
        "ops": sum(not e.ok for e in run.all_events()),
        "daemon_exited": int(run.daemon_exited),
        "check_not_clean": int(not run.check_clean()),
    }
    errors["total"] = sum(v for k, v in errors.items() if k != "verify")
    return errors


def verify_info(run: Run, rwmixread: int) -> dict[str, Any]:
    fin = run.fio_final or FioCounters(0, 0, 0, 0)
    # fio counts the verify reads as reads: with rwmixread=R the workload's own reads
    # are about writes*R/(100-R), the rest are blocks read back and checked
    workload_reads = fin.writes * rwmixread / max(1, 100 - rwmixread)
    return {
        "method": "crc32c",
        "passed": not run.verify_failures and fin.errors == 0 and run.fio_rc == 0,
        "reads_estimated": max(0, round(fin.reads - workload_reads)),
    }


def iops_info(run: Run, first: list[Sample], last: list[Sample]) -> dict[str, Any]:
    fin = run.fio_final or FioCounters(0, 0, 0, 0)
    every = [s.iops for s in run.samples]
    a, b = median(s.iops for s in first), median(s.iops for s in last)
    return {
        "median": rnd(median(every), 0),
        "first_window": rnd(a, 0),
        "last_window": rnd(b, 0),
        # the run's own start is the baseline: does a long run slow down?
        "last_vs_first": rnd(b / a, 3) if a and b else None,
        "min": rnd(min(every, default=None), 0),
        "max": rnd(max(every, default=None), 0),
        "reads": fin.reads,
        "writes": fin.writes,
    }


def rss_info(run: Run, first: list[Sample], last: list[Sample], start: float) -> dict[str, Any]:
    a, b = median(s.rss_mib for s in first), median(s.rss_mib for s in last)
    return {
        "first": rnd(a),
        "last": rnd(b),
        "max": rnd(max((s.rss_mib for s in run.samples if s.rss_mib is not None), default=None)),
        "growth": rnd(b - a) if a and b else None,
        "ratio": rnd(b / a, 3) if a and b else None,
        "trend_per_hour": rnd(trend_per_hour(run.samples, start)),
    }


def first_last(first: list[Sample], last: list[Sample], key: str) -> dict[str, float | None]:
    return {
        "first": rnd(median(getattr(s, key) for s in first), 0),
        "last": rnd(median(getattr(s, key) for s in last), 0),
    }


def summarize(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    first_w, last_w = windows(args.duration, args.warmup)
    first, last = in_window(run.samples, first_w), in_window(run.samples, last_w)
    failed = [f"{e.op} {e.name}: {e.error}" for e in run.all_events() if not e.ok]
    flatten = next((e for e in run.events if e.op == "flatten" and e.ok), None)
    return {
        "errors": count_errors(run),
        "error_messages": [*failed, *run.verify_failures[:10], *run.notes][:30],
        "verify": verify_info(run, args.rwmixread),
        "ops": op_stats(run.all_events()),
        "flatten": None
        if flatten is None
        else {"copied": flatten.detail.get("copied"), "seconds": rnd(flatten.seconds)},
        "check_clean": run.check_clean(),
        "iops": iops_info(run, first, last),
        "rss_mib": rss_info(run, first, last, first_w[0]),
        "fds": first_last(first, last, "fds"),
        "threads": first_last(first, last, "threads"),
        "windows": {"first": list(first_w), "last": [last_w[0], float(args.duration)]},
        "samples_n": len(run.samples),
    }


def buckets(run: Run, width: float) -> list[list[str]]:
    """Table rows: per time bucket the IOPS median and minimum, RSS, operations, errors."""
    rows = []
    end = max([s.t for s in run.samples] + [e.t for e in run.events] + [0.0])
    lo, prev_err = 0.0, 0
    while lo <= end:
        hi = lo + width
        ss = [s for s in run.samples if lo <= s.t < hi]
        evs = [e for e in run.events if lo <= e.t < hi]
        err = ss[-1].fio_errors if ss else prev_err
        n_err = err - prev_err + sum(not e.ok for e in evs)
        prev_err = err
        ops = "".join(f" {k[0]}{n}" for k in ("snapshot", "delete", "clone", "flatten")
                      if (n := sum(e.op == k and e.ok for e in evs)))  # fmt: skip
        rows.append([
            f"{lo:.0f}-{hi:.0f}", fmt(median(s.iops for s in ss), 0),
            fmt(min((s.iops for s in ss), default=None), 0),
            fmt(median(s.rss_mib for s in ss)), fmt(median(s.fds for s in ss), 0),
            ops.strip() or "-", str(n_err),
        ])  # fmt: skip
        lo = hi
    return rows


def render(run: Run, summary: dict[str, Any], args: argparse.Namespace) -> str:
    width = float(max(5, -(-args.duration // 20)))
    header = ["t (s)", "IOPS median", "IOPS min", "RSS MiB", "fds", "ops", "errors"]
    out = [
        table(header, buckets(run, width)),
        "(ops: s=snapshots, d=deletes, c=clone, f=flatten, started in the bucket and succeeded)",
        "",
    ]
    e, rss, iops, ops = summary["errors"], summary["rss_mib"], summary["iops"], summary["ops"]
    w = summary["windows"]
    out += [
        f"errors: {e['total']} (fio {e['fio']}, verify {e['verify']}, operations {e['ops']}, "
        f"daemon exited {e['daemon_exited']}, check not clean {e['check_not_clean']})",
        f"verify crc32c: {'passed' if summary['verify']['passed'] else 'FAILED'} "
        f"(about {summary['verify']['reads_estimated']:,} blocks read back and checked)",
        f"IOPS median {fmt(iops['median'], 0)} (first window {fmt(iops['first_window'], 0)}, "
        f"last {fmt(iops['last_window'], 0)}: x{fmt(iops['last_vs_first'], 2)}; min "
        f"{fmt(iops['min'], 0)})",
        f"daemon RSS MiB: first {fmt(rss['first'])} (median of {w['first'][0]:.0f}-"
        f"{w['first'][1]:.0f} s), last {fmt(rss['last'])} (median of {w['last'][0]:.0f}-"
        f"{w['last'][1]:.0f} s): x{fmt(rss['ratio'], 2)}; max {fmt(rss['max'])}, trend "
        f"{fmt(rss['trend_per_hour'])} MiB/h",
    ]
    out += [f"  ! {m}" for m in summary["error_messages"]]
    rows = [[k, str(v["ok"]), str(v["failed"]), fmt(v["median_s"], 2), fmt(v["max_s"], 2)]
            for k, v in ops.items()]  # fmt: skip
    out += ["", table(["operation", "ok", "failed", "median s", "max s"], rows)]
    if summary.get("plot"):
        out.append(f"plot: {summary['plot']}")
    elif summary.get("plot_error"):
        out.append(f"plot: not written: {summary['plot_error']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- plot


def plot(run: Run, summary: dict[str, Any], path: Path) -> None:
    """IOPS (top) and daemon RSS (bottom) over time, operations and errors marked."""
    import matplotlib  # noqa: PLC0415 - optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [s.t for s in run.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5))
    top.plot(t, [s.iops for s in run.samples], lw=1.2, label="total IOPS")
    top.plot(t, [s.read_iops for s in run.samples], lw=0.6, color="tab:cyan", label="read")
    top.plot(t, [s.write_iops for s in run.samples], lw=0.6, color="tab:pink", label="write")
    mark_ops(top, run)
    top.set_ylabel("IOPS (per second)")
    top.set_ylim(bottom=0)
    top.legend(loc="upper right", fontsize="small", ncol=4)
    rss = [s.rss_mib for s in run.samples]
    bottom.plot(t, rss, color="tab:purple", lw=1.2)
    bottom.set_ylabel("targetvirt-handler RSS (MiB)")
    # from zero: a flat line must look flat, not a magnified wiggle
    bottom.set_ylim(0, 1.25 * max((r for r in rss if r is not None), default=1.0))
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    e, o = summary["errors"], summary["ops"]
    fig.suptitle(
        f"targetvirt soak, {args_line(summary)}: {o['snapshot']['ok']} snapshots, "
        f"{o['delete']['ok']} deletes, {o['flatten']['ok']} flatten; errors {e['total']}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def args_line(summary: dict[str, Any]) -> str:
    p = summary.get("params", {})
    return f"{p.get('duration_s')} s, {p.get('bs')} randrw QD{p.get('iodepth')}"


def mark_ops(ax: Any, run: Run) -> None:
    """Snapshots and deletes as ticks along the bottom, the flatten as a band, failures
    and fio errors as red crosses."""
    for kind, y, color in (("snapshot", 0.02, "tab:green"), ("delete", 0.06, "tab:orange")):
        ts = [e.t for e in run.events if e.op == kind and e.ok]
        ax.plot(ts, [y] * len(ts), "|", color=color, ms=8, transform=ax.get_xaxis_transform(),
                label=f"{kind}s")  # fmt: skip
    for e in run.events:
        if e.op == "flatten" and e.ok:
            ax.axvspan(e.t, e.t + e.seconds, color="tab:blue", alpha=0.12, label="flatten")
    bad = [e.t for e in run.events if not e.ok]
    prev = 0
    for s in run.samples:
        if s.fio_errors > prev:
            bad.append(s.t)
        prev = s.fio_errors
    if bad:
        ax.plot(bad, [0.5] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(),
                label="errors")  # fmt: skip


# --------------------------------------------------------------------------- setup


@contextlib.contextmanager
def stack(args: argparse.Namespace, log: Callable[[str], None]) -> Iterator[tuple[str, int]]:
    """targetvirt-handler serving a fresh vdisk, exported; yields (block device, daemon pid).
    Everything is torn down on the way out."""
    from bench.lun import exported  # noqa: PLC0415 - needs the guest's rtslib
    from tests.vm import lio  # noqa: PLC0415
    from tests.vm.tvlun import Handler, create_lun  # noqa: PLC0415

    handler = Handler(args.dir / "tv")
    # each kept snapshot can pin a whole copy (4 KiB random writes unshare every
    # segment), plus the live vdisk, the one being taken, and the flattened clone
    handler.provision(args.vdisk, args.size, pool_bytes=args.size * (args.keep + 4) + 64 * MIB)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, handler.dir, ignore_errors=True)
        if args.handler_log:  # (after the daemon stopped, before the folder goes)
            stack.callback(keep_log, handler.log, args.handler_log)
        handler.start()
        stack.callback(lambda: log(f"targetvirt-handler exited {handler.stop()}"))
        assert handler.proc is not None
        create_lun(args.vdisk, args.vdisk, args.size)
        stack.callback(lio.delete_storage_object, args.vdisk)
        dev = stack.enter_context(exported(args.vdisk, args.fabric))
        log(f"{args.vdisk}: {dev} ({args.fabric}), {args.size // MIB} MiB, handler pid "
            f"{handler.proc.pid}")  # fmt: skip
        yield dev, handler.proc.pid


def keep_log(log: Path, to: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(log, to)


def soak(args: argparse.Namespace, log: Callable[[str], None]) -> Run:
    ops: Ops = ApiOps() if args.via == "api" else ShellOps()
    with stack(args, log) as (dev, pid):
        run, churn = run_fio(dev, args, pid, lambda t0: Churn(ops, args.vdisk, args, t0, log), log)
        if not run.daemon_exited:
            run.check = churn.op("check", "metadata", ops.check)
    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tests.vm.lio import parse_size  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--duration", type=int, default=1800, help="seconds of fio (default 1800)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between snapshots (5)")
    ap.add_argument("--keep", type=int, default=3, help="snapshots kept; older ones deleted (3)")
    ap.add_argument("--size", type=parse_size, default=128 * MIB, help="vdisk size (128M)")
    ap.add_argument("--bs", default="4k", help="fio block size (4k)")
    ap.add_argument("--iodepth", type=int, default=8, help="fio queue depth (8)")
    ap.add_argument("--rwmixread", type=int, default=50, help="percent reads (50)")
    ap.add_argument("--verify-backlog", type=int, default=256,
                    help="fio checks written blocks every this many writes (256)")  # fmt: skip
    ap.add_argument("--warmup", type=float, default=30.0,
                    help="seconds before the first memory window (30)")  # fmt: skip
    ap.add_argument("--via", choices=["api", "shell"], default="api",
                    help="management through the D-Bus API (default) or the shell")  # fmt: skip
    ap.add_argument("--fabric", choices=["loopback", "iscsi"], default="loopback")
    ap.add_argument("--dir", type=Path, default=Path("/run/ram/soak"), help="scratch folder")
    ap.add_argument("--vdisk", default="soak", help="vdisk and storage object name (soak)")
    ap.add_argument("--plot", type=Path, default=Path("soak.png"),
                    help="PNG to write (default soak.png; '' for none)")  # fmt: skip
    ap.add_argument("--max-errors", type=int, default=1000,
                    help="stop fio once it has counted more errors than this (1000)")  # fmt: skip
    ap.add_argument("--handler-log", type=Path, help="keep a copy of the daemon's log here")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.duration < 5 or args.interval <= 0 or args.keep < 1:
        ap.error("need --duration >= 5, --interval > 0, --keep >= 1")
    if not 0 <= args.rwmixread < 100:
        ap.error("--rwmixread must be 0-99 (fio must write to have something to verify)")
    return args


def params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration, "interval_s": args.interval, "keep": args.keep,
        "size_mib": args.size // MIB, "bs": args.bs, "iodepth": args.iodepth,
        "rwmixread": args.rwmixread, "verify_backlog": args.verify_backlog,
        "via": args.via, "fabric": args.fabric, "kernel": os.uname().release,
    }  # fmt: skip


def finish(run: Run, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The summary with its parameters, samples and events, and the plot written."""
    summary = summarize(run, args)
    summary["params"] = params(args)
    summary["samples"] = [asdict(s) for s in run.samples]
    summary["events"] = [asdict(e) for e in run.all_events()]
    summary["plot"], summary["plot_error"] = None, None
    if str(args.plot) not in ("", "."):
        try:
            plot(run, summary, args.plot)
            summary["plot"] = str(args.plot.resolve())
        except (ImportError, OSError, ValueError) as e:
            summary["plot_error"] = f"{type(e).__name__}: {e}"
            log(f"plot not written: {summary['plot_error']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not Path("/sys/kernel/config/target").is_dir():
        print("bench.soak: needs root and LIO (configfs target/): run it in the test guest, "
              "e.g. tools/vm run -- .venv/bin/python -m bench.soak", file=sys.stderr)  # fmt: skip
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"bench.soak: {msg}", file=sys.stderr, flush=True)

    run = soak(args, log)
    summary = finish(run, args, log)
    print(dumps(summary) if args.json else render(run, summary, args))
    return 1 if summary["errors"]["total"] else 0


if __name__ == "__main__":
    sys.exit(main())
