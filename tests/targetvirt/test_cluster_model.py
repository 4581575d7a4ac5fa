"""Several agents and a controller against the reference model, under random sequences.

Random I/O from three agents (each serving the same vdisks, as multipath gateways do,
plus clones and snapshots they attach) interleaves with random controller operations:
live snapshots, clones and consistency-group snapshots in both freeze modes, freezes
and thaws, delays, live migration, rollback, resize, flatten, delete, controller restarts
and agent re-registrations.  Freezes are durable: they survive a controller restart
(the model keeps each one's deadline on the fake clock; a restart may come after some
time down, and a freeze whose timeout ran out meanwhile is thawed).  After every step,
every agent's view of every vdisk it serves, and the controller's master copy, equal
the model byte for byte; refcounts equal a recount.  One thread, a fake clock: a write
to a frozen vdisk fails at once (``frozen_timeout=0``) and leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from targetvirt import table as t
from targetvirt.errors import FrozenTimeout, PoolFull
from tests.targetvirt.cluster import Cluster, read
from tests.targetvirt.engine_model import SEG, Model, check_contents, check_refcounts, data_for

AGENTS = 3
SIZES = {"a": 5 * SEG + 1000, "b": 4 * SEG}
agents = st.integers(0, AGENTS - 1)
modes = st.sampled_from(["nowrite", "invalid"])
fractions = st.floats(0, 1)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tv-cluster-")
        self.c = Cluster(
            self.dir, vdisks=dict(SIZES), agents=AGENTS, frozen_timeout=0.0, containers=2,
            cow={"a": "redirect", "b": "copy"}, location=self.container_location,
            metadata=self.metadata_location(),
        )  # fmt: skip
        self.model = Model({n: bytearray(s) for n, s in SIZES.items()})
        self.serving = {i: {"a", "b"} for i in range(AGENTS)}
        # frozen vdisk -> when its timeout thaws it (fake clock; None: only a thaw)
        self.frozen: dict[str, float | None] = {}
        self.counter = 0

    def container_location(self, i: int) -> str | None:
        """Where container ``i`` lives (None: a file in the machine's folder)."""
        return None

    def metadata_location(self) -> str | None:
        """Where the metadata store lives (None: SQLite in the machine's folder)."""
        return None

    def teardown(self) -> None:
        self.c.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _served(self, agent: int, pick: int, writable: bool = True) -> str | None:
        names = sorted(
            n for n in self.serving[agent] if not writable or n not in self.model.readonly
        )
        return names[pick % len(names)] if names else None

    def _writable(self, pick: int) -> str:
        names = sorted(n for n in self.model.disks if n not in self.model.readonly)
        return names[pick % len(names)]

    def _span(self, name: str, where: float, length: int) -> tuple[int, int]:
        size = len(self.model.disks[name])
        offset = int(where * (size - 1))
        return offset, max(1, min(length, size - offset))

    # --- I/O from agents ---------------------------------------------------------------

    @rule(agent=agents, pick=st.integers(0, 9), where=fractions, length=st.integers(1, 2 * SEG),
          seed=st.integers(0, 2**32), fua=st.booleans())  # fmt: skip
    def write(self, agent: int, pick: int, where: float, length: int, seed: int, fua: bool) -> None:
        name = self._served(agent, pick)
        if name is None:
            return
        offset, length = self._span(name, where, length)
        data = data_for(seed, length)
        try:
            self.c.vd(agent, name).write_from(offset, [memoryview(data)], fua)
        except FrozenTimeout:
            assert name in self.frozen
            return
        except PoolFull:
            return  # faults happen before any byte is written
        assert name not in self.frozen
        self.model.write(name, offset, data)

    @rule(agent=agents, pick=st.integers(0, 9), where=fractions, length=st.integers(1, 3 * SEG),
          unmap=st.booleans())  # fmt: skip
    def write_zeroes(self, agent: int, pick: int, where: float, length: int, unmap: bool) -> None:
        name = self._served(agent, pick)
        if name is None:
            return
        offset, length = self._span(name, where, length)
        try:
            self.c.vd(agent, name).write_zeroes(offset, length, unmap)
        except FrozenTimeout:
            assert name in self.frozen
            return
        except PoolFull:
            self._resync(name)
            return
        self.model.zero(name, offset, length)

    def _resync(self, name: str) -> None:
        """After a partial failure the only allowed differences are zeroed ranges."""
        actual = self.c.catalog.vdisk(name).read(0, len(self.model.disks[name]))
        expected = self.model.disks[name]
        for i in range(0, len(actual), 512):
            a, e = actual[i : i + 512], expected[i : i + 512]
            assert a == e or a == bytes(len(a)), f"{name} lost data at {i}"
        self.model.disks[name] = bytearray(actual)

    @rule(agent=agents, pick=st.integers(0, 9), where=fractions, length=st.integers(1, 4096),
          match=st.booleans(), seed=st.integers(0, 2**32))  # fmt: skip
    def compare_and_write(
        self, agent: int, pick: int, where: float, length: int, match: bool, seed: int
    ) -> None:
        name = self._served(agent, pick)
        if name is None:
            return
        offset, length = self._span(name, where, length)
        verify = bytearray(self.model.disks[name][offset : offset + length])
        if not match:
            verify[seed % length] ^= 0xFF
        data = data_for(seed, length)
        try:
            got = self.c.vd(agent, name).compare_and_write(
                offset, memoryview(verify), memoryview(data)
            )
        except FrozenTimeout:
            # admitted as a write before it compares (the compare is under the write's
            # hold), so a frozen vdisk fails it whether or not it would have matched
            assert name in self.frozen
            return
        except PoolFull:
            return
        if match:
            assert got is None
            self.model.write(name, offset, data)
        else:
            assert got == seed % length

    @rule(agent=agents, other=agents, pick=st.integers(0, 9), where=fractions,
          length=st.integers(1, 4096), match=st.booleans(), seed=st.integers(0, 2**32),
          wwhere=fractions, wlength=st.integers(1, 2 * SEG),
          op=st.sampled_from(["none", "freeze", "snapshot", "migrate", "time"]))  # fmt: skip
    def caw_races(
        self, agent: int, other: int, pick: int, where: float, length: int, match: bool,
        seed: int, wwhere: float, wlength: int, op: str,
    ) -> None:  # fmt: skip
        """Between the controller's Exclusive grant and the compare, a controller command
        and then another agent's write: the write must wait (here: fail at once, with
        ``frozen_timeout=0``) if it touches the CAW's segments, and the CAW compares
        against the data after whatever did get through."""
        name = self._served(agent, pick)
        if name is None:
            return
        offset, length = self._span(name, where, length)
        verify = bytearray(self.model.disks[name][offset : offset + length])
        if not match:
            verify[seed % length] ^= 0xFF
        data = data_for(seed, length)
        vd = self.c.vd(agent, name)
        real = vd._caw_locally
        held: list[bool] = []

        def racing(o: int, v: memoryview, w: memoryview, until: float | None) -> int | None:
            if until is not None:  # not alone: the others are held
                self._race(
                    name, op, (agent, other), (wwhere, wlength), vd.segment_size, (offset, length)
                )
                held.append(True)
            return real(o, v, w, until)

        vd._caw_locally = racing  # type: ignore[method-assign]
        try:
            got = vd.compare_and_write(offset, memoryview(verify), memoryview(data))
        except FrozenTimeout:
            assert name in self.frozen
            return
        except PoolFull:
            return
        finally:
            del vd._caw_locally
        assert held or not any(name in self.serving[i] for i in range(AGENTS) if i != agent)
        current = self.model.disks[name][offset : offset + length]
        if current == verify:
            assert got is None
            self.model.write(name, offset, data)
        else:
            assert got == next(i for i in range(length) if current[i] != verify[i])

    def _race(
        self, name: str, op: str, agents: tuple[int, int], write: tuple[float, int], seg: int,
        span: tuple[int, int],
    ) -> None:  # fmt: skip
        """The controller command, then the other agent's write (see caw_races)."""
        (agent, other), (wwhere, wlength), (offset, length) = agents, write, span
        if op == "freeze" and name not in self.frozen:
            self.c.controller.freeze([name])
            self.c.controller.thaw([name])  # lifts everything but the CAW's hold
        elif op == "snapshot":
            snap = self._fresh("r")
            with contextlib.suppress(PoolFull):
                self.c.controller.snapshot(name, snap)
                self.model.disks[f"{name}@{snap}"] = bytearray(self.model.disks[name])
                self.model.readonly.add(f"{name}@{snap}")
        elif op == "migrate":
            index = offset // seg
            v = self.c.catalog.vdisk(name)
            if v.table[index] & t.MAPPED:
                with contextlib.suppress(PoolFull):
                    self.c.controller.migrate(name, index)
        elif op == "time":
            self.time_passes(3.0)  # (its hold lasts the lease: 10 s)
        if name not in self.serving[other]:
            return
        woff, wlen = self._span(name, wwhere, wlength)
        data = data_for(wlen, wlen)
        overlaps = woff // seg <= (offset + length - 1) // seg
        overlaps = overlaps and offset // seg <= (woff + wlen - 1) // seg
        held = overlaps and other != agent  # its own writes go on until its local hold
        try:
            self.c.vd(other, name).write_from(woff, [memoryview(data)], False)
        except FrozenTimeout:
            assert name in self.frozen or held
            return
        except PoolFull:
            return
        assert name not in self.frozen and not held
        self.model.write(name, woff, data)

    @rule(agent=agents)
    def flush(self, agent: int) -> None:
        self.c.agents[agent].flush()

    @rule(agent=agents, data=st.data())
    def serve(self, agent: int, data: st.DataObject) -> None:
        names = sorted(set(self.model.disks) - self.serving[agent])
        if names:
            name = data.draw(st.sampled_from(names))
            self.c.agents[agent].serve(name)
            self.serving[agent].add(name)

    @rule(agent=agents, pick=st.integers(0, 9))
    def release(self, agent: int, pick: int) -> None:
        name = self._served(agent, pick, writable=False)
        if name is not None and name not in SIZES:
            self.c.agents[agent].release(name)
            self.serving[agent].discard(name)

    # --- controller operations ------------------------------------------------------------

    @rule(pick=st.integers(0, 9), mode=modes)
    def snapshot(self, pick: int, mode: str) -> None:
        source = self._writable(pick)
        snap = self._fresh("s")
        try:
            self.c.controller.snapshot(source, snap, mode=mode)
        except PoolFull:
            return
        name = f"{source}@{snap}"
        self.model.disks[name] = bytearray(self.model.disks[source])
        self.model.readonly.add(name)

    @rule(data=st.data(), mode=modes)
    def clone(self, data: st.DataObject, mode: str) -> None:
        source = data.draw(st.sampled_from(sorted(self.model.disks)))
        name = self._fresh("k")
        try:
            self.c.controller.clone(source, name, mode=mode)
        except PoolFull:
            return
        self.model.disks[name] = bytearray(self.model.disks[source])

    @rule(mode=modes)
    def group_snapshot(self, mode: str) -> None:
        snap = self._fresh("g")
        try:
            self.c.controller.group_snapshot(["a", "b"], snap, mode=mode)
        except PoolFull:
            return
        for src in ("a", "b"):
            self.model.disks[f"{src}@{snap}"] = bytearray(self.model.disks[src])
            self.model.readonly.add(f"{src}@{snap}")

    @rule(pick=st.integers(0, 9), mode=modes, timeout=st.sampled_from([None, 5.0, 12.0]))
    def freeze(self, pick: int, mode: str, timeout: float | None) -> None:
        name = self._writable(pick)
        self.c.controller.freeze([name], mode=mode, timeout=timeout)
        self.frozen[name] = None if timeout is None else self.c.clock.now() + timeout

    @rule(pick=st.integers(0, 9))
    def thaw(self, pick: int) -> None:
        name = self._writable(pick)
        self.c.controller.thaw([name])
        self.frozen.pop(name, None)

    @rule(seconds=st.sampled_from([3.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self._advance(seconds)
        self.c.controller.tick()
        self._expire()

    def _expire(self) -> None:
        now = self.c.clock.now()
        for name in [n for n, until in self.frozen.items() if until is not None and until <= now]:
            del self.frozen[name]

    @rule(pick=st.integers(0, 9), expire=st.booleans(), agent=agents)
    def delay(self, pick: int, expire: bool, agent: int) -> None:
        name = self._writable(pick)
        self.c.controller.delay(name, 3.0)
        if expire:
            self._advance(4.0)
        else:
            self.c.controller.cancel_delay(name)
        if name in self.serving[agent]:  # released: I/O goes through
            n = min(16, len(self.model.disks[name]))
            assert read(self.c.vd(agent, name), 0, n) == self.model.disks[name][:n]

    def _advance(self, seconds: float) -> None:
        self.c.clock.advance(seconds)
        for a in self.c.agents:
            a.renew_lease()  # as their keepers would

    @rule(pick=st.integers(0, 9), which=st.integers(0, 100))
    def migrate(self, pick: int, which: int) -> None:
        names = sorted(self.model.disks)
        v = self.c.catalog.vdisk(names[pick % len(names)])
        mapped = v.table.mapped_indices().tolist()
        if not mapped:
            return
        try:
            self.c.controller.migrate(v.name, mapped[which % len(mapped)])
        except PoolFull:
            return

    @rule(pick=st.integers(0, 9), data=st.data())
    def rollback(self, pick: int, data: st.DataObject) -> None:
        name = self._writable(pick)
        snaps = sorted(n for n in self.model.disks if n.startswith(name + "@"))
        if snaps:
            snap = data.draw(st.sampled_from(snaps))
            self.c.controller.rollback(name, snap)
            self.model.disks[name] = bytearray(self.model.disks[snap])

    @rule(pick=st.integers(0, 9), size=st.integers(1, 6 * SEG + 1000))
    def resize(self, pick: int, size: int) -> None:
        name = self._writable(pick)
        try:
            self.c.controller.resize(name, size)
        except PoolFull:
            return
        self.model.resize(name, size)

    @rule(pick=st.integers(0, 9))
    def flatten(self, pick: int) -> None:
        name = self._writable(pick)
        try:
            self.c.controller.flatten(name)
        except PoolFull:
            return

    @precondition(lambda self: any(n not in SIZES for n in self.model.disks))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n in self.model.disks if n not in SIZES)))
        self.c.controller.delete(name, recursive=True)
        for n in [n for n in self.model.disks if n == name or n.startswith(name + "@")]:
            del self.model.disks[n]
            self.model.readonly.discard(n)
            self.frozen.pop(n, None)
            for served in self.serving.values():
                served.discard(n)

    @rule(down=st.sampled_from([0.0, 6.0]))
    def restart_controller(self, down: float) -> None:
        # (down for less than an agent's lease: they re-register, no waiting it out)
        self.c.restart_controller(down)
        for a in self.c.agents:
            a.renew_lease()  # session lost: registers again and rebuilds its tables
        assert self.c.controller.ready
        self._expire()  # durable freezes stay, but for those whose timeout ran out

    @invariant()
    def controller_knows_the_freezes(self) -> None:
        for name in self.model.disks:
            assert self.c.controller.frozen(name) == (name in self.frozen), name

    @rule(agent=agents)
    def reregister(self, agent: int) -> None:
        a = self.c.agents[agent]
        a.reconnect(a.session)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def agents_see_the_model(self) -> None:
        for i, served in self.serving.items():
            assert set(self.c.agents[i].vdisks) == served
            for name in served:
                vd = self.c.vd(i, name)
                expected = self.model.disks[name]
                assert vd.size == len(expected), f"gw{i} sees {name} at size {vd.size}"
                assert read(vd, 0, vd.size) == expected, f"gw{i} sees {name} differ from the model"

    @invariant()
    def controller_matches_the_model(self) -> None:
        check_contents(self.c.catalog, self.model)
        check_refcounts(self.c.catalog)


CLUSTER_SETTINGS = settings(
    max_examples=int(os.environ.get("TV_CLUSTER_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ClusterMachine.TestCase.settings = CLUSTER_SETTINGS
TestClusterModel = ClusterMachine.TestCase
