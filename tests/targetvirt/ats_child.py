"""An agent process that takes a VMFS-style ATS lock with COMPARE AND WRITE.

``python -m tests.targetvirt.ats_child SOCKET AGENT INDEX ROUNDS GO``

Serves vdisk ``a`` over the Unix-socket transport, prints ``ready``, waits for the file GO
(so every process starts at once), then ROUNDS times: swaps the free lock word (sector 0
all zeros) for its own (``INDEX + 1``) with COMPARE AND WRITE, retrying on a miscompare;
holding it, reads the counter (in another segment: only the lock protects it), adds one
and writes it back (a plain write); releases the lock with COMPARE AND WRITE of its own
word back to zeros, which must match (else someone took a lock it held).  Prints
``done <rounds> <miscompares>``, or ``error ...`` and exits 2.
"""

from __future__ import annotations

import os
import struct
import sys
import time

from targetvirt.agent import Agent
from targetvirt.errors import LeaseExpired, TargetvirtError
from targetvirt.transport.network import NetworkLink
from tests.targetvirt.agent_child import SEGMENT

SECTOR = 512
COUNTER = SEGMENT + 4096  # another segment than the lock's
FREE = bytes(SECTOR)
_WORD = struct.Struct("<Q")


def word(index: int) -> bytes:
    return _WORD.pack(index + 1) * (SECTOR // _WORD.size)


def main() -> int:
    sock, agent_id, index, rounds, go = sys.argv[1:6]
    agent = Agent(agent_id, NetworkLink(f"unix:{sock}", call_timeout=20.0), host="test")
    agent.connect(["a"])
    agent.start()
    vd = agent.vdisk("a")
    mine = word(int(index))
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    misses = 0
    try:
        for _ in range(int(rounds)):
            while vd.compare_and_write(0, memoryview(FREE), memoryview(mine)) is not None:
                misses += 1  # taken: try again (VMFS backs off too)
            counter = bytearray(8)
            vd.read_into(COUNTER, [memoryview(counter)])
            vd.write_from(COUNTER, [memoryview(_WORD.pack(_WORD.unpack(counter)[0] + 1))], False)
            if vd.compare_and_write(0, memoryview(mine), memoryview(FREE)) is not None:
                print("error someone took the lock this agent held", flush=True)
                return 2
        vd.flush()
    except (TargetvirtError, LeaseExpired) as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
        return 2
    print(f"done {rounds} {misses}", flush=True)
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
