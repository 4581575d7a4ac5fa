"""Controller faults with real processes: ``targetvirt-controller`` on a state folder and
an agent process (tests/targetvirt/manage/agent_io.py) that writes -- every write a fresh
segment, so every write needs the controller -- and reads a marked block.

* SIGKILL and restart of the controller: the agent's writes wait, then go on with the new
  controller (the agent registers again and reloads its table);
* SIGSTOP (the agent is partitioned): once the lease has run out no write completes
  until SIGCONT, reads of the mapped block go on;
* at the end every acknowledged write is in the store.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from targetvirt.manage import daemon
from tests.targetvirt.manage.agent_io import BLOCK, MARK, READ, SEGMENT, SLOTS, WRITE, block, mark

ROOT = Path(__file__).resolve().parents[3]
LEASE = 2.0
MARGIN = 0.5  # a renewal sent just as the controller was being stopped


class Proc:
    """A child process whose output goes to a file, read for what it said."""

    def __init__(self, argv: list[str], out: Path) -> None:
        self.out = out
        self.start = out.stat().st_size if out.exists() else 0
        with open(out, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip

    def said(self) -> str:
        return self.out.read_bytes()[self.start :].decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.said():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.said()}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {self.said()}"
            time.sleep(0.05)

    def end(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    catalog = daemon.open_catalog(str(d))
    catalog.create_pool("p", str(tmp_path / "p.img"), (1 << 20) + 260 * SEGMENT,
                        segment_size=SEGMENT)  # fmt: skip
    catalog.create_vdisk("v", "p", (SLOTS + 1) * SEGMENT)
    catalog.close()
    return d


def records(path: Path, st: struct.Struct) -> list[tuple[float, ...]]:
    raw = path.read_bytes() if path.exists() else b""
    return [st.unpack_from(raw, i) for i in range(0, len(raw) - len(raw) % st.size, st.size)]


def writes_past(agent: Proc, log: Path, n: int, timeout: float = 60.0) -> None:
    """Wait until ``n`` more writes are acknowledged."""
    target = len(records(log, WRITE)) + n
    deadline = time.monotonic() + timeout
    while len(records(log, WRITE)) < target:
        assert agent.proc.poll() is None, agent.said()
        assert time.monotonic() < deadline, f"writes stalled at {len(records(log, WRITE))}"
        time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.end()


def test_controller_killed_and_stopped_under_agent_writes(
    tmp_path: Path, state: Path, procs: list[Proc]
) -> None:
    sock, log, stop = tmp_path / "ctl.sock", tmp_path / "writes", tmp_path / "stop"
    ctl_argv = ["-m", "targetvirt.manage.controld", "--state-dir", str(state), "--unix",
                str(sock), "--lease", str(LEASE)]  # fmt: skip
    ctl_log = tmp_path / "controller.log"
    procs.append(ctl := Proc(ctl_argv, ctl_log))
    ctl.wait_for("active: serving")
    procs.append(agent := Proc(["-m", "tests.targetvirt.manage.agent_io", str(sock), str(log),
                                str(stop)], tmp_path / "agent.out"))  # fmt: skip
    agent.wait_for("ready")
    writes_past(agent, log, 30)
    # SIGKILL, restart: the writes wait for the new controller, then go on
    ctl.proc.kill()
    ctl.proc.wait()
    procs.append(ctl := Proc(ctl_argv, ctl_log))
    ctl.wait_for("active: serving")
    writes_past(agent, log, 30)
    assert ctl.said().count("agent gw registered") == 1  # again, with the new controller
    # SIGSTOP past the lease, then SIGCONT
    stopped = time.monotonic()
    os.kill(ctl.proc.pid, signal.SIGSTOP)
    time.sleep(2 * LEASE + 1)
    continued = time.monotonic()
    os.kill(ctl.proc.pid, signal.SIGCONT)
    writes_past(agent, log, 30)
    stop.touch()
    assert agent.proc.wait(60) == 0, agent.said()
    ctl.proc.send_signal(signal.SIGTERM)
    assert ctl.proc.wait(60) == 0, ctl.said()

    expiry = stopped + LEASE + MARGIN
    done = records(log, WRITE)
    late = [(seq, end) for seq, start, end in done if start > expiry]
    assert late, "no write was issued after the lease ran out"
    assert all(end > continued for _, end in late), "a write completed without a lease"
    reads = records(Path(f"{log}.reads"), READ)
    assert all(ok for _, _, ok in reads)
    assert any(expiry < start and end < continued for start, end, _ in reads), (
        "no read completed while the agent had no lease"
    )
    # every acknowledged write is there (the last one of each slot)
    last = {int(seq) % SLOTS: int(seq) for seq, _, _ in done}
    catalog = daemon.open_catalog(str(state))
    try:
        v = catalog.vdisk("v")
        assert v.read(MARK, BLOCK) == mark()
        for slot, seq in last.items():
            assert v.read(slot * SEGMENT, BLOCK) == block(seq), (slot, seq)
    finally:
        catalog.close()
