"""An agent process for the multi-process tests: sequence-numbered writes to its own region.

``python -m tests.targetvirt.agent_child SOCKET AGENT INDEX LOG STOP [RADOS]``

The agent serves vdisks ``a`` and ``b`` over the Unix-socket gRPC transport (with
RADOS, a location: commands by watch/notify there, requests over the socket) and writes
blocks numbered 1, 2, 3...: write ``seq`` goes to vdisk ``VDISKS[seq % 2]``, slot
``(seq // 2) % SLOTS`` of region INDEX (slots straddle a segment boundary).  A block is
``(INDEX, seq)`` repeated, so any snapshot can be decoded.  After each write returns it
appends ``(seq, start, end)`` (CLOCK_MONOTONIC, shared by the processes of one host) to
LOG.  It flushes every 50 writes and makes every 97th a FUA write (env
``TV_AGENT_FLUSH_EVERY``: 0 for neither).  SOCKET may instead be the RADOS location of
the controllers' metadata store (``rados:...``): the agent follows whichever controller
owns it (FollowingLink).  It stops when the file STOP exists, flushes, prints
``done <last seq>``; an error it cannot retry ends it with ``error <class>: <message>``
and status 2.  With RADOS, SIGUSR1 makes it probe whether the storage still takes its
writes (``probe ...``).

Like a SCSI initiator, it retries an I/O that failed with a "try again" sense (no lease,
controller unreachable: a controller restart) -- only acknowledged writes are logged.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from functools import partial

from targetvirt.agent import Agent
from targetvirt.errors import LeaseExpired, TargetvirtError
from targetvirt.transport import ControllerLink
from targetvirt.transport.network import NetworkLink

VDISKS = ("a", "b")
SEGMENT = 64 << 10
REGION = 2 * SEGMENT
SLOTS = 24
STRIDE = 5000  # slot 13 straddles the segment boundary inside a region
BLOCK = 4096
RECORD = struct.Struct("<Qdd")
FLUSH_EVERY = int(os.environ.get("TV_AGENT_FLUSH_EVERY", "50"))  # writes; 0: never
_PAIR = struct.Struct("<QQ")


def block(index: int, seq: int) -> bytes:
    return _PAIR.pack(index, seq) * (BLOCK // _PAIR.size)


def decode_block(data: bytes) -> tuple[int, int] | None:
    """(agent index, seq) of a block, None for a never-written slot; raises if torn."""
    if data == bytes(BLOCK):
        return None
    index, seq = _PAIR.unpack_from(data)
    if data != block(index, seq):
        raise AssertionError(f"a torn or foreign block: starts {data[:32].hex()}")
    return index, seq


def target(index: int, seq: int) -> tuple[str, int, int]:
    """(vdisk, slot, byte offset) that write ``seq`` of agent ``index`` goes to."""
    slot = (seq // 2) % SLOTS
    return VDISKS[seq % 2], slot, index * REGION + slot * STRIDE


def retrying(io: Callable[[], None]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            io()
            return
        except LeaseExpired:  # ControllerUnreachable too: NOT READY, the initiator retries
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def main() -> int:
    try:
        return run()
    except TargetvirtError as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
        # at once: librados threads of a handle never shut down abort an orderly exit
        os._exit(2)


def probe_on_signal(location: str) -> None:
    """On SIGUSR1, write an object through this process's librados handle (the one its
    containers use) and print ``probe ok`` or ``probe <errno name>``: whether the storage
    still takes this process's writes, whatever the agent is doing."""
    from targetvirt.ceph import Cluster, RadosLocation, errno_of  # noqa: PLC0415
    from targetvirt.errors import ContainerIOError  # noqa: PLC0415

    loc = RadosLocation.parse(location)
    cluster = Cluster.get(loc, ContainerIOError)  # shared with the containers: same settings

    def probe(*_: object) -> None:
        # in the main thread, before it runs anything else: the answer comes first
        try:
            ioctx = cluster.ioctx(loc, ContainerIOError)
            ioctx.write_full(f"probe.{os.getpid()}", b"x")
            result = "ok"
        except Exception as e:  # noqa: BLE001 - reported, whatever it is
            result = errno.errorcode.get(errno_of(e) or 0, type(e).__name__)
        print(f"probe {result}", flush=True)

    signal.signal(signal.SIGUSR1, probe)


def run() -> int:
    sock, agent_id, index, log_path, stop = sys.argv[1:6]
    me = int(index)
    link: ControllerLink
    if sock.startswith("rados:"):
        from targetvirt.transport.follow import FollowingLink  # noqa: PLC0415

        link = FollowingLink(sock, call_timeout=5.0)
    else:
        link = NetworkLink(f"unix:{sock}", call_timeout=20.0)
    if len(sys.argv) > 6:
        from targetvirt.transport.rados_notify import RadosNotifyLink  # noqa: PLC0415

        link = RadosNotifyLink(link, sys.argv[6])
        probe_on_signal(sys.argv[6])
    agent = Agent(agent_id, link, host="test")
    agent.connect(VDISKS)
    agent.start()
    vdisks = {name: agent.vdisk(name) for name in VDISKS}
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    print("ready", flush=True)
    seq = 0
    check = bytearray(BLOCK)
    while seq % 64 or not os.path.exists(stop):
        seq += 1
        name, _, offset = target(me, seq)
        data = block(me, seq)
        start = time.monotonic()
        vd = vdisks[name]
        fua = FLUSH_EVERY > 0 and seq % 97 == 0
        retrying(partial(vd.write_from, offset, [memoryview(data)], fua))
        end = time.monotonic()
        os.write(log, RECORD.pack(seq, start, end))
        if seq % 7 == 0:  # read back through the agent's table: coherence after COW
            retrying(partial(vd.read_into, offset, [memoryview(check)]))
            if check != data:
                print(f"read back {decode_block(bytes(check))} after writing {seq}", flush=True)
                return 1
        if FLUSH_EVERY and seq % FLUSH_EVERY == 0:
            retrying(vd.flush)
    retrying(vdisks["a"].flush)
    os.close(log)
    print(f"done {seq}", flush=True)
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
