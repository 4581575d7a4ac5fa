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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from targetvirt.catalog import Catalog
from targetvirt.controller import Controller, FreezeWindow
from targetvirt.transport.network import ControllerServer
from tests.targetvirt.agent_child import (
    BLOCK,
    RECORD,
    SLOTS,
    STRIDE,
    VDISKS,
    decode_block,
    target,
)
from tests.targetvirt.agent_child import REGION as CHILD_REGION
from tests.targetvirt.engine_model import SEG, open_catalog

AGENTS = 3
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Write:
    seq: int
    start: float
    end: float


class Gateway:
    """One agent process and its write log."""

    def __init__(self, tmp: Path, sock: str, index: int) -> None:
        self.index = index
        self.log = tmp / f"gw{index}.log"
        self.stop = tmp / "stop"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.targetvirt.agent_child", sock, f"gw{index}",
             str(index), str(self.log), str(self.stop)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "ready\n", f"gw{index} did not start: {line!r}"

    def writes(self) -> list[Write]:
        raw = self.log.read_bytes() if self.log.exists() else b""
        return [Write(*RECORD.unpack_from(raw, i)) for i in range(0, len(raw), RECORD.size)]

    def acked(self) -> int:
        return self.log.stat().st_size // RECORD.size if self.log.exists() else 0

    def finish(self) -> int:
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"gw{self.index} failed: {out}"
        return int(out.split()[-1])


def cut_of(catalog: Catalog, names: dict[str, str], index: int) -> int:
    """The one per-agent cut a copy shows (``names``: source vdisk -> copy), checked."""
    found: dict[tuple[str, int], int] = {}
    for source, copy in names.items():
        v = catalog.vdisk(copy)
        for slot in range(SLOTS):
            data = v.read(index * CHILD_REGION + slot * STRIDE, BLOCK)
            got = decode_block(data)
            assert got is None or got[0] == index, f"{copy}: agent {index}'s slot holds {got}"
            found[source, slot] = 0 if got is None else got[1]
    cut = max(found.values())
    for (source, slot), seq in found.items():
        assert seq == expected_at(index, source, slot, cut), (
            f"{names}: agent {index} slot {slot} of {source} holds write {seq}, "
            f"which no single cut (here {cut}) explains"
        )
    return cut


def expected_at(index: int, vdisk: str, slot: int, cut: int) -> int:
    """The last write <= cut that went to (vdisk, slot), 0 if none."""
    for seq in range(cut, 0, -1):
        name, s, _ = target(index, seq)
        if (name, s) == (vdisk, slot):
            return seq
    return 0


def check_window(
    cut: int, writes: list[Write], window: FreezeWindow, sources: set[str], i: int
) -> None:
    relevant = [w for w in writes if target(i, w.seq)[0] in sources]
    before = [w.seq for w in relevant if w.end < window.started]
    after = [w.seq for w in relevant if w.start > window.frozen]
    assert not before or max(before) <= cut, (
        f"write {max(before)} acknowledged before the freeze is missing"
    )
    assert not after or min(after) > cut, (
        f"write {min(after)} begun after the freeze is in the copy"
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Controller, ControllerServer, str]]:
    catalog = open_catalog(str(tmp_path / "meta.db"))
    catalog.create_pool("p", str(tmp_path / "c0"), (1 << 20) + 400 * SEG, segment_size=SEG)
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
        progress = [g.acked() for g in gateways]
        deadline = time.monotonic() + 30
        while any(g.acked() < p + 40 for g, p in zip(gateways, progress, strict=True)):
            assert time.monotonic() < deadline, "the agents stopped making progress"
            time.sleep(0.005)  # waiting for the other processes' writes, not for time
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
