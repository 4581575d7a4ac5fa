"""The engine against a plain reference model, under random sequences of operations.

Every step is followed by a byte-for-byte comparison of every vdisk and snapshot with the
model, a recount of every refcount from the tables, and a comparison of the vdisks' freezes
(kept in their records: they survive every reopen, go with a deleted vdisk, are not copied
to snapshots or clones).
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.errors import InUse, PoolFull
from targetvirt.vdisk import Freeze
from tests.targetvirt.engine_model import (
    SEG,
    Model,
    check_contents,
    check_refcounts,
    data_for,
    open_catalog,
)

CONTAINER_SEGMENTS = 20
MAX_SIZE = 6 * SEG + 1000

sizes = st.integers(min_value=1, max_value=MAX_SIZE)
modes = st.sampled_from(["nowrite", "invalid"])


class EngineMachine(RuleBasedStateMachine):
    writable = Bundle("writable")
    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tv-model-")
        self.db = os.path.join(self.dir, "meta.db")
        self.counter = 0
        self.catalog = self.open_catalog()
        location, size = self.new_container()
        self.catalog.create_pool("p", location, size, segment_size=SEG, preallocate=True)
        self.model = Model()
        self.freezes: dict[str, Freeze] = {}

    # --- what variants change (the RADOS run: tests/targetvirt/test_catalog_model_rados.py)

    def open_catalog(self) -> Catalog:
        return open_catalog(self.db)

    def new_container(self) -> tuple[str, int]:
        """The location and size of the next container (CONTAINER_SEGMENTS segments)."""
        return self._path(), self._csize()

    def _path(self) -> str:
        self.counter += 1
        return os.path.join(self.dir, f"c{self.counter}")

    @staticmethod
    def _csize() -> int:
        return (1 << 20) + CONTAINER_SEGMENTS * SEG

    def teardown(self) -> None:
        self.catalog.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def _fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # --- creation --------------------------------------------------------------------

    @rule(target=writable, size=sizes, cow=st.sampled_from(["redirect", "copy"]))
    def create(self, size: int, cow: str) -> str:
        name = self._fresh("v")
        self.catalog.create_vdisk(name, "p", size, cow)  # type: ignore[arg-type]
        self.model.disks[name] = bytearray(size)
        return name

    @rule(target=snapshots, source=writable)
    def snapshot(self, source: str) -> object:
        if source not in self.model.disks:
            return multiple()
        snap = self._fresh("s")
        self.catalog.snapshot(source, snap)
        name = f"{source}@{snap}"
        self.model.disks[name] = bytearray(self.model.disks[source])
        self.model.readonly.add(name)
        return name

    @rule(target=writable, source=st.one_of(writable, snapshots))
    def clone(self, source: str) -> object:
        if source not in self.model.disks:
            return multiple()
        name = self._fresh("k")
        self.catalog.clone(source, name)
        self.model.disks[name] = bytearray(self.model.disks[source])
        return name

    @rule(a=writable, b=writable)
    def group_snapshot(self, a: str, b: str) -> None:
        if a == b or a not in self.model.disks or b not in self.model.disks:
            return
        snap = self._fresh("g")
        self.catalog.group_snapshot([a, b], snap)
        for src in (a, b):
            self.model.disks[f"{src}@{snap}"] = bytearray(self.model.disks[src])
            self.model.readonly.add(f"{src}@{snap}")

    # --- I/O ---------------------------------------------------------------------------

    @rule(name=writable, where=st.floats(0, 1), length=st.integers(1, 3 * SEG), seed=st.integers())
    def write(self, name: str, where: float, length: int, seed: int) -> None:
        if name not in self.model.disks:
            return
        size = len(self.model.disks[name])
        offset = int(where * (size - 1))
        length = min(length, size - offset)
        data = data_for(seed, length)
        try:
            self.catalog.vdisk(name).write(offset, data)
        except PoolFull:
            return  # nothing was written; the model stays as it was
        self.model.write(name, offset, data)

    @rule(name=writable, where=st.floats(0, 1), length=st.integers(1, 4 * SEG))
    def unmap(self, name: str, where: float, length: int) -> None:
        if name not in self.model.disks:
            return
        size = len(self.model.disks[name])
        offset = int(where * (size - 1))
        length = min(length, size - offset)
        try:
            self.catalog.vdisk(name).unmap(offset, length)
        except PoolFull:
            # whole-segment drops before the failure happened; re-read them from the engine
            self._resync(name)
            return
        self.model.zero(name, offset, length)

    def _resync(self, name: str) -> None:
        """After a partial failure, the only allowed differences are zeroed ranges."""
        v = self.catalog.vdisk(name)
        actual = v.read(0, v.size)
        expected = self.model.disks[name]
        for i in range(0, len(actual), 512):
            a, e = actual[i : i + 512], expected[i : i + 512]
            assert a == e or a == bytes(len(a)), f"{name} lost data at {i}"
        self.model.disks[name] = bytearray(actual)

    @rule(name=writable, size=sizes)
    def resize(self, name: str, size: int) -> None:
        if name not in self.model.disks:
            return
        try:
            self.catalog.resize(name, size)
        except PoolFull:
            return
        self.model.resize(name, size)

    @rule(name=writable, data=st.data())
    def rollback(self, name: str, data: st.DataObject) -> None:
        if name not in self.model.disks:
            return
        snaps = sorted(n for n in self.model.disks if n.startswith(name + "@"))
        if not snaps:
            return
        snap = data.draw(st.sampled_from(snaps))
        self.catalog.rollback(name, snap)
        self.model.disks[name] = bytearray(self.model.disks[snap])

    @rule(name=consumes(writable))
    def delete_vdisk(self, name: str) -> None:
        if name not in self.model.disks:
            return
        self.catalog.delete(name, recursive=True)
        for n in [n for n in self.model.disks if n == name or n.startswith(name + "@")]:
            del self.model.disks[n]
            self.model.readonly.discard(n)
            self.freezes.pop(n, None)

    @rule(name=consumes(snapshots))
    def delete_snapshot(self, name: str) -> None:
        if name not in self.model.disks:
            return
        self.catalog.delete(name, recursive=True)
        for n in [n for n in self.model.disks if n == name or n.startswith(name + "@")]:
            del self.model.disks[n]
            self.model.readonly.discard(n)
            self.freezes.pop(n, None)

    @rule(name=writable)
    def flatten(self, name: str) -> None:
        if name not in self.model.disks:
            return
        try:
            self.catalog.flatten(name)
        except PoolFull:
            return
        v = self.catalog.vdisk(name)
        assert all(v.pool.refcount(e) == 1 for _, e in v.table.iter_mapped())

    # --- freezes (the controller's, kept with the vdisks) ---------------------------------

    @rule(a=writable, b=st.one_of(writable, snapshots), mode=modes,
          until=st.sampled_from([None, 1.9e9, 1.9e9 + 0.25]), thaw_b=st.booleans())  # fmt: skip
    def freeze(self, a: str, b: str, mode: str, until: float | None, thaw_b: bool) -> None:
        """Freeze ``a`` and freeze or thaw ``b``, in one commit."""
        if a == b or a not in self.model.disks or b not in self.model.disks:
            return
        changes = {a: Freeze(mode, until), b: None if thaw_b else Freeze(mode)}
        self.catalog.set_freezes(changes)
        for name, freeze in changes.items():
            if freeze is None:
                self.freezes.pop(name, None)
            else:
                self.freezes[name] = freeze

    # --- placement ----------------------------------------------------------------------

    @rule(name=st.one_of(writable, snapshots), which=st.integers(0, 100))
    def migrate(self, name: str, which: int) -> None:
        if name not in self.model.disks:
            return
        v = self.catalog.vdisk(name)
        mapped = v.table.mapped_indices().tolist()
        if not mapped or len(v.pool.containers) < 2:
            return
        try:
            self.catalog.migrate(v, mapped[which % len(mapped)])
        except PoolFull:
            return

    @precondition(lambda self: len(self.catalog.pool("p").containers) < 4)
    @rule(preallocate=st.booleans())
    def add_container(self, preallocate: bool) -> None:
        # preallocated containers keep freed data in place: stale bytes must never show
        location, size = self.new_container()
        self.catalog.add_container("p", location, size, preallocate=preallocate)

    @rule(which=st.integers(0, 10))
    def evacuate_and_remove(self, which: int) -> None:
        pool = self.catalog.pool("p")
        cids = sorted(pool.containers)
        if len(cids) < 2:
            return
        cid = cids[which % len(cids)]
        try:
            self.catalog.evacuate("p", cid)
        except PoolFull:
            return
        try:
            self.catalog.remove_container("p", cid)
        except InUse:
            raise AssertionError("an evacuated container still holds segments") from None

    @rule()
    def flush_and_reopen(self) -> None:
        self.catalog.close()
        self.catalog = self.open_catalog()

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def contents_match(self) -> None:
        check_contents(self.catalog, self.model)

    @invariant()
    def freezes_match(self) -> None:
        frozen = {n: v.freeze for n, v in self.catalog.vdisks.items() if v.freeze is not None}
        assert frozen == self.freezes

    @invariant()
    def refcounts_match(self) -> None:
        check_refcounts(self.catalog)

    @invariant()
    def entries_in_bounds(self) -> None:
        for v in self.catalog.vdisks.values():
            assert len(v.table) == -(-v.size // SEG)
            for _, e in v.table.iter_mapped():
                c = v.pool.containers[t.cid_of(e)]
                assert t.pseg_of(e) < c.nsegments


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("TV_MODEL_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EngineMachine.TestCase.settings = MODEL_SETTINGS
TestEngineModel = EngineMachine.TestCase
