"""Settings shared by the fuzz targets (hypothesis tests fed hostile input).

Each target runs a bounded number of examples in CI. ``TV_FUZZ_SCALE`` multiplies every
target's count to run longer by hand, e.g. ``TV_FUZZ_SCALE=50 tools/test -m "not vm" -k
fuzz``; ``TV_FUZZ_SCALE=0.1`` makes a quick pass.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("TV_FUZZ_SCALE", "1"))


def examples(default: int) -> int:
    """``default`` examples, scaled by ``TV_FUZZ_SCALE`` (at least one)."""
    return max(1, round(default * SCALE))


def fuzz_settings(default: int, **kw: Any) -> settings:
    """Settings of one fuzz target: ``default`` examples (scaled), no deadline (CI
    machines are slow and shared), no health check about slow or large data."""
    return settings(
        max_examples=examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kw,
    )


def one_line(text: str) -> bool:
    """A user-facing error message: non-empty, and a single line however it is split."""
    return bool(text.strip()) and len(text.splitlines()) == 1
