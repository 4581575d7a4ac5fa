"""Controller high availability on a real Ceph cluster: an active and a standby
controller process share a RADOS metadata store; agent processes follow the endpoint
the active one published there.

* SIGKILL the active controller: the standby fences it and takes over within the store
  lease (plus a margin), the agents register with it and go on writing -- copy-on-write
  after a live snapshot taken through the new controller needs new segments -- and every
  acknowledged write reads back; the snapshot holds one cut per agent that respects its
  freeze window.
* Freeze a vdisk with a timeout through the active controller, SIGKILL it: the standby
  keeps it frozen (the agents that register with it still hold their writes) and thaws
  it by itself once the timeout, counted from before the kill, has passed.
* SIGSTOP the active controller: its lease lapses, the standby blocklists it and takes
  over; woken up with SIGCONT, the old controller cannot commit any more.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest

from targetvirt import protocol as p
from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.controller import FreezeWindow
from targetvirt.store.rados import RadosStore, active_endpoint, store_owner
from targetvirt.transport.network import NetworkLink
from tests.targetvirt.agent_child import REGION, VDISKS, target
from tests.targetvirt.engine_model import SEG
from tests.targetvirt.gateways import Gateway, check_window, cut_of, wait_for_writes

if TYPE_CHECKING:
    from tests.ceph_cluster import CephCluster

pytestmark = pytest.mark.ceph
ROOT = Path(__file__).resolve().parents[2]
STORE_LEASE = 3  # seconds the store lock outlives a controller that stopped renewing it
MARGIN = 7.0  # what a takeover may take beyond the lease (fence, open, serve) on 2 busy cores
AGENTS = 2


class Child:
    """A controller process whose output lines (stdout or stderr) are read as they come."""

    def __init__(self, argv: list[str], *, stderr: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv], cwd=ROOT, text=True,
            stdin=None if stderr else subprocess.PIPE,
            stdout=None if stderr else subprocess.PIPE,
            stderr=subprocess.PIPE if stderr else None,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        stream = self.proc.stderr if stderr else self.proc.stdout
        assert stream is not None
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.strip())
        self._lines.put("<exited>")


class Ctl(Child):
    """A controller process (tests.targetvirt.controller_child) and its answers."""

    def __init__(self, tmp: Path, location: str, name: str, *extra: str) -> None:
        self.sock = str(tmp / f"{name}.sock")
        super().__init__(
            ["tests.targetvirt.controller_child", "--store", location,
             "--unix", self.sock, "--store-lease", str(STORE_LEASE), "--lease", "3",
             "--ack-timeout", "5", "--poll", "0.2", "--log-level", "warning", *extra],
        )  # fmt: skip

    def line(self, timeout: float = 60.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"controller {self.proc.pid} said nothing") from None

    def ask(self, command: str, timeout: float = 60.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def make_store(location: str) -> None:
    cat = Catalog.open(RadosStore(location, create=True))
    cat.create_pool("p", location, 400 * SEG, segment_size=SEG)
    for name in VDISKS:
        cat.create_vdisk(name, "p", AGENTS * REGION)
    cat.close()


def blocklist(ceph: CephCluster) -> str:
    _, out, _ = ceph.admin.mon_command(json.dumps({"prefix": "osd blocklist ls"}), b"")
    return str(out.decode())


@pytest.fixture
def ctls() -> Iterator[list[Ctl]]:
    made: list[Ctl] = []
    yield made
    for c in made:
        if c.proc.poll() is None and c.proc.stdin is not None:
            os.kill(c.proc.pid, signal.SIGCONT)
        c.kill()


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    made: list[Gateway] = []
    yield made
    for g in made:
        if g.proc.poll() is None:
            g.proc.kill()
            g.proc.wait()


@pytest.mark.parametrize("commands", ["grpc", "notify"])
def test_standby_takes_over_from_a_killed_controller(
    tmp_path: Path, rados_location: str, ceph: CephCluster, ctls: list[Ctl],
    gateways: list[Gateway], monkeypatch: pytest.MonkeyPatch, commands: str,
) -> None:  # fmt: skip
    """``commands``: on each agent's gRPC stream, or by RADOS watch/notify (the new
    controller's bus hears the agents' hellos once the old one is fenced)."""
    make_store(rados_location)
    # no flush, no FUA write: the mapping changes the killed controller made must be
    # durable by themselves (durable_mappings), or acknowledged writes would be lost
    monkeypatch.setenv("TV_AGENT_FLUSH_EVERY", "0")
    bus = ["--commands", rados_location] if commands == "notify" else []
    active = Ctl(tmp_path, rados_location, "ctl0", "--flush-interval", "3600", *bus)
    ctls.append(active)
    assert active.line() == "active"
    standby = Ctl(tmp_path, rados_location, "ctl1", "--standby", *bus)
    ctls.append(standby)
    assert standby.line() == "waiting"
    assert active_endpoint(rados_location) == f"unix:{active.sock}"
    old = store_owner(rados_location)
    assert old is not None and old["pid"] == active.proc.pid
    # the agents know no socket: they look the active controller up in the store
    notify = rados_location if commands == "notify" else None
    gateways.extend(Gateway(tmp_path, rados_location, i, notify) for i in range(AGENTS))
    wait_for_writes(gateways, 40)
    assert active.ask("agents") == "agents gw0 gw1"
    # a snapshot by the old controller: the writes that follow copy on write to segments
    # it allocates, acknowledged just before it dies
    words = active.ask("snapshot a s0").split()
    assert words[0] == "window", words
    window0 = FreezeWindow(("a",), "nowrite", *map(float, words[1:]))
    wait_for_writes(gateways, 16)

    killed = time.monotonic()
    active.kill()
    assert standby.line(STORE_LEASE + MARGIN) == "active"
    took = time.monotonic() - killed
    assert took < STORE_LEASE + MARGIN
    assert active_endpoint(rados_location) == f"unix:{standby.sock}"
    assert all(a in blocklist(ceph) for a in old["addrs"])  # the dead one is fenced too
    assert standby.ask("await gw0 gw1") == "agents gw0 gw1"  # they registered again
    wait_for_writes(gateways, 40)  # and write on

    # a live snapshot through the new controller; writes after it copy on write: every
    # agent needs new segments, allocated by the new controller
    words = standby.ask("snapshot a s1").split()
    assert words[0] == "window", words
    window = FreezeWindow(("a",), "nowrite", *map(float, words[1:]))
    wait_for_writes(gateways, 60)
    sink = "NotifySink" if commands == "notify" else "StreamSink"
    assert standby.ask("sinks") == f"sinks {sink} {sink}"
    (tmp_path / "stop").touch()
    last = [g.finish() for g in gateways]
    assert standby.ask("quit") == "bye"

    reader = Catalog.open(RadosStore(rados_location, readonly=True))
    try:
        a, snap = reader.vdisk("a"), reader.vdisk("a@s1")
        for i, g in enumerate(gateways):
            writes = g.writes()
            assert [w.seq for w in writes] == list(range(1, last[i] + 1))
            check_window(cut_of(reader, {"a": "a@s0"}, i), writes, window0, {"a"}, i)
            check_window(cut_of(reader, {"a": "a@s1"}, i), writes, window, {"a"}, i)
            # every acknowledged write reads back, those before the takeover included
            assert cut_of(reader, {v: v for v in VDISKS}, i) == last[i]
            segs = range(i * REGION // SEG, (i + 1) * REGION // SEG)
            for s in segs:  # redirected after the snapshot: a new segment each
                assert snap.table[s] & t.MAPPED and a.table[s] & t.MAPPED
                assert t.location(a.table[s]) != t.location(snap.table[s])
    finally:
        reader.close()
    print(f"takeover after SIGKILL: {took:.2f} s")


def test_a_stopped_controller_is_fenced_and_cannot_commit(
    tmp_path: Path, rados_location: str, ceph: CephCluster, ctls: list[Ctl],
    gateways: list[Gateway], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Hung, not dead: the agents' requests to it time out (5 s), then they find the
    standby that took over once its store lease lapsed."""
    make_store(rados_location)
    monkeypatch.setenv("TV_AGENT_FLUSH_EVERY", "0")
    active = Ctl(tmp_path, rados_location, "ctl0", "--flush-interval", "3600")
    ctls.append(active)
    assert active.line() == "active"
    assert active.ask("commit 1") == "ok"
    standby = Ctl(tmp_path, rados_location, "ctl1", "--standby")
    ctls.append(standby)
    assert standby.line() == "waiting"
    old = store_owner(rados_location)
    assert old is not None and old["pid"] == active.proc.pid
    gateways.extend(Gateway(tmp_path, rados_location, i) for i in range(AGENTS))
    wait_for_writes(gateways, 40)
    words = active.ask("snapshot b s0").split()  # copy on write to come on b
    assert words[0] == "window", words
    wait_for_writes(gateways, 16)

    stopped = time.monotonic()
    os.kill(active.proc.pid, signal.SIGSTOP)  # hung, not dead: only its lease can lapse
    assert standby.line(STORE_LEASE + MARGIN) == "active"
    took = time.monotonic() - stopped
    assert took < STORE_LEASE + MARGIN
    assert all(a in blocklist(ceph) for a in old["addrs"])
    assert active_endpoint(rados_location) == f"unix:{standby.sock}"
    assert standby.ask("commit 2") == "ok"
    assert standby.ask("await gw0 gw1") == "agents gw0 gw1"
    wait_for_writes(gateways, 40)

    os.kill(active.proc.pid, signal.SIGCONT)
    # woken up, it answers agents only with a refusal: no lease from a fenced controller
    probe = NetworkLink(f"unix:{active.sock}", call_timeout=30.0)
    try:
        reply = probe.call(p.Register("intruder", "test", ()))
    finally:
        probe.close()
    assert isinstance(reply, p.Refused) and "no longer holds" in reply.message, reply
    answer = active.ask("commit 3")
    assert answer.startswith("error StoreLocked"), answer
    assert "fenced" in answer or "taken over" in answer, answer
    assert standby.ask("commit 4") == "ok"
    wait_for_writes(gateways, 20)
    (tmp_path / "stop").touch()
    last = [g.finish() for g in gateways]
    assert standby.ask("quit") == "bye"
    reader = Catalog.open(RadosStore(rados_location, readonly=True))
    try:
        notes = reader.store.load().records["note"]
        for i, g in enumerate(gateways):
            assert [w.seq for w in g.writes()] == list(range(1, last[i] + 1))
            assert cut_of(reader, {v: v for v in VDISKS}, i) == last[i]
    finally:
        reader.close()
    assert {k: v["by"] for k, v in notes.items()} == {
        1: active.proc.pid, 2: standby.proc.pid, 4: standby.proc.pid,
    }  # fmt: skip
    print(f"takeover after SIGSTOP: {took:.2f} s")


