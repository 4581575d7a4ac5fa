"""The standby state machine on a fake clock: it waits, retries every poll interval, takes
over when the store lets it, stops on request, and gives up on a damaged store."""

from __future__ import annotations

import threading

import pytest

from targetvirt.clock import FakeClock
from targetvirt.errors import Cancelled, InvalidArgument, StoreCorrupt, StoreError, StoreLocked
from targetvirt.standby import ACTIVE, FAILED, STOPPED, WAITING, Standby
from tests.targetvirt.cluster import Background


class Store:
    """A stand-in store: refuses (StoreLocked) until ``free`` is set, counts attempts."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.free = False
        self.error: BaseException | None = None
        self.times: list[float] = []
        self.tried = threading.Semaphore(0)

    def acquire(self) -> str:
        self.times.append(self.clock.now())
        self.tried.release()
        if self.error is not None:
            raise self.error
        if not self.free:
            raise StoreLocked("in use by client.1 (pid 1 on a, since then)")
        return "store"


def attempts(store: Store, n: int) -> None:
    """Wait (really) until the standby made ``n`` more attempts."""
    for _ in range(n):
        assert store.tried.acquire(timeout=10), "the standby made no attempt"


def test_waits_poll_by_poll_and_takes_over_when_the_lock_is_free() -> None:
    clock = FakeClock()
    store = Store(clock)
    waits: list[StoreError] = []
    standby = Standby(store.acquire, poll=2.0, clock=clock, on_wait=waits.append)
    bg = Background(standby.run)
    attempts(store, 1)
    assert standby.state == WAITING and bg.still_running(0.1)
    clock.advance(1.9)  # not yet: no attempt before the poll interval passed
    assert bg.still_running(0.1) and standby.attempts == 1
    clock.advance(0.1)
    attempts(store, 1)
    clock.advance(2.0)
    attempts(store, 1)
    assert store.times == [1000.0, 1002.0, 1004.0]
    assert len(waits) == 3 and all(isinstance(e, StoreLocked) for e in waits)
    assert "in use by client.1" in standby.last_error
    store.free = True  # the holder's lease lapsed (the store fences it on the next try)
    clock.advance(2.0)
    assert bg.result() == "store"
    assert standby.state == ACTIVE and standby.attempts == 4 and standby.acquired_at == 1006.0
    with pytest.raises(Cancelled):
        standby.attempt()  # active: nothing more to try


def test_an_unreachable_cluster_is_retried_like_a_held_lock() -> None:
    clock = FakeClock()
    store = Store(clock)
    store.error = StoreError("cannot reach metadata store rados:p#t: timed out")
    standby = Standby(store.acquire, poll=1.0, clock=clock)
    assert standby.attempt() is None and standby.state == WAITING
    assert "timed out" in standby.last_error
    store.error, store.free = None, True
    assert standby.attempt() == "store" and standby.state == ACTIVE


def test_stop_ends_the_wait() -> None:
    clock = FakeClock()
    store = Store(clock)
    standby = Standby(store.acquire, poll=30.0, clock=clock)
    bg = Background(standby.run)
    attempts(store, 1)
    standby.stop()
    with pytest.raises(Cancelled):
        bg.result()
    assert standby.state == STOPPED and standby.attempts == 1
    store.free = True
    with pytest.raises(Cancelled):
        standby.attempt()


def test_a_damaged_store_or_a_bug_ends_the_wait_with_the_error() -> None:
    clock = FakeClock()
    store = Store(clock)
    store.error = StoreCorrupt("table 3 chunk 0 fails its checksum")
    standby = Standby(store.acquire, clock=clock)
    with pytest.raises(StoreCorrupt):
        standby.run()
    assert standby.state == FAILED
    store.error = RuntimeError("bug")
    standby = Standby(store.acquire, clock=clock)
    with pytest.raises(RuntimeError):
        standby.run()
    assert standby.state == FAILED


def test_poll_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        Standby(lambda: "x", poll=0)
