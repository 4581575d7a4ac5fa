"""A controller and several agents in one process, on a fake clock (test helper)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from targetvirt.agent import Agent, AgentVDisk
from targetvirt.catalog import Catalog
from targetvirt.clock import Clock, FakeClock
from targetvirt.controller import Controller
from targetvirt.store.rados import RadosStore
from targetvirt.transport.inprocess import InProcessLink
from tests.targetvirt.engine_model import SEG, open_catalog

CONTAINER_SEGMENTS = 48
WALL_ORIGIN = 1.8e9  # the wall clock (seconds since the epoch) when the fake clock reads 0


class ShiftedClock:
    """Another process's view of a fake clock: the same time passing, read from another
    origin (a monotonic clock starts anywhere in each process, or on each host)."""

    def __init__(self, base: FakeClock, offset: float) -> None:
        self.base, self.offset = base, offset

    def now(self) -> float:
        return self.base.now() + self.offset

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        self.base.wait(cond, None if deadline is None else deadline - self.offset)


class Cluster:
    """``agents`` agents (gw0, gw1...) serving ``vdisks`` through in-process links that
    round-trip every message through the codec."""

    def __init__(
        self,
        directory: str,
        *,
        vdisks: dict[str, int] | None = None,
        agents: int = 3,
        cow: str | dict[str, str] = "redirect",
        lease: float = 10.0,
        ack_timeout: float = 2.0,
        frozen_timeout: float = 30.0,
        containers: int = 1,
        segments: int = CONTAINER_SEGMENTS,
        encode: bool = True,
        location: Callable[[int], str | None] | None = None,
        metadata: str | None = None,
    ) -> None:
        """``location(i)``: where container ``i`` lives (e.g. a RADOS location); None,
        or no function, for a preallocated file in ``directory``.  ``metadata``: the
        RADOS location of the metadata store (None: SQLite in ``directory``)."""
        self.metadata = metadata
        self.dir = directory
        self.clock = FakeClock()
        self.lease, self.ack_timeout, self.encode = lease, ack_timeout, encode
        self.restarts = 0
        self.catalog = self._open_catalog()
        for i in range(containers):
            where = location(i) if location is not None else None
            size = segments * SEG  # segment space: a file adds its 1 MiB header
            if where is None:
                where, size = self._path(f"c{i}"), (1 << 20) + size
            if i == 0:
                self.catalog.create_pool("p", where, size, segment_size=SEG, preallocate=True)
            else:
                self.catalog.add_container("p", where, size, preallocate=True)
        vdisks = vdisks if vdisks is not None else {"v": 8 * SEG}
        for name, vsize in vdisks.items():
            mode = cow if isinstance(cow, str) else cow[name]
            self.catalog.create_vdisk(name, "p", vsize, mode)  # type: ignore[arg-type]
        self.controller = self._controller(self.catalog)
        self.links = [InProcessLink(self.controller, encode=encode) for _ in range(agents)]
        self.agents = [
            Agent(f"gw{i}", link, clock=self.clock, frozen_timeout=frozen_timeout, host="test")
            for i, link in enumerate(self.links)
        ]
        for agent in self.agents:
            agent.connect(list(vdisks))

    @property
    def db(self) -> str:
        return os.path.join(self.dir, "meta.db")

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def wallclock(self) -> float:
        """The catalog's wall clock: it moves with the fake clock."""
        return WALL_ORIGIN + self.clock.now()

    def _open_catalog(self) -> Catalog:
        if self.metadata is not None:
            return Catalog.open(RadosStore(self.metadata, create=True), self.wallclock)
        return open_catalog(self.db, self.wallclock)

    def _controller(self, catalog: Catalog) -> Controller:
        # each controller "process" reads the time from an origin of its own: nothing
        # of a predecessor's monotonic clock may mean anything to it
        clock: Clock = ShiftedClock(self.clock, -1000.0 * self.restarts)
        return Controller(
            catalog, clock=clock, lease_seconds=self.lease, ack_timeout=self.ack_timeout,
            lease_margin=0.5,
        )  # fmt: skip

    def vd(self, agent: int, name: str = "v") -> AgentVDisk:
        return self.agents[agent].vdisk(name)

    def restart_controller(self, down: float = 0.0) -> Controller:
        """Stop the controller and start a new one on the same store, ``down`` (fake)
        seconds later; links follow."""
        self.controller.close()
        self.clock.advance(down)
        self.restarts += 1
        self.catalog = self._open_catalog()
        self.controller = self._controller(self.catalog)
        for link in self.links:
            link.retarget(self.controller)
        return self.controller

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        self.controller.close()


def write(vd: AgentVDisk, offset: int, data: bytes, fua: bool = False) -> None:
    vd.write_from(offset, [memoryview(data)], fua)


def read(vd: AgentVDisk, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    vd.read_into(offset, [memoryview(buf)])
    return bytes(buf)


class Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            self.error = e

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background operation did not finish"
        if self.error is not None:
            raise self.error
        return self.value

    def still_running(self, settle: float = 0.2) -> bool:
        """True if it has not finished within ``settle`` real seconds (it is blocked)."""
        self.thread.join(settle)
        return self.thread.is_alive()


def drive(clock: FakeClock, bg: Background, step: float, limit: int = 400) -> Any:
    """Advance fake time in steps until ``bg`` finishes (each step lets threads react)."""
    for _ in range(limit):
        if bg.done:
            break
        clock.advance(step)
        bg.thread.join(0.02)
    return bg.result()
