"""The gRPC transport: who may connect, what bad bytes get, a hung agent process fenced,
and agent processes reconnecting to a restarted controller."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from targetvirt import protocol as p
from targetvirt.agent import Agent
from targetvirt.catalog import Catalog
from targetvirt.controller import Controller
from targetvirt.errors import ControllerUnreachable, ProtocolError
from targetvirt.transport.network import _CALL, ControllerServer, NetworkLink
from targetvirt.transport.tls import CertificateAuthority, Credentials
from tests.targetvirt.agent_child import REGION, VDISKS
from tests.targetvirt.cluster import read, write
from tests.targetvirt.engine_model import SEG, open_catalog
from tests.targetvirt.gateways import Gateway, check_window, cut_of, wait_for_writes


class Site:
    """A controller serving on a Unix socket and on TCP with mutual TLS."""

    def __init__(self, tmp: Path, *, lease: float = 10.0, ack_timeout: float = 10.0) -> None:
        self.tmp = tmp
        self.db = str(tmp / "meta.db")
        self.lease, self.ack_timeout = lease, ack_timeout
        catalog = open_catalog(self.db)
        catalog.create_pool("p", str(tmp / "c0"), (1 << 20) + 200 * SEG, segment_size=SEG)
        for name in VDISKS:
            catalog.create_vdisk(name, "p", 3 * REGION)
        self.ca = CertificateAuthority.create()
        self.sock = str(tmp / "ctl.sock")
        self._serve(catalog)

    def _serve(self, catalog: Catalog) -> None:
        self.controller = Controller(
            catalog, lease_seconds=self.lease, ack_timeout=self.ack_timeout, lease_margin=0.2
        )
        self.server = ControllerServer(
            self.controller, unix_path=self.sock, tcp="127.0.0.1:0",
            tls=self.ca.issue_server(["localhost"]),
        )  # fmt: skip
        self.controller.start()
        self.target = f"127.0.0.1:{self.server.port}"

    def restart(self) -> None:
        self.server.stop()
        self.controller.close()
        self._serve(open_catalog(self.db))

    def tls_link(self, creds: Credentials) -> NetworkLink:
        return NetworkLink(self.target, tls=creds, server_name="localhost", call_timeout=5.0)

    def close(self) -> None:
        self.server.stop()
        self.controller.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


def test_the_unix_socket_is_private_and_serves_agents(site: Site) -> None:
    assert os.stat(site.sock).st_mode & 0o777 == 0o600
    agents = [Agent(f"u{i}", NetworkLink(f"unix:{site.sock}"), host="t") for i in range(2)]
    try:
        for a in agents:
            a.connect(["a"])
        write(agents[0].vdisk("a"), 0, b"over the socket")
        assert read(agents[1].vdisk("a"), 0, 15) == b"over the socket"
        site.controller.snapshot("a", "s")
        write(agents[1].vdisk("a"), 0, b"OVER")
        assert read(agents[0].vdisk("a"), 0, 8) == b"OVER the"
    finally:
        for a in agents:
            a.close()


def test_an_agent_with_its_certificate_is_accepted_over_tls(site: Site) -> None:
    agent = Agent("gw-tls", site.tls_link(site.ca.issue_agent("gw-tls")), host="t")
    try:
        agent.connect(["b"])
        write(agent.vdisk("b"), SEG, b"tls")
        assert site.controller.catalog.vdisk("b").read(SEG, 3) == b"tls"
        assert site.controller.servers("b") == ["gw-tls"]
    finally:
        agent.close()


def test_strangers_are_refused(site: Site) -> None:
    other_ca = CertificateAuthority.create()
    own = site.ca.issue_agent("gw1")
    cases = {
        "a certificate from another CA": other_ca.issue_agent("gw1"),
        "another agent's certificate": site.ca.issue_agent("gw2"),
        "the controller's own certificate": site.ca.issue_server(["localhost"]),
    }
    for why, creds in cases.items():
        agent = Agent("gw1", site.tls_link(Credentials(own.ca_pem, creds.cert_pem, creds.key_pem)))
        with pytest.raises(ControllerUnreachable):
            agent.connect(["a"])
        agent.close()
        assert site.controller.sessions() == [], why
    # no client certificate at all
    channel = grpc.secure_channel(
        site.target, grpc.ssl_channel_credentials(root_certificates=site.ca.ca_pem),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(_CALL)(p.encode(p.Register("gw1", "h", ())), timeout=5)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    channel.close()
    # a stranger posing as the controller: the agent does not trust its certificate
    rogue = ControllerServer(
        site.controller, tcp="127.0.0.1:0", tls=other_ca.issue_server(["localhost"])
    )
    try:
        link = NetworkLink(
            f"127.0.0.1:{rogue.port}", tls=own, server_name="localhost", call_timeout=5.0
        )
        with pytest.raises(ControllerUnreachable):
            link.call(p.LeaseRenew("gw1", 1))
        link.close()
    finally:
        rogue.stop()
    assert site.controller.sessions() == []


def test_malformed_requests_get_a_protocol_error(site: Site) -> None:
    channel = grpc.insecure_channel(f"unix:{site.sock}")
    call = channel.unary_unary(_CALL)
    for garbage in (b"", b"\x01", b"\x07\x01zzzz", p.encode(p.Done()), p.encode(p.Ack(1))):
        reply = p.decode_as(call(garbage, timeout=5), p.Refused)
        assert p.ERRORS[reply.code] is ProtocolError
    channel.close()


def test_a_hung_agent_process_is_fenced_and_the_controller_goes_on(tmp_path: Path) -> None:
    site = Site(tmp_path, lease=2.0, ack_timeout=1.0)
    gateways = [Gateway(tmp_path, site.sock, i) for i in range(2)]
    try:
        wait_for_writes(gateways, 20)
        os.kill(gateways[1].proc.pid, signal.SIGSTOP)  # it will never ack the freeze
        done = threading.Event()
        snap = threading.Thread(target=lambda: (site.controller.snapshot("a", "s"), done.set()))
        snap.start()
        snap.join(30)
        assert done.is_set(), "the snapshot did not go on without the hung agent"
        assert site.controller.fenced == ["gw1"]
        assert site.controller.servers("a") == ["gw0"]
        wait_for_writes(gateways[:1], 20)  # the others were thawed
        os.kill(gateways[1].proc.pid, signal.SIGKILL)
        gateways[1].proc.wait()
        (tmp_path / "stop").touch()
        last = gateways[0].finish()
        assert cut_of(site.controller.catalog, {v: v for v in VDISKS}, 0) == last
    finally:
        for g in gateways:
            if g.proc.poll() is None:
                g.proc.kill()
        site.close()


def test_agent_processes_reconnect_to_a_restarted_controller(tmp_path: Path) -> None:
    site = Site(tmp_path, lease=3.0)
    gateways = [Gateway(tmp_path, site.sock, i) for i in range(3)]
    try:
        wait_for_writes(gateways, 30)
        site.restart()
        assert not site.controller.ready  # three agents may still hold leases
        wait_for_writes(gateways, 60)  # they came back (and faults work again)
        assert site.controller.ready and site.controller.servers("a") == ["gw0", "gw1", "gw2"]
        site.controller.group_snapshot(["a", "b"], "after")
        window = site.controller.windows[-1]
        wait_for_writes(gateways, 20)
        (tmp_path / "stop").touch()
        last = [g.finish() for g in gateways]
        catalog = site.controller.catalog
        for i, g in enumerate(gateways):
            writes = g.writes()
            assert [w.seq for w in writes] == list(range(1, last[i] + 1))
            cut = cut_of(catalog, {"a": "a@after", "b": "b@after"}, i)
            check_window(cut, writes, window, set(VDISKS), i)
            assert cut_of(catalog, {v: v for v in VDISKS}, i) == last[i]
    finally:
        for g in gateways:
            if g.proc.poll() is None:
                g.proc.kill()
        site.close()
