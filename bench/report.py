"""Shared output of the benchmarks: a table for people, one JSON object for machines."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""

    @property
    def verdict(self) -> str:
        return ""


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs (seconds)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(title: str, rows: list[Row]) -> None:
    headers = ["measure", "value", "baseline (same run)", "ratio", "target"]
    body = [
        [
            r.name,
            f"{r.value:,.3f} {r.unit}",
            f"{r.baseline}: {r.baseline_value:,.3f} {r.unit}"
            if r.baseline_value is not None
            else r.baseline,
            f"{r.ratio:.2f}" if r.ratio is not None else "",
            r.target,
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))


def print_json(figures: dict[str, object]) -> None:
    print(json.dumps(figures, sort_keys=True))
