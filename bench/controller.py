"""Controller/agent benchmark: live-snapshot freeze window, COW fault cost, agent fast path.

Every row is measured against a baseline in the same run, on the same filesystem
(default: a folder in /dev/shm, so the storage medium does not hide the protocol's cost):

* freeze window of a live snapshot of a 1 TiB vdisk (1,048,576 entries of 1 MiB, fully
  allocated) served by 3 agent processes over the Unix-socket gRPC transport, while each
  agent writes 4 KiB blocks at random into its own working set (the load; every first
  write to a segment after a snapshot is a COW through the controller).  The window is
  how long I/O is held: each agent times, on its own clock, how long its copy of the
  table admitted no write (from applying the freeze to applying the thaw); a snapshot's
  window is the longest of its three agents.  It contains the agents' drain, the ack's
  way back, the durable catalog snapshot and the thaw's way out.  The controller's whole
  operation (from queueing the freeze to the last thaw ack, so also the freeze's way out
  and the thaw acks' way back, when nothing is held) is printed beside it.
  Median and p99 over >= 20 snapshots.  Target p99 <= 20 ms.  Baseline: the durable
  catalog snapshot alone (no agents), the floor of any live snapshot.
* a 4 KiB write that faults through the controller (redirect COW of a 1 MiB segment,
  coherence updates to the two other agents) vs a 4 KiB write to a private segment, both
  in an agent process over the Unix socket.  Ratio = fault / plain.
* 4 KiB random reads / writes through the agent's fast path vs os.preadv / os.pwritev on
  the container file in the same process (in-process agent).  Target >= 0.6.

``python -m bench.controller [--dir DIR] [--json] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.engine import MiB, TiB, fill_table
from bench.report import Row, median_time, print_json, print_table
from targetvirt.agent import Agent, AgentVDisk
from targetvirt.catalog import Catalog
from targetvirt.controller import Controller
from targetvirt.store.sqlite import SqliteStore
from targetvirt.transport.inprocess import InProcessLink
from targetvirt.transport.network import ControllerServer, NetworkLink

ROOT = Path(__file__).resolve().parents[1]
AGENTS = 3
WORKING_SET = 32  # segments each agent's load writes into
BLOCK = 4096


# --- the agent processes -----------------------------------------------------------------


def agent_main(sock: str, agent_id: str, index: int, iops: int) -> None:
    """An agent process driven by lines on stdin: load, idle, held, cow N, stop."""
    agent = Agent(agent_id, NetworkLink(f"unix:{sock}", call_timeout=60.0), host="bench")
    agent.connect(["tib"])
    agent.start()
    vd = agent.vdisk("tib")
    per_agent = (vd.size // vd.segment_size) // AGENTS
    first = index * per_agent
    stop_load = threading.Event()
    load: threading.Thread | None = None
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "load":
            stop_load.clear()
            load = threading.Thread(target=_load, args=(vd, first, iops, stop_load), daemon=True)
            load.start()
            print("loading", flush=True)
        elif cmd[0] == "idle":
            stop_load.set()
            if load is not None:
                load.join()
            print("idle", flush=True)
        elif cmd[0] == "held":  # seconds each whole-table freeze held writes, in order
            print("held", *vd.freezes_held, flush=True)
        elif cmd[0] == "cow":
            cow, plain = _cow(vd, first + WORKING_SET, int(cmd[1]))
            print(f"cow {cow} {plain}", flush=True)
        elif cmd[0] == "stop":
            break
    agent.close()


def _load(vd: AgentVDisk, first: int, iops: int, stop: threading.Event) -> None:
    """Random 4 KiB writes into the working set at ``iops`` per second (paced in 10 ms
    rounds: a gateway's load comes from its initiators, it is not a CPU-bound loop)."""
    rng = random.Random(first)
    buf = [memoryview(os.urandom(BLOCK))]
    seg = vd.segment_size
    per_round = max(1, iops // 100)
    next_round = time.monotonic()
    while not stop.is_set():
        for _ in range(per_round):
            offset = (first + rng.randrange(WORKING_SET)) * seg
            vd.write_from(offset + rng.randrange(seg // BLOCK) * BLOCK, buf, False)
        next_round += 0.01
        time.sleep(max(0.0, next_round - time.monotonic()))


def _cow(vd: AgentVDisk, first: int, n: int) -> tuple[float, float]:
    """Median seconds of a first 4 KiB write to n shared segments, then of a second one."""
    buf = [memoryview(os.urandom(BLOCK))]
    faults, plain = [], []
    for i in range(n):
        offset = (first + i) * vd.segment_size + 8192
        t0 = time.perf_counter()
        vd.write_from(offset, buf, False)
        faults.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        vd.write_from(offset, buf, False)
        plain.append(time.perf_counter() - t0)
    return statistics.median(faults), statistics.median(plain)


class AgentProcess:
    def __init__(self, sock: str, index: int, iops: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.controller", "--iops", str(iops),
             "--agent", sock, f"gw{index}", str(index)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.expect("ready")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().split()
        if not got or got[0] != word:
            raise RuntimeError(f"agent process said {got!r}, expected {word!r}")
        return got[1:]

    def stop(self) -> None:
        self.send("stop")
        self.proc.wait(timeout=60)


# --- measurements --------------------------------------------------------------------------


def bench_live_snapshots(
    workdir: str, snapshots: int, cow_segments: int, iops: int
) -> tuple[Row, Row, Row, Row, Row]:
    catalog = Catalog.open(SqliteStore(os.path.join(workdir, "tib.db"), create=True))
    # 2 TiB sparse container: the vdisk's 1 TiB plus room for copy-on-write
    catalog.create_pool("big", os.path.join(workdir, "big0"), MiB + 2 * TiB)
    catalog.create_vdisk("tib", "big", TiB)
    fill_table(catalog, "tib")
    base = []
    for i in range(3):  # the floor: a durable catalog snapshot with no agent involved
        t0 = time.perf_counter()
        catalog.snapshot("tib", f"base{i}")
        base.append(time.perf_counter() - t0)
        catalog.delete(f"tib@base{i}")
    controller = Controller(catalog, lease_seconds=30.0, ack_timeout=30.0)
    sock = os.path.join(workdir, "ctl.sock")
    server = ControllerServer(controller, unix_path=sock)
    controller.start()
    agents = [AgentProcess(sock, i, iops) for i in range(AGENTS)]
    try:
        for a in agents:
            a.send("load")
        for a in agents:
            a.expect("loading")
        operation = []
        for i in range(snapshots):
            time.sleep(0.2)  # the load re-faults (COW) its working set between snapshots
            controller.snapshot("tib", f"s{i}")
            w = controller.windows[-1]
            operation.append(w.held)
            if os.environ.get("TV_BENCH_DEBUG"):
                print(
                    f"freeze {(w.frozen - w.started) * 1e3:.1f} ms, copy+thaw "
                    f"{(w.thawed - w.frozen) * 1e3:.1f} ms",
                    file=sys.stderr,
                )
            controller.delete(f"tib@s{i}")  # outside the window: keeps COW space bounded
        for a in agents:
            a.send("idle")
        for a in agents:
            a.expect("idle")
        held = held_windows(agents, snapshots)
        controller.snapshot("tib", "cow")
        agents[0].send(f"cow {cow_segments}")
        fault_s, plain_s = (float(x) for x in agents[0].expect("cow"))
    finally:
        for a in agents:
            a.stop()
        server.stop()
        controller.close()
    base_ms = statistics.median(base) * 1e3
    med, p99 = (float(np.percentile(held, q)) * 1e3 for q in (50, 99))
    op_med, op_p99 = (float(np.percentile(operation, q)) * 1e3 for q in (50, 99))
    return (
        Row(f"live snapshot freeze window, 1 TiB, 3 agents x {iops} writes/s (median)", med,
            "ms", "durable catalog snapshot alone", base_ms, med / base_ms, "(informational)"),
        Row(f"live snapshot freeze window (p99 of {snapshots})", p99, "ms",
            "durable catalog snapshot alone", base_ms, p99 / base_ms, "<= 20 ms"),
        Row("the controller's whole live snapshot (median)", op_med, "ms",
            "durable catalog snapshot alone", base_ms, op_med / base_ms, "(informational)"),
        Row(f"the controller's whole live snapshot (p99 of {snapshots})", op_p99, "ms",
            "durable catalog snapshot alone", base_ms, op_p99 / base_ms, "(informational)"),
        Row("4 KiB write faulting through the controller (COW of 1 MiB)", fault_s * 1e6, "us",
            "4 KiB write to a private segment", plain_s * 1e6, fault_s / plain_s,
            "(ratio = fault/plain)"),
    )  # fmt: skip


def held_windows(agents: list[AgentProcess], snapshots: int) -> list[float]:
    """Per snapshot, the longest time any agent held writes for it (seconds)."""
    per_agent = []
    for a in agents:
        a.send("held")
        held = [float(x) for x in a.expect("held")]
        if len(held) != snapshots:  # one freeze per snapshot, or the pairing is wrong
            raise RuntimeError(f"an agent saw {len(held)} freezes for {snapshots} snapshots")
        per_agent.append(held)
    return [max(column) for column in zip(*per_agent, strict=True)]


def bench_fast_path(workdir: str, rounds: int, ops: int) -> tuple[Row, Row]:
    catalog = Catalog.open(SqliteStore(os.path.join(workdir, "io.db"), create=True))
    size = 1 << 30
    catalog.create_pool("io", os.path.join(workdir, "io0"), MiB + size)
    v = catalog.create_vdisk("v", "io", size)
    chunk = os.urandom(MiB)
    for off in range(0, size, MiB):
        v.write(off, chunk)
    catalog.commit()
    controller = Controller(catalog)
    agent = Agent("bench", InProcessLink(controller), host="bench")
    agent.connect(["v"])
    vd = agent.vdisk("v")
    fd = agent._containers[(v.pool.uuid, 0)].fd
    rng = random.Random(7)
    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(ops)]
    buf = [memoryview(bytearray(BLOCK))]

    def raw_read() -> None:
        for o in offsets:
            os.preadv(fd, buf, MiB + o)

    def our_read() -> None:
        for o in offsets:
            vd.read_into(o, buf)

    def raw_write() -> None:
        for o in offsets:
            os.pwritev(fd, buf, MiB + o)

    def our_write() -> None:
        for o in offsets:
            vd.write_from(o, buf, False)

    results = {}
    for name, raw, ours in (("read", raw_read, our_read), ("write", raw_write, our_write)):
        raw_t, our_t = [], []
        for _ in range(rounds):  # interleaved, so noise hits both sides alike
            raw_t.append(median_time(raw, 1))
            our_t.append(median_time(ours, 1))
        results[name] = (statistics.median(our_t) / ops * 1e6, statistics.median(raw_t) / ops * 1e6)
    agent.close()
    controller.close()
    return tuple(  # type: ignore[return-value]
        Row(f"4 KiB random {name} through the agent's fast path", ours, "us/op", f"os.p{name}v",
            raw, raw / ours, ">= 0.6 (ratio = baseline/ours)")
        for name, (ours, raw) in results.items()
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (for CI smoke)")
    parser.add_argument("--iops", type=int, default=5000, help="load: writes/s per agent")
    parser.add_argument(
        "--agent", nargs=3, metavar=("SOCKET", "ID", "INDEX"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.agent:
        agent_main(args.agent[0], args.agent[1], int(args.agent[2]), args.iops)
        return
    workdir = tempfile.mkdtemp(prefix="tv-bench-ctl-", dir=args.dir)
    try:
        med, p99, op_med, op_p99, cow = bench_live_snapshots(
            workdir, 20 if args.quick else 30, 16 if args.quick else 48, args.iops
        )
        read, write = bench_fast_path(
            workdir, 3 if args.quick else 7, 5000 if args.quick else 40000
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [med, p99, op_med, op_p99, cow, read, write]
    if args.json:
        print_json({
            "freeze_window_median_ms": med.value,
            "freeze_window_p99_ms": p99.value,
            "live_snapshot_operation_p99_ms": op_p99.value,
            "cow_fault_write_ratio": cow.ratio,
            "agent_rand4k_read_ratio": read.ratio,
            "agent_rand4k_write_ratio": write.ratio,
            "rows": [r.__dict__ for r in rows],
        })  # fmt: skip
    else:
        print_table("targetvirt controller/agent benchmark (same run, same filesystem)", rows)


if __name__ == "__main__":
    main()
