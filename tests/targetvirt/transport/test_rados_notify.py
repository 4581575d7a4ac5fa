"""Commands over RADOS watch/notify: agent processes get them through the vdisk headers
they watch, a hung one is blocklisted by the storage and the controller goes on at once,
live snapshots keep two agents coherent."""

from __future__ import annotations

import json
import os
import signal
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt import protocol as p
from targetvirt.agent import Agent, AgentVDisk
from targetvirt.catalog import Catalog
from targetvirt.controller import Controller
from targetvirt.errors import InvalidArgument, ProtocolError
from targetvirt.transport.inprocess import InProcessLink
from targetvirt.transport.network import ControllerServer
from targetvirt.transport.rados_notify import (
    NotifySink,
    RadosCommandBus,
    RadosNotifyLink,
    decode_acks,
    decode_batch,
    decode_hello,
    encode_acks,
    encode_batch,
    encode_hello,
)
from tests.fuzzing import fuzz_settings, one_line
from tests.targetvirt.agent_child import REGION, VDISKS
from tests.targetvirt.cluster import write
from tests.targetvirt.engine_model import SEG, open_catalog
from tests.targetvirt.gateways import Gateway, check_window, cut_of, wait_for_writes

if TYPE_CHECKING:
    from tests.ceph_cluster import CephCluster


class Site:
    """A controller on RADOS containers: requests over a Unix socket, commands by notify."""

    def __init__(self, tmp: Path, location: str, *, lease: float, ack_timeout: float) -> None:
        self.tmp, self.location = tmp, location
        self.db = str(tmp / "meta.db")
        self.lease, self.ack_timeout = lease, ack_timeout
        catalog = open_catalog(self.db)
        catalog.create_pool("p", location, 400 * SEG, segment_size=SEG)
        catalog.add_container("p", location, 400 * SEG)  # somewhere to migrate to
        for name in VDISKS:
            catalog.create_vdisk(name, "p", 3 * REGION)
        self.sock = str(tmp / "ctl.sock")
        self._serve(catalog)

    def _serve(self, catalog: Catalog) -> None:
        self.controller = Controller(
            catalog, lease_seconds=self.lease, ack_timeout=self.ack_timeout, lease_margin=0.2
        )
        self.server = ControllerServer(self.controller, unix_path=self.sock)
        self.bus = RadosCommandBus(self.controller, self.location)
        self.controller.start()

    def restart(self) -> None:
        self.close()
        self._serve(open_catalog(self.db))

    def gateway(self, index: int) -> Gateway:
        return Gateway(self.tmp, self.sock, index, rados=self.location)

    def close(self) -> None:
        self.server.stop()
        self.bus.close()
        self.controller.close()


@pytest.fixture
def site(tmp_path: Path, rados_location: str) -> Iterator[Site]:
    s = Site(tmp_path, rados_location, lease=10.0, ack_timeout=10.0)
    yield s
    s.close()


def _kill(gateways: list[Gateway]) -> None:
    for g in gateways:
        if g.proc.poll() is None:
            g.proc.kill()
            g.proc.wait()


def test_frames_round_trip_and_refuse_garbage() -> None:
    update = p.Update(0, "a", array("Q", [1, 2]), array("Q", [7, 8]))
    raw = encode_batch(
        [([(5, 1), (6, 9)], p.encode(update)), ([(5, 2)], p.encode(p.Block(0, "a")))]
    )
    assert decode_batch(raw) == [({5: 1, 6: 9}, update), ({5: 2}, p.Block(0, "a"))]
    acks = [(5, p.Ack(1)), (5, p.Ack(2, False, "no"))]
    assert decode_acks(encode_acks(acks)) == acks
    hello = p.Hello("gw1", 77)
    assert decode_hello(encode_hello(hello, ["127.0.0.1:0/1"]).encode()) == (
        hello, ["127.0.0.1:0/1"],
    )  # fmt: skip
    for garbage in (b"", b"\x01\x00\x00\x00", raw[:-1], raw + b"x"):
        with pytest.raises(ProtocolError):
            decode_batch(garbage)
    with pytest.raises(ProtocolError):
        decode_hello(b"not base64!")


