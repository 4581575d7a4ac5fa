"""Shared pieces of the benchmarks: fio runs, ratios, the table and the JSON output.

Benchmarks compare contenders measured in the same run (HACKING.md): absolute numbers
from a TCG guest mean little, ratios do.  A contender that cannot run is reported as
"not available" with its reason; its figures and ratios are ``None``, never invented.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


class NotAvailable(Exception):
    """A contender cannot be measured here (the message says why)."""


@dataclass(frozen=True)
class FioJob:
    """One fio workload; ``metric`` is what its ratios compare (iops or mib_s)."""

    name: str
    rw: str
    bs: str
    iodepth: int
    metric: str


@dataclass
class FioResult:
    iops: float
    mib_s: float
    lat_mean_us: float
    lat_p99_us: float | None

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))


def run_fio(
    dev: str, job: FioJob, *, runtime: int, ramp: int = 2, size: str | None = None
) -> FioResult:
    """One time-based fio job on a block device (libaio, O_DIRECT)."""
    fio = shutil.which("fio")
    if fio is None:
        raise RuntimeError("fio is not installed")
    argv = [
        fio,
        f"--name={job.name}",
        f"--filename={dev}",
        "--ioengine=libaio",
        "--direct=1",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        "--numjobs=1",
        "--time_based",
        f"--runtime={runtime}",
        f"--ramp_time={ramp}",
        "--randrepeat=0",
        "--norandommap",
        "--group_reporting",
        "--output-format=json",
    ]
    if size:
        argv.append(f"--size={size}")
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=runtime + ramp + 300, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job.name} on {dev} failed: {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout[proc.stdout.index("{") :])
    j = data["jobs"][0]
    side = j["read"] if "read" in job.rw else j["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000")
    return FioResult(
        iops=float(side["iops"]),
        mib_s=float(side["bw_bytes"]) / MIB,
        lat_mean_us=float(side["lat_ns"]["mean"]) / 1000.0,
        lat_p99_us=float(p99) / 1000.0 if p99 is not None else None,
    )


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either side is missing (or b is 0)."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table; first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                 for i, c in enumerate(r)]  # fmt: skip
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
