"""Where the CPU goes per I/O: every thread's CPU time, read from /proc before and after a
measured run, summed by (process, thread) name and divided by the operations done.

A benchmark that is CPU-bound (the TCG test guest, where fio, the kernel's workqueues,
the handler and a Ceph cluster share two emulated CPUs) is explained by this table, not
by its rate alone: e.g. which share of a command's cost sits in the kernel's kworkers,
in the handler's threads, or in librados's.  Used by ``bench.lun --cpu`` and
``bench.ceph --lun --cpu``.

Kernel worker threads (``kworker/...``, whose names change with their current work
queue) count as one group, ``kworker``.  A process may be given a label by pid (the
handler runs as ``python``); unlabelled ones go by their ``comm``.

Each figure keeps user and system time apart (proc(5)'s utime and stime): for a handler
that is the line between its own code (the interpreter, in user mode) and the system
calls it makes (the I/O, the ring's notify, the poll), where the kernel does the work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

from bench.common import table

T = TypeVar("T")

#: a thread: (pid, tid)
ThreadId = tuple[int, int]


@dataclass(frozen=True)
class ThreadTime:
    process: str  # the process's name (its label, or comm)
    thread: str  # the thread's comm
    utime: int  # clock ticks in user mode
    stime: int = 0  # clock ticks in the kernel, on this thread's behalf


class Cost(NamedTuple):
    """CPU µs per operation of one group, in user mode and in the kernel."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


class StatError(ValueError):
    """A /proc/PID/task/TID/stat line this module cannot read."""


def parse_stat(line: str) -> tuple[str, int, int]:
    """(comm, utime, stime in ticks) from one ``stat`` line (proc(5)).  The comm is
    between the first ``(`` and the *last* ``)``: it may itself hold spaces and ``)``."""
    try:
        comm = line[line.index("(") + 1 : line.rindex(")")]
        fields = line[line.rindex(")") + 2 :].split()
        # after the comm: state is field 3, utime field 14, stime field 15
        return comm, int(fields[11]), int(fields[12])
    except (ValueError, IndexError):
        raise StatError(f"not a proc stat line: {line[:80]!r}") from None


def _group(name: str) -> str:
    return "kworker" if name.startswith("kworker/") else name


def snapshot(
    labels: Mapping[int, str] | None = None, proc: Path = Path("/proc")
) -> dict[ThreadId, ThreadTime]:
    """CPU time of every thread now (one that ends while being read is left out)."""
    labels = labels or {}
    out: dict[ThreadId, ThreadTime] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm = (proc / entry.name / "comm").read_text().strip()
            tids = [t.name for t in os.scandir(proc / entry.name / "task")]
        except OSError:
            continue  # gone meanwhile
        process = labels.get(pid, _group(comm))
        for tid in tids:
            try:
                line = (proc / entry.name / "task" / tid / "stat").read_text()
            except OSError:
                continue
            thread, utime, stime = parse_stat(line)
            out[(pid, int(tid))] = ThreadTime(process, _group(thread), utime, stime)
    return out


def per_op(
    before: Mapping[ThreadId, ThreadTime],
    after: Mapping[ThreadId, ThreadTime],
    ops: float,
    hz: int | None = None,
) -> dict[tuple[str, str], Cost]:
    """Microseconds of CPU per operation for each (process, thread) group that ran
    between the two snapshots, largest total first.  A thread born in between counts
    from zero; one that died is lost (proc no longer shows it)."""
    if ops <= 0:
        raise ValueError(f"operations must be positive, not {ops}")
    hz = hz or os.sysconf("SC_CLK_TCK")
    sums: dict[tuple[str, str], tuple[int, int]] = {}
    for key, t in after.items():
        old = before.get(key)
        # a tid reused by another thread (its ticks went down) counts from zero
        if old is None or old.utime > t.utime or old.stime > t.stime:
            old = ThreadTime(t.process, t.thread, 0, 0)
        user, system = t.utime - old.utime, t.stime - old.stime
        if user or system:
            u, s = sums.get((t.process, t.thread), (0, 0))
            sums[(t.process, t.thread)] = (u + user, s + system)
    scale = 1e6 / hz / ops
    return _largest_first({g: Cost(u * scale, s * scale) for g, (u, s) in sums.items()})