@fuzz_settings(1000)
@given(st.binary(max_size=300), st.integers(0, 2), st.binary(max_size=64))
def test_fuzz_damaged_frames_only_ever_raise_protocol_error(
    noise: bytes, which: int, splice: bytes
) -> None:
    """Whatever a watcher or the controller receives: a frame, or ProtocolError."""
    good = [
        encode_batch([([(5, 1)], p.encode(p.SetState(0, "a", 0, 4, 1)))]),
        encode_acks([(5, p.Ack(1))]),
        encode_hello(p.Hello("gw", 5), ["127.0.0.1:0/9"]).encode(),
    ][which]
    cut = len(noise) % (len(good) + 1)
    for data in (noise, good[:cut] + splice + good[cut:], good[:cut]):
        for decode in (decode_batch, decode_acks, decode_hello):
            try:
                decode(data)
            except ProtocolError as e:
                assert one_line(str(e)), str(e)


@pytest.mark.ceph
def test_commands_reach_agent_processes_by_notify_and_snapshots_stay_coherent(
    site: Site,
) -> None:
    gateways = [site.gateway(i) for i in range(2)]
    try:
        wait_for_writes(gateways, 20)
        sessions = site.controller.sessions()
        assert len(sessions) == 2 and all(isinstance(s.sink, NotifySink) for s in sessions)
        assert site.controller.servers("a") == ["gw0", "gw1"]
        before = site.bus.notifies
        site.controller.snapshot("a", "s1")
        wait_for_writes(gateways, 20)
        site.controller.group_snapshot(["a", "b"], "g")
        window = site.controller.windows[-1]
        wait_for_writes(gateways, 20)
        # the other commands, while the agents write
        site.controller.block(["b"])
        site.controller.unblock(["b"])
        site.controller.delay("a", 0.2)
        site.controller.cancel_delay("a")
        site.controller.migrate("a", 0)  # to the other container: hold, copy, update
        site.controller.freeze(["b"], mode="invalid")
        site.controller.thaw(["b"])
        wait_for_writes(gateways, 20)
        assert site.bus.notifies > before  # freezes, marks and thaws went by notify
        assert site.controller.fenced == []
        (site.tmp / "stop").touch()
        last = [g.finish() for g in gateways]
        catalog = site.controller.catalog
        for i, g in enumerate(gateways):
            writes = g.writes()
            assert [w.seq for w in writes] == list(range(1, last[i] + 1))
            cut = cut_of(catalog, {"a": "a@g", "b": "b@g"}, i)
            check_window(cut, writes, window, set(VDISKS), i)
            assert cut_of(catalog, {v: v for v in VDISKS}, i) == last[i]
    finally:
        _kill(gateways)


@pytest.mark.ceph
def test_a_hung_agent_is_blocklisted_and_the_controller_goes_on(
    tmp_path: Path, rados_location: str, ceph: CephCluster
) -> None:
    # a lease far longer than the test: going on means the storage fenced the agent
    site = Site(tmp_path, rados_location, lease=600.0, ack_timeout=3.0)
    gateways = [site.gateway(i) for i in range(2)]
    try:
        wait_for_writes(gateways, 20)
        os.kill(gateways[1].proc.pid, signal.SIGSTOP)  # it will never answer the freeze
        done = threading.Event()
        snap = threading.Thread(target=lambda: (site.controller.snapshot("a", "s"), done.set()))
        snap.start()
        snap.join(60)
        assert done.is_set(), "the snapshot waited for the hung agent's lease"
        assert site.controller.fenced == ["gw1"]
        assert site.controller.servers("a") == ["gw0"]
        addrs = site.bus.blocklisted["gw1"]
        _, out, _ = ceph.admin.mon_command(json.dumps({"prefix": "osd blocklist ls"}), b"")
        assert addrs and all(a in out.decode() for a in addrs), out
        wait_for_writes(gateways[:1], 20)  # the other agent was thawed
        # woken up, the fenced agent's process can no longer write to the pool: the OSD
        # refuses its client (ESHUTDOWN is Ceph's EBLOCKLISTED), whatever the agent does
        # (its I/O fails on that refusal, or for want of a lease once it learns that its
        # session is gone -- and it cannot register again)
        os.kill(gateways[1].proc.pid, signal.SIGUSR1)  # pending until it runs again
        os.kill(gateways[1].proc.pid, signal.SIGCONT)
        stdout = gateways[1].proc.stdout
        assert stdout is not None
        assert stdout.readline() == "probe ESHUTDOWN\n"  # before the agent runs on
        gateways[1].proc.kill()
        wait_for_writes(gateways[:1], 20)
        (tmp_path / "stop").touch()
        last = gateways[0].finish()
        assert cut_of(site.controller.catalog, {v: v for v in VDISKS}, 0) == last
    finally:
        _kill(gateways)
        site.close()