def test_a_freeze_outlives_the_controller_that_set_it(
    tmp_path: Path, rados_location: str, ctls: list[Ctl], gateways: list[Gateway]
) -> None:
    make_store(rados_location)
    active = Ctl(tmp_path, rados_location, "ctl0")
    ctls.append(active)
    assert active.line() == "active"
    standby = Ctl(tmp_path, rados_location, "ctl1", "--standby")
    ctls.append(standby)
    assert standby.line() == "waiting"
    gateways.extend(Gateway(tmp_path, rados_location, i) for i in range(AGENTS))
    wait_for_writes(gateways, 40)
    # long enough to outlast the takeover (at most STORE_LEASE + MARGIN), short enough
    # for the agents' writes to wait it out (their frozen_timeout: 30 s)
    timeout = STORE_LEASE + MARGIN + 5.0
    words = active.ask(f"freeze b {timeout}").split()
    assert words[0] == "froze", words
    started, frozen = map(float, words[1:])
    active.kill()
    assert standby.line(STORE_LEASE + MARGIN) == "active"
    assert standby.ask("await gw0 gw1") == "agents gw0 gw1"
    assert standby.ask("frozen b") == "frozen yes"  # the predecessor's freeze holds
    while standby.ask("frozen b") == "frozen yes":  # until its timer thaws it
        assert time.monotonic() < started + timeout + 60, "the freeze never thawed"
        time.sleep(0.1)  # waiting for the other process's timer, not for time
    wait_for_writes(gateways, 40)
    (tmp_path / "stop").touch()
    last = [g.finish() for g in gateways]
    assert standby.ask("quit") == "bye"
    reader = Catalog.open(RadosStore(rados_location, readonly=True))
    try:
        for i, g in enumerate(gateways):
            writes = g.writes()
            assert [w.seq for w in writes] == list(range(1, last[i] + 1))
            held = [w for w in writes if target(i, w.seq)[0] == "b" and w.start > frozen]
            assert held, f"gw{i} wrote nothing to b after the freeze"
            # the thaw came at the deadline (wall clock) set before the freeze was in place
            early = [w.seq for w in held if w.end < started + timeout]
            assert not early, f"gw{i}'s writes {early} to b went through the freeze"
            assert cut_of(reader, {v: v for v in VDISKS}, i) == last[i]
            assert reader.vdisk("b").freeze is None
    finally:
        reader.close()