def _largest_first(costs: Mapping[tuple[str, str], Cost]) -> dict[tuple[str, str], Cost]:
    return dict(sorted(costs.items(), key=lambda kv: (-kv[1].total, kv[0])))


@dataclass
class Tally:
    """CPU per operation over several runs: each run weighs by its operations."""

    ops: float = 0.0
    us: dict[tuple[str, str], Cost] = field(default_factory=dict)  # CPU µs per group

    def add(self, costs: Mapping[tuple[str, str], Cost], ops: float) -> None:
        """One run's :func:`per_op` result and its operation count."""
        for group, (user, system) in costs.items():
            u, s = self.us.get(group, (0.0, 0.0))
            self.us[group] = Cost(u + user * ops, s + system * ops)
        self.ops += ops

    def per_op(self) -> dict[tuple[str, str], Cost]:
        if self.ops <= 0:
            return {}
        n = self.ops
        return _largest_first({g: Cost(u / n, s / n) for g, (u, s) in self.us.items()})


def run_counted(
    tally: Tally | None,
    labels: Mapping[int, str],
    run: Callable[[], T],
    ops: Callable[[T, float], float],
) -> T:
    """``run()``; with a tally, every thread's CPU time read around it and added to the
    tally for ``ops(result, seconds run)`` operations."""
    if tally is None:
        return run()
    before, t0 = snapshot(labels), time.perf_counter()
    result = run()
    after, elapsed = snapshot(labels), time.perf_counter() - t0
    n = max(ops(result, elapsed), 1.0)
    tally.add(per_op(before, after, n), n)
    return result


def total(costs: Mapping[tuple[str, str], Cost]) -> Cost:
    return Cost(sum(c.user for c in costs.values()), sum(c.system for c in costs.values()))


#: in JSON: {kind: {side: {"process / thread": {"user": µs, "system": µs}}}}
Json = dict[str, dict[str, dict[str, dict[str, float]]]]


def to_json(tallies: Mapping[str, Mapping[str, Tally]]) -> Json:
    """Each group's :class:`Cost` per operation, rounded to 0.1 µs, for tallies kept per
    kind of run (a job, a row) and per side (a contender)."""
    return {
        kind: {side: {_name(g): {"user": round(c.user, 1), "system": round(c.system, 1)}
                      for g, c in t.per_op().items()}
               for side, t in sides.items()}
        for kind, sides in tallies.items()
    }  # fmt: skip


def tables(tallies: Mapping[str, Mapping[str, Tally]]) -> str:
    """:func:`render` for each kind of run, one column per side."""
    return "\n".join(
        f"\nCPU per operation, {kind}:\n{render({s: t.per_op() for s, t in sides.items()})}"
        for kind, sides in tallies.items()
    )


def _name(group: tuple[str, str]) -> str:
    process, thread = group
    return process if process == thread else f"{process} / {thread}"


def render(columns: Mapping[str, Mapping[tuple[str, str], Cost]], top: int = 12) -> str:
    """A table of µs per operation: one column per measured run (e.g. per contender),
    one row per group among the ``top`` largest of any column, and the total.  A cell is
    the group's whole cost, then the part spent in the kernel: ``726 (sys 310)``."""
    rank: dict[tuple[str, str], float] = {}
    for costs in columns.values():
        for g, c in costs.items():
            rank[g] = max(rank.get(g, 0.0), c.total)
    groups = sorted(rank, key=lambda g: (-rank[g], g))[:top]
    rows = [[_name(g), *(_cell(c.get(g)) for c in columns.values())] for g in groups]
    rows.append(["total (all threads)", *(_cell(total(c)) for c in columns.values())])
    return table(["CPU µs per operation (of which system)", *columns], rows)


def _cell(cost: Cost | None) -> str:
    return "0" if cost is None else f"{cost.total:,.0f} (sys {cost.system:,.0f})"
