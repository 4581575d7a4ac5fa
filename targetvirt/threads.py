"""Kernel names for our threads.

Python (before 3.14) leaves every thread with its process's name, so ``top -H``,
``ps -L``, ``perf`` and ``bench --cpu`` (which reads /proc/PID/task/TID/stat) show a
handler as a row of identical ``python`` threads.  A thread that does the product's work
names itself when it starts, and those tools tell the ring loop from a worker or the
lease keeper.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: the kernel keeps 15 bytes of a thread's name (TASK_COMM_LEN less the NUL)
MAX_NAME = 15


def name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (its ``comm``), cut to :data:`MAX_NAME`
    bytes.  Cosmetic: without /proc it is left as it was."""
    try:
        with open("/proc/thread-self/comm", "wb") as f:
            f.write(name.encode()[:MAX_NAME])
    except OSError as e:
        log.debug("cannot name thread %r: %s", name, e)
