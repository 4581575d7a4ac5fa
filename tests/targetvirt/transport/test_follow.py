"""FollowingLink: an agent follows the endpoint published in the store, moves when a
request finds its controller unreachable and the endpoint changed, and re-registers with
the new controller through the SessionLost path (in process, no Ceph: the look-up and the
links are injected; the store side is tested in tests/targetvirt/store/test_rados.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from targetvirt import protocol as p
from targetvirt.agent import Agent
from targetvirt.controller import Controller
from targetvirt.errors import ControllerUnreachable, StoreError
from targetvirt.transport import CommandHandler, ControllerLink
from targetvirt.transport.follow import FollowingLink
from targetvirt.transport.inprocess import InProcessLink
from tests.targetvirt.cluster import read, write
from tests.targetvirt.engine_model import SEG, open_catalog


class Switchable:
    """A link to one of several controllers by name; ``down`` ones are unreachable."""

    def __init__(self, name: str, controllers: dict[str, Controller], down: set[str]) -> None:
        self.name, self.controllers, self.down = name, controllers, down
        self.inner = InProcessLink(controllers[name])
        self.closed = False

    def call(self, request: p.Request) -> p.Reply:
        if self.closed or self.name in self.down:
            raise ControllerUnreachable(f"controller {self.name} is down")
        return self.inner.call(request)

    def open_commands(
        self, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        self.inner.open_commands(hello, handler, lost)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def test_a_request_that_finds_its_controller_gone_moves_to_the_published_one(
    tmp_path: Path,
) -> None:
    catalog = open_catalog(str(tmp_path / "meta.db"))
    catalog.create_pool("p", str(tmp_path / "c0"), (1 << 20) + 16 * SEG, segment_size=SEG)
    catalog.create_vdisk("v", "p", 4 * SEG)
    first = Controller(catalog, lease_seconds=10.0)
    controllers = {"A": first}
    down: set[str] = set()
    published: list[str | None] = ["A"]
    made: list[Switchable] = []

    def connect(endpoint: str) -> ControllerLink:
        made.append(Switchable(endpoint, controllers, down))
        return made[-1]

    link = FollowingLink("rados:unused", connect=connect, lookup=lambda: published[0])
    agent = Agent("gw", link, host="t")
    try:
        agent.connect(["v"])
        write(agent.vdisk("v"), 0, b"one")
        assert link.endpoint == "A" and link.follows == 0
        # A dies; until B publishes itself, requests fail (the agent retries later)
        down.add("A")
        with pytest.raises(ControllerUnreachable, match="controller A is down"):
            link.call(p.LeaseRenew("gw", agent.session))
        assert link.endpoint == "A" and len(made) == 1
        # B took over the (same) store: it knows nothing of the agent's session
        first.close()
        catalog = open_catalog(str(tmp_path / "meta.db"))
        controllers["B"] = Controller(catalog, lease_seconds=10.0)
        published[0] = "B"
        old_session = agent.session
        agent.renew_lease()  # SessionLost from B: the agent registers again there
        assert link.endpoint == "B" and link.follows == 1 and made[0].closed
        assert agent.session != old_session and agent.registrations == 2
        assert [s.agent_id for s in controllers["B"].sessions()] == ["gw"]
        write(agent.vdisk("v"), SEG, b"two")  # a new segment, from B
        assert read(agent.vdisk("v"), 0, 3) == b"one"
        assert catalog.vdisk("v").read(SEG, 3) == b"two"
    finally:
        agent.close()
        controllers.get("B", first).close()


def test_no_endpoint_or_an_unreadable_store_is_an_unreachable_controller() -> None:
    link = FollowingLink("rados:unused", connect=lambda e: pytest.fail("no endpoint to connect"),
                         lookup=lambda: None)  # fmt: skip
    with pytest.raises(ControllerUnreachable, match="no controller has published"):
        link.call(p.LeaseRenew("gw", 1))

    def broken() -> str | None:
        raise StoreError("cannot reach metadata store rados:p#targetvirt: timed out")

    link = FollowingLink("rados:unused", lookup=broken)
    with pytest.raises(ControllerUnreachable, match="cannot look up the active controller"):
        link.call(p.LeaseRenew("gw", 1))


def test_a_controller_without_authority_refuses_and_the_agent_moves_on(
    tmp_path: Path,
) -> None:
    """A fenced controller (its store lease ran out) refuses every request as
    unreachable -- no lease renewal from it -- and the link follows the new endpoint."""
    catalog = open_catalog(str(tmp_path / "meta.db"))
    catalog.create_pool("p", str(tmp_path / "c0"), (1 << 20) + 16 * SEG, segment_size=SEG)
    catalog.create_vdisk("v", "p", 4 * SEG)
    holds = [True]
    first = Controller(catalog, lease_seconds=10.0, authority=lambda: holds[0])
    controllers = {"A": first}
    published = ["A"]
    link = FollowingLink(
        "rados:unused", connect=lambda e: Switchable(e, controllers, set()),
        lookup=lambda: published[0],
    )  # fmt: skip
    agent = Agent("gw", link, host="t")
    second: Controller | None = None
    try:
        agent.connect(["v"])
        holds[0] = False  # A's store lease lapsed; nobody published another endpoint yet
        reply = link.call(p.LeaseRenew("gw", agent.session))
        assert isinstance(reply, p.Refused) and "no longer holds" in reply.message
        with pytest.raises(ControllerUnreachable, match="no longer holds"):
            agent.renew_lease()
        assert link.endpoint == "A"
        first.close()
        second = controllers["B"] = Controller(open_catalog(str(tmp_path / "meta.db")))
        published[0] = "B"
        agent.renew_lease()  # refused by A, answered (SessionLost) by B: registers there
        assert link.endpoint == "B" and [s.agent_id for s in second.sessions()] == ["gw"]
        write(agent.vdisk("v"), 0, b"after")
        assert second.catalog.vdisk("v").read(0, 5) == b"after"
    finally:
        agent.close()
        (second or first).close()
