"""Long management operations as *jobs*: run in a thread, report progress, cancellable.

A job wraps one engine call that takes a ``progress(done, total)`` callback (flatten,
evacuate) or none (rollback, check, delete: their progress is indeterminate).  The
callback is where cancellation happens: it raises :class:`Cancelled` between two
steps, and the engine has committed its progress by then, so a cancelled job leaves
things consistent and running it again resumes.  Jobs without a callback cannot stop
half-way; cancelling them is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from targetvirt.errors import Cancelled, InvalidArgument, NotFound, TargetvirtError

log = logging.getLogger(__name__)

KEEP_FINISHED = 50  # finished jobs kept for ``info``

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"

Progress = Callable[[int, int], None]
Body = Callable[[Progress], Any]


@dataclass
class Job:
    id: int
    kind: str  # flatten, evacuate, rollback, check, delete
    target: str  # what it works on: a vdisk, "pool/cid", "catalog"
    unit: str = ""  # what done/total count ("segments"), "" when indeterminate
    cancellable: bool = True
    state: str = RUNNING
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: Any = None
    error: str = ""
    error_name: str = ""
    locks: tuple[str, ...] = ()  # names the job keeps busy
    cancel_requested: bool = False

    def describe(self) -> str:
        return f"job {self.id} ({self.kind} {self.target})"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "state": self.state,
            "done": self.done, "total": self.total, "unit": self.unit,
            "cancellable": self.cancellable, "started": self.started,
            "finished": self.finished, "result": self.result, "error": self.error,
            "error_name": self.error_name, "cancel_requested": self.cancel_requested,
        }  # fmt: skip


class Jobs:
    """The jobs of one daemon."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._next = 1
        self._stopping = False
        self.changed: Callable[[Job], None] = lambda job: None

    def busy(self, name: str) -> Job | None:
        """The running job that holds ``name``, if any."""
        with self._lock:
            for job in self._jobs.values():
                if job.state == RUNNING and name in job.locks:
                    return job
        return None

    def start(
        self,
        kind: str,
        target: str,
        body: Body,
        *,
        unit: str = "",
        cancellable: bool = True,
        locks: tuple[str, ...] = (),
    ) -> Job:
        with self._lock:
            if self._stopping:
                raise TargetvirtError("the daemon is stopping; no new jobs")
            for name in locks:
                for other in self._jobs.values():
                    if other.state == RUNNING and name in other.locks:
                        raise_busy(name, other)
            job = Job(self._next, kind, target, unit, cancellable, locks=locks)
            self._next += 1
            self._jobs[job.id] = job
            self._prune()
            thread = threading.Thread(
                target=self._run, args=(job, body), name=f"job-{job.id}", daemon=True
            )
            self._threads[job.id] = thread
        thread.start()
        return job

    def _prune(self) -> None:
        finished = sorted(j.id for j in self._jobs.values() if j.state != RUNNING)
        for jid in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[jid]
            self._threads.pop(jid, None)

    def _run(self, job: Job, body: Body) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            self.changed(job)
            if job.cancel_requested or self._stopping:
                raise Cancelled(
                    f"{job.kind} of {job.target} cancelled after {done} of {total} {job.unit}"
                    f"; run it again to resume"
                )

        try:
            job.result = body(progress)
            job.state = DONE
        except Cancelled as e:
            job.state, job.error, job.error_name = CANCELLED, str(e), type(e).__name__
        except TargetvirtError as e:
            job.state, job.error, job.error_name = FAILED, str(e), type(e).__name__
        except Exception as e:  # a bug must not kill the daemon: say what failed
            log.exception("%s failed", job.describe())
            job.state, job.error = FAILED, f"internal error in {job.kind}: {type(e).__name__}: {e}"
            job.error_name = "InternalError"
        job.finished = time.time()
        log.info("%s %s%s", job.describe(), job.state, f": {job.error}" if job.error else "")
        self.changed(job)

    def get(self, jid: int) -> Job:
        with self._lock:
            try:
                return self._jobs[jid]
            except KeyError:
                raise NotFound(f"no job {jid}") from None

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def cancel(self, jid: int) -> Job:
        job = self.get(jid)
        if job.state != RUNNING:
            raise InvalidArgument(f"{job.describe()} is not running ({job.state})")
        if not job.cancellable:
            raise InvalidArgument(
                f"{job.describe()} cannot be stopped half-way; it finishes by itself"
            )
        job.cancel_requested = True
        self.changed(job)
        return job

    def wait(self, jid: int, timeout: float | None = None) -> Job:
        job = self.get(jid)
        thread = self._threads.get(jid)
        if thread is not None:
            thread.join(timeout)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every job to stop at its next step and wait for them (bounded)."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def raise_busy(name: str, job: Job) -> None:
    from targetvirt.errors import InUse  # noqa: PLC0415 - keeps the import list short

    raise InUse(f"{name} is busy: {job.describe()} is running")
