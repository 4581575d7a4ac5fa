"""A standby controller: wait for the metadata store's writer lock, then take over.

One controller at a time writes a shared (RADOS) metadata store: it holds the store's
exclusive lock with a lease that it renews.  A standby tries to open the store as
writer every ``poll`` seconds.  While the active controller lives, that fails with
:class:`~targetvirt.errors.StoreLocked`; once its lease has lapsed (it hung, its host
died) or its process is dead (same host), the open succeeds -- the store itself fences
the old holder (Ceph blocklist) before claiming ownership, so nothing the old controller
still sends is ever applied.  The caller then serves, and agents follow the endpoint
the new owner published in the store.

The state machine is kept apart from the store so that it can be tested with a fake
clock: ``acquire`` is whatever opens the store (and returns it).

States: ``waiting`` (tries every ``poll`` seconds) -> ``active`` (``acquire`` returned;
:meth:`Standby.run` returns its result) or ``stopped`` (:meth:`Standby.stop`; ``run``
raises :class:`~targetvirt.errors.Cancelled`).  A :class:`StoreCorrupt` store, or any
error that is not a :class:`StoreError`, ends the wait (``failed``) and is raised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from targetvirt.clock import Clock, MonotonicClock
from targetvirt.errors import Cancelled, InvalidArgument, StoreCorrupt, StoreError, StoreLocked

log = logging.getLogger(__name__)

T = TypeVar("T")

WAITING, ACTIVE, STOPPED, FAILED = "waiting", "active", "stopped", "failed"


class Standby(Generic[T]):
    """Calls ``acquire`` until it succeeds, every ``poll`` seconds (``clock`` time).

    ``on_wait(error)`` is called after each attempt refused (the holder still holds the
    store: :class:`StoreLocked`; or the store could not be reached: another
    :class:`StoreError`), e.g. to report being a standby.
    """

    def __init__(
        self,
        acquire: Callable[[], T],
        *,
        poll: float = 1.0,
        clock: Clock | None = None,
        on_wait: Callable[[StoreError], None] | None = None,
    ) -> None:
        if not poll > 0:
            raise InvalidArgument(f"a standby's poll interval must be positive, not {poll}")
        self._acquire = acquire
        self.poll = poll
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._on_wait = on_wait
        self._cond = threading.Condition()
        self.state = WAITING
        self.attempts = 0
        self.last_error = ""  # why the last attempt was refused
        self.acquired_at: float | None = None  # clock time it became active

    def attempt(self) -> T | None:
        """One try: the result of ``acquire`` (now active), or None (still waiting)."""
        with self._cond:
            if self.state != WAITING:
                raise Cancelled(f"the standby is {self.state}")
            self.attempts += 1
        try:
            result = self._acquire()
        except StoreCorrupt:
            self.state = FAILED
            raise
        except StoreError as e:
            if isinstance(e, StoreLocked):
                if str(e) != self.last_error:  # a new holder: say once whom we wait for
                    log.info("standby: waiting: %s", e)
            else:
                log.warning("standby: %s", e)
            self.last_error = str(e)
            if self._on_wait is not None:
                self._on_wait(e)
            return None
        except BaseException:
            self.state = FAILED
            raise
        with self._cond:
            self.state = ACTIVE
            self.acquired_at = self.clock.now()
            self._cond.notify_all()
        log.info("standby: took over after %d attempts", self.attempts)
        return result

    def run(self) -> T:
        """Wait until the store is ours; returns what ``acquire`` returned."""
        while True:
            result = self.attempt()
            if result is not None:
                return result
            deadline = self.clock.now() + self.poll
            with self._cond:
                while self.state == WAITING and self.clock.now() < deadline:
                    self.clock.wait(self._cond, deadline)
                if self.state == STOPPED:
                    raise Cancelled("the standby was stopped before it took over")

    def stop(self) -> None:
        """Give up waiting (a :meth:`run` in progress raises Cancelled)."""
        with self._cond:
            if self.state == WAITING:
                self.state = STOPPED
            self._cond.notify_all()
