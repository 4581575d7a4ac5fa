"""An agent process for the controller-fault test: writes, and reads a marked block.

``python -m tests.targetvirt.manage.agent_io SOCKET LOG STOP``

The agent (id ``gw``) serves vdisk ``v`` through the Unix-socket gRPC transport with a
controller wait of 60 s (as ``targetvirt-handler --controller`` has).  It first writes
the mark block (the last segment), prints ``ready``, then:

* a writer writes block ``seq`` (1, 2, 3...) at segment ``seq % SLOTS`` -- a fresh segment
  every time for the first SLOTS writes, so each needs the controller (a fault) -- and
  after each write returns appends ``(seq, start, end)`` (CLOCK_MONOTONIC) to LOG;
* a reader reads the mark block every 20 ms and appends ``(start, end, ok)`` to LOG.reads.

It stops when the file STOP exists, flushes and prints ``done <last seq>``; an error
ends it with ``error <class>: <message>`` and status 2.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time

from targetvirt.agent import Agent
from targetvirt.errors import TargetvirtError
from targetvirt.transport.network import NetworkLink

SEGMENT = 64 << 10
SLOTS = 255  # segment 255 holds the mark
MARK = SLOTS * SEGMENT
BLOCK = 4096
WRITE = struct.Struct("<Qdd")
READ = struct.Struct("<dd?")


def block(seq: int) -> bytes:
    return struct.pack("<Q", seq) * (BLOCK // 8)


def mark() -> bytes:
    return b"mark" * (BLOCK // 4)


def main() -> int:
    sock, log_path, stop = sys.argv[1:4]
    agent = Agent("gw", NetworkLink(f"unix:{sock}", call_timeout=2.0), controller_wait=60.0)
    try:
        agent.connect(["v"])
        agent.start()
        vd = agent.vdisk("v")
        vd.write_from(MARK, [memoryview(mark())], False)
    except TargetvirtError as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
        return 2
    failed: list[str] = []
    reader = threading.Thread(target=read_loop, args=(vd, log_path + ".reads", stop, failed))
    reader.start()
    print("ready", flush=True)
    seq = 0
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while not os.path.exists(stop) and not failed:
            seq += 1
            start = time.monotonic()
            vd.write_from((seq % SLOTS) * SEGMENT, [memoryview(block(seq))], False)
            os.write(log, WRITE.pack(seq, start, time.monotonic()))
        vd.flush()
    except TargetvirtError as e:
        failed.append(f"{type(e).__name__}: {e}")
    reader.join()
    agent.close()
    if failed:
        print(f"error {failed[0]}", flush=True)
        return 2
    print(f"done {seq}", flush=True)
    return 0


def read_loop(vd: object, path: str, stop: str, failed: list[str]) -> None:
    buf = bytearray(BLOCK)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while not os.path.exists(stop) and not failed:
        start = time.monotonic()
        try:
            vd.read_into(MARK, [memoryview(buf)])  # type: ignore[attr-defined]
        except TargetvirtError as e:
            failed.append(f"read: {type(e).__name__}: {e}")
            return
        os.write(log, READ.pack(start, time.monotonic(), buf == mark()))
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
