"""targetvirt.threads: a thread's kernel name, read back from the real /proc."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from targetvirt.threads import MAX_NAME, name_this_thread


def _comm(tid: int) -> str:
    return Path(f"/proc/{os.getpid()}/task/{tid}/comm").read_text().rstrip("\n")


def test_a_thread_names_itself_and_a_long_name_is_cut_to_what_the_kernel_keeps() -> None:
    seen: dict[str, str] = {}

    def body(name: str) -> None:
        name_this_thread(name)
        seen[name] = _comm(threading.get_native_id())

    for name in ("tv-ring", "a-name-longer-than-fifteen-bytes"):
        t = threading.Thread(target=body, args=(name,))
        t.start()
        t.join()
    assert seen == {"tv-ring": "tv-ring", "a-name-longer-than-fifteen-bytes": "a-name-longer-t"}
    assert len(seen["a-name-longer-than-fifteen-bytes"]) == MAX_NAME
    # only the calling thread was renamed
    assert _comm(threading.get_native_id()) != "tv-ring"