class Cli(Child):
    """``targetvirt-controller`` itself (python -m targetvirt.manage.controld); its log
    lines (stderr) tell what it does."""

    def __init__(self, tmp: Path, location: str, name: str, *extra: str) -> None:
        self.sock = str(tmp / f"{name}.sock")
        super().__init__(
            ["targetvirt.manage.controld", "--store", location,
             "--unix", self.sock, "--store-lease", str(STORE_LEASE), "--poll", "0.2",
             "--log-level", "info", *extra],
            stderr=True,
        )  # fmt: skip

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """The first log line containing ``text`` (fails at exit or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"targetvirt-controller never said {text!r}") from None
            if text in line:
                return line
            assert line != "<exited>", f"targetvirt-controller exited before {text!r}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def test_the_controller_command_hands_over_and_a_fenced_one_exits(
    tmp_path: Path, rados_location: str
) -> None:
    make_store(rados_location)
    clis = [Cli(tmp_path, rados_location, "c0")]
    try:
        clis[0].expect(f"active: serving agents at unix:{clis[0].sock}")
        clis.append(Cli(tmp_path, rados_location, "c1", "--standby"))
        # SIGTERM: a clean stop releases the store; the standby needs no fencing
        clis[0].proc.terminate()
        assert clis[0].proc.wait(30) == 0
        clis[1].expect(f"active: serving agents at unix:{clis[1].sock}")
        assert active_endpoint(rados_location) == f"unix:{clis[1].sock}"
        # the new active one hangs, a third takes over; woken up, it finds itself fenced
        # (its lease renewal fails) and exits at once with status 3
        clis.append(Cli(tmp_path, rados_location, "c2", "--standby"))
        os.kill(clis[1].proc.pid, signal.SIGSTOP)
        clis[2].expect(f"active: serving agents at unix:{clis[2].sock}")
        os.kill(clis[1].proc.pid, signal.SIGCONT)
        clis[1].expect("lost the store")
        assert clis[1].proc.wait(30) == 3
        assert active_endpoint(rados_location) == f"unix:{clis[2].sock}"
        # a standby stopped while it waits exits cleanly, leaving the active one alone
        clis.append(Cli(tmp_path, rados_location, "c3", "--standby"))
        clis[3].expect("in use by")  # refused once: it waits
        clis[3].proc.terminate()
        assert clis[3].proc.wait(30) == 0
        assert active_endpoint(rados_location) == f"unix:{clis[2].sock}"
        clis[2].proc.terminate()
        assert clis[2].proc.wait(30) == 0
        assert active_endpoint(rados_location) is None
    finally:
        for c in clis:
            c.kill()