@pytest.mark.ceph
def test_agent_processes_watch_again_for_a_restarted_controller(
    tmp_path: Path, rados_location: str
) -> None:
    site = Site(tmp_path, rados_location, lease=3.0, ack_timeout=3.0)
    gateways = [site.gateway(i) for i in range(2)]
    try:
        wait_for_writes(gateways, 20)
        site.restart()
        wait_for_writes(gateways, 40)  # registered again, said hello to the new bus
        sessions = site.controller.sessions()
        assert sorted(s.agent_id for s in sessions) == ["gw0", "gw1"]
        assert all(isinstance(s.sink, NotifySink) for s in sessions)
        site.controller.snapshot("b", "after")
        wait_for_writes(gateways, 20)
        assert site.controller.fenced == [] and site.bus.notifies > 0
        (tmp_path / "stop").touch()
        last = [g.finish() for g in gateways]
        for i in range(2):
            assert cut_of(site.controller.catalog, {v: v for v in VDISKS}, i) == last[i]
    finally:
        _kill(gateways)
        site.close()


@pytest.mark.ceph
def test_a_hello_for_a_session_the_controller_does_not_know_is_refused(
    tmp_path: Path, rados_location: str
) -> None:
    catalog = open_catalog(str(tmp_path / "meta.db"))
    controller = Controller(catalog, ack_timeout=3.0)
    bus = RadosCommandBus(controller, rados_location)
    link = RadosNotifyLink(InProcessLink(controller), rados_location)
    try:
        lost = threading.Event()
        link.open_commands(p.Hello("stranger", 12345), lambda cmd: None, lost.set)
        assert lost.is_set() and controller.sessions() == []
    finally:
        link.close()
        bus.close()
        controller.close()


@pytest.mark.ceph
def test_an_agent_of_the_controllers_own_process_is_fenced_by_its_lease_only(
    tmp_path: Path, rados_location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocklisting it would blocklist the controller too: it waits for the lease."""
    catalog = open_catalog(str(tmp_path / "meta.db"))
    catalog.create_pool("p", rados_location, 16 * SEG, segment_size=SEG)
    catalog.create_vdisk("v", "p", 4 * SEG)
    controller = Controller(catalog, lease_seconds=3.0, ack_timeout=3.0, lease_margin=0.2)
    bus = RadosCommandBus(controller, rados_location)
    agent = Agent("gw", RadosNotifyLink(InProcessLink(controller), rados_location), host="t")
    release = threading.Event()
    try:
        agent.connect(["v"])
        write(agent.vdisk("v"), 0, b"before")
        monkeypatch.setattr(AgentVDisk, "apply", lambda self, cmd: release.wait(30))
        controller.freeze(["v"])  # the agent never acks: fenced, after its lease
        assert controller.fenced == ["gw"] and bus.blocklisted == {}
        assert catalog.vdisk("v").read(0, 6) == b"before"  # our own handle still works
        catalog.vdisk("v").write(0, b"after!")
    finally:
        release.set()
        agent.close()
        bus.close()
        controller.close()


def test_the_notify_timeout_must_fit_twice_in_the_ack_timeout(tmp_path: Path) -> None:
    """librados counts whole seconds: a 2 s ack timeout leaves no room for two notifies."""
    controller = Controller(open_catalog(str(tmp_path / "meta.db")), ack_timeout=2.0)
    try:
        with pytest.raises(InvalidArgument, match="notify timeout"):
            RadosCommandBus(controller, "rados:pool")
        with pytest.raises(InvalidArgument, match="notify timeout"):
            RadosCommandBus(controller, "rados:pool", timeout=0)
    finally:
        controller.close()
