"""Controller-command round trip to agent processes: RADOS watch/notify against gRPC.

A controller serves one vdisk to ``--agents`` agent processes (idle: nothing to drain)
and pushes ``CancelDelay`` to all of them ``--rounds`` times; one round trip is one
:meth:`Controller.cancel_delay` (command out to every agent, every ack back).  The same
in the same run with the agents' commands on the gRPC stream (Unix socket): the
baseline.  Requests go over the Unix socket in both cases.

By default a throwaway single-node memstore cluster is started; ``--conf FILE --pool
POOL [--id CLIENT]`` uses an existing one.

``python -m bench.notify [--agents 3] [--rounds 500] [--json]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.report import Row, print_json, print_table
from targetvirt.agent import Agent
from targetvirt.catalog import Catalog
from targetvirt.controller import Controller
from targetvirt.store.sqlite import SqliteStore
from targetvirt.transport import ControllerLink
from targetvirt.transport.network import ControllerServer, NetworkLink
from targetvirt.transport.rados_notify import RadosCommandBus, RadosNotifyLink

ROOT = Path(__file__).resolve().parents[1]
SEG = 1 << 20


@contextmanager
def location(args: argparse.Namespace) -> Iterator[str]:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    if args.conf:
        yield f"rados:{args.pool}/{ns}?conf={args.conf}" + (f"&id={args.id}" if args.id else "")
        return
    from tests.ceph_cluster import CephCluster  # noqa: PLC0415 - a throwaway cluster

    with CephCluster() as cluster:
        yield f"rados:{cluster.pool}/{ns}?conf={cluster.client_conf}"


def agent_main(sock: str, agent_id: str, rados: str | None) -> None:
    """An idle agent process: serves ``v`` until its stdin closes."""
    link: ControllerLink = NetworkLink(f"unix:{sock}")
    if rados:
        link = RadosNotifyLink(link, rados)
    agent = Agent(agent_id, link, host="bench")
    agent.connect(["v"])
    agent.start()
    print("ready", flush=True)
    sys.stdin.read()
    agent.close()


def start_agent(sock: str, agent_id: str, rados: str | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.notify", "agent", sock, agent_id, rados or ""],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def round_trips(tmp: Path, rados: str | None, agents: int, rounds: int) -> list[float]:
    """Seconds of each command round trip to ``agents`` agent processes."""
    catalog = Catalog.open(SqliteStore(str(tmp / f"meta-{uuid.uuid4().hex[:6]}.db"), create=True))
    catalog.create_pool("p", str(tmp / f"c-{uuid.uuid4().hex[:6]}"), (1 << 20) + 8 * SEG)
    catalog.create_vdisk("v", "p", 4 * SEG)
    controller = Controller(catalog, ack_timeout=10.0)
    sock = str(tmp / f"ctl-{uuid.uuid4().hex[:6]}.sock")
    server = ControllerServer(controller, unix_path=sock)
    bus = RadosCommandBus(controller, rados) if rados else None
    procs = [start_agent(sock, f"gw{i}", rados) for i in range(agents)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for _ in range(20):  # warm up
            controller.cancel_delay("v")
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            controller.cancel_delay("v")
            times.append(time.perf_counter() - t0)
        assert not controller.fenced, f"agents fenced: {controller.fenced}"
        return times
    finally:
        for proc in procs:
            proc.communicate(timeout=30)
        server.stop()
        if bus is not None:
            bus.close()
        controller.close()


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        agent_main(sys.argv[2], sys.argv[3], sys.argv[4] or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--conf", help="an existing cluster's ceph.conf")
    parser.add_argument("--pool", default="tv")
    parser.add_argument("--id", help="cephx user (without client.)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with location(args) as rados, tempfile.TemporaryDirectory() as tmp:
        notify = [t * 1000 for t in round_trips(Path(tmp), rados, args.agents, args.rounds)]
        grpc = [t * 1000 for t in round_trips(Path(tmp), None, args.agents, args.rounds)]
    rows = [
        Row(f"{name} to {args.agents} agents", fn(notify), "ms", "gRPC stream", fn(grpc),
            fn(notify) / fn(grpc))
        for name, fn in (("median round trip", statistics.median), ("p99 round trip", p99))
    ]  # fmt: skip
    if args.json:
        print_json({
            "notify_rtt_median_ms": rows[0].value,
            "notify_rtt_p99_ms": rows[1].value,
            "grpc_rtt_median_ms": rows[0].baseline_value,
            "grpc_rtt_p99_ms": rows[1].baseline_value,
        })  # fmt: skip
    else:
        print_table(
            f"controller command round trip, {args.rounds} rounds (ratio: notify / gRPC)", rows
        )


if __name__ == "__main__":
    main()
