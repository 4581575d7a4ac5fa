"""Agent processes for multi-process tests, and the checks of what they wrote.

Each :class:`Gateway` runs ``tests.targetvirt.agent_child`` (sequence-numbered writes to
its own region, a log of acknowledged writes); :func:`cut_of` decodes a copy of a vdisk
and checks that it shows exactly one prefix ("cut") of each agent's writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from targetvirt.catalog import Catalog
from targetvirt.controller import FreezeWindow
from tests.targetvirt.agent_child import BLOCK, RECORD, SLOTS, STRIDE, decode_block, target
from tests.targetvirt.agent_child import REGION as CHILD_REGION

AGENTS = 3
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Write:
    seq: int
    start: float
    end: float


class Gateway:
    """One agent process and its write log (``rados``: commands by notify there)."""

    def __init__(self, tmp: Path, sock: str, index: int, rados: str | None = None) -> None:
        self.index = index
        self.log = tmp / f"gw{index}.log"
        self.stop = tmp / "stop"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.targetvirt.agent_child", sock, f"gw{index}",
             str(index), str(self.log), str(self.stop), *([rados] if rados else [])],
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


def wait_for_writes(gateways: list[Gateway], more: int, timeout: float = 60.0) -> None:
    """Until every gateway has acknowledged ``more`` writes beyond what it has now."""
    marks = [g.acked() + more for g in gateways]
    deadline = time.monotonic() + timeout
    while any(g.acked() < m for g, m in zip(gateways, marks, strict=True)):
        assert time.monotonic() < deadline, "the agents stopped making progress"
        for g in gateways:
            assert g.proc.poll() is None, f"gw{g.index} exited"
        time.sleep(0.005)  # waiting for the other processes' writes, not for time
