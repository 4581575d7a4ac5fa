"""Three agent processes over the Unix-socket gRPC transport write to the same vdisks
(each its own region, as multipath gateways do) while the controller takes live
snapshots, clones and consistency-group snapshots.

Every copy must equal exactly one state that respects the order of each agent's writes
(a per-agent cut: every write up to it, none after), contain every write acknowledged
before the freeze began and none that began after the freeze was in place; the group
snapshot must use one cut per agent across both vdisks; and at the end no acknowledged
write is lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from targetvirt.catalog import Catalog
from targetvirt.controller import Controller
from targetvirt.store.rados import RadosStore
from targetvirt.transport.network import ControllerServer
from tests.conftest import Layout
from tests.targetvirt.agent_child import REGION as CHILD_REGION
from tests.targetvirt.agent_child import VDISKS
from tests.targetvirt.ats_child import COUNTER as ATS_COUNTER
from tests.targetvirt.engine_model import SEG, open_catalog
from tests.targetvirt.gateways import ROOT, Gateway, check_window, cut_of, wait_for_writes

AGENTS = 3


@pytest.fixture
def setup(tmp_path: Path, layout: Layout) -> Iterator[tuple[Controller, ControllerServer, str]]:
    """Files, RADOS or both: the agent processes open the containers themselves.  With
    every container in RADOS the metadata store is in RADOS too (issue 7: the live-copy
    test on the RADOS container and the RADOS store)."""
    everything_in_rados = layout(0) is not None and layout(1) is not None
    if everything_in_rados:
        catalog = Catalog.open(RadosStore(str(layout(0)), create=True))
    else:
        catalog = open_catalog(str(tmp_path / "meta.db"))
    for i in range(2):
        where, size = layout(i), 200 * SEG
        if where is None:
            where, size = str(tmp_path / f"c{i}"), (1 << 20) + size
        if i == 0:
            catalog.create_pool("p", where, size, segment_size=SEG)
        else:
            catalog.add_container("p", where, size)
    for name in VDISKS:
        catalog.create_vdisk(name, "p", AGENTS * CHILD_REGION)
    controller = Controller(catalog, lease_seconds=10.0, ack_timeout=10.0)
    sock = str(tmp_path / "ctl.sock")
    server = ControllerServer(controller, unix_path=sock)
    controller.start()
    yield controller, server, sock
    server.stop()
    controller.close()


def test_live_copies_under_three_agent_processes(
    tmp_path: Path, setup: tuple[Controller, ControllerServer, str]
) -> None:
    controller, _, sock = setup
    assert os.stat(sock).st_mode & 0o777 == 0o600
    gateways = [Gateway(tmp_path, sock, i) for i in range(AGENTS)]
    assert controller.servers("a") == ["gw0", "gw1", "gw2"]
    plan: list[tuple[str, dict[str, str]]] = []
    for n in range(12):
        wait_for_writes(gateways, 40)
        mode = ("nowrite", "invalid")[n % 2]
        if n % 3 == 0:
            controller.snapshot("a", f"s{n}", mode=mode)
            plan.append(("snapshot", {"a": f"a@s{n}"}))
        elif n % 3 == 1:
            controller.clone("b", f"k{n}", mode=mode)
            plan.append(("clone", {"b": f"k{n}"}))
        else:
            controller.group_snapshot(["a", "b"], f"g{n}", mode=mode)
            plan.append(("group", {"a": f"a@g{n}", "b": f"b@g{n}"}))
    (tmp_path / "stop").touch()
    last = [g.finish() for g in gateways]
    windows = list(controller.windows)
    assert len(windows) == len(plan)
    catalog = controller.catalog
    for i, g in enumerate(gateways):
        writes = g.writes()
        assert [w.seq for w in writes] == list(range(1, last[i] + 1))
        for (_, names), window in zip(plan, windows, strict=True):
            cut = cut_of(catalog, names, i)
            check_window(cut, writes, window, set(names), i)
        # nothing acknowledged is lost: the live vdisks hold exactly the last cut
        assert cut_of(catalog, {v: v for v in VDISKS}, i) == last[i]
    held = sorted(w.held for w in windows)
    print(
        f"freeze windows: median {held[len(held) // 2] * 1e3:.1f} ms, max {held[-1] * 1e3:.1f} ms"
    )


def test_ats_locking_through_three_agent_processes(
    tmp_path: Path, setup: tuple[Controller, ControllerServer, str]
) -> None:
    """VMFS's ATS through every gateway at once: each agent process swaps a free lock word
    for its own with COMPARE AND WRITE, bumps a counter in another segment (a plain
    read and write, protected by the lock alone) and frees the lock.  A CAW that was not
    atomic across agents lets two hold the lock: an update is lost, or a release finds
    the lock taken.  (Three processes: every CAW goes through the controller's hold.)"""
    controller, _, sock = setup
    rounds, go = 100, tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.targetvirt.ats_child",
                sock,
                f"gw{i}",
                str(i),
                str(rounds),
                str(go),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(AGENTS)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    assert controller.servers("a") == ["gw0", "gw1", "gw2"]
    go.touch()
    misses = 0
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"gw{i}: {out}"
        misses += int(out.split()[-1])
    v = controller.catalog.vdisk("a")
    assert v.read(0, 512) == bytes(512)  # free at the end
    assert int.from_bytes(v.read(ATS_COUNTER, 8), "little") == AGENTS * rounds  # none lost
    print(f"ATS: {AGENTS * rounds} acquisitions, {misses} miscompares")
