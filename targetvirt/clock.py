"""Injected time.

Everything that waits, expires or measures takes a :class:`Clock`.  Production code uses
:class:`MonotonicClock`; tests use :class:`FakeClock` and move time forward explicitly, so
freezes, delays, leases and timeouts are tested without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences are meaningful)."""
        ...

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``deadline`` passes.

        Spurious returns are allowed; callers re-check their predicate.
        """
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        if deadline is None:
            cond.wait()
        else:
            cond.wait(max(0.0, deadline - time.monotonic()))


class FakeClock:
    """A clock that only moves when told to.

    ``advance`` wakes every condition that a waiter registered, so a thread blocked in
    :meth:`wait` re-checks its deadline against the new time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._conds: set[threading.Condition] = set()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conds = list(self._conds)
        for cond in conds:
            with cond:
                cond.notify_all()

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        with self._lock:
            self._conds.add(cond)
        try:
            # Bounded real wait so a missed notify cannot hang a test forever; the
            # caller's predicate loop decides on the fake time, not on this timeout.
            cond.wait(0.05)
        finally:
            with self._lock:
                self._conds.discard(cond)
