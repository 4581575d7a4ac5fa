"""Crash consistency: a workload killed with SIGKILL at random instants, many times.

After each kill the store reopens, the checker finds no damage, and every vdisk holds,
byte for byte, its state after the last completed operation, give or take the operation
the kill interrupted: the page cache and the journal survive the process, so not even an
unflushed write that completed is lost.  Every third kill the store is reopened as after
a reboot (another boot id): the journal is discarded, and each vdisk holds either its
state at the last completed flush or the data of a write issued after it (an unflushed
write may be lost, torn, or kept; nothing else may appear).

The same on Ceph (marker ``ceph``): the RADOS store and a RADOS container, and with the
OSD (bluestore) killed too, or killed and restarted under a live workload.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from targetvirt.catalog import Catalog
from targetvirt.check import check
from targetvirt.store.rados import RadosStore
from tests.targetvirt.crash_child import open_store
from tests.targetvirt.engine_model import SEG

if TYPE_CHECKING:
    from tests.ceph_cluster import CephCluster

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("TV_CRASH_KILLS", "60"))
CEPH_KILLS = int(os.environ.get("TV_CEPH_CRASH_KILLS", "25"))
OSD_KILLS = int(os.environ.get("TV_CEPH_OSD_KILLS", "5"))

State = dict[str, bytearray]
Op = dict[str, object]


def apply_op(state: State, op: Op) -> None:
    name = str(op["name"])
    off, n = int(op["offset"]), int(op["length"])  # type: ignore[arg-type]
    if op["op"] == "write":
        state[name][off : off + n] = random.Random(op["seed"]).randbytes(n)  # type: ignore[arg-type]
    else:
        state[name][off : off + n] = bytes(n)


def apply_durable(state: State, op: Op) -> None:
    if op["op"] == "snapshot":
        state[f"{op['name']}@{op['snap']}"] = bytearray(state[str(op["name"])])
    elif op["op"] == "clone":
        state[str(op["clone"])] = bytearray(state[str(op["name"])])
    elif op["op"] == "delete":
        name = str(op["name"])
        for n in [n for n in state if n == name or n.startswith(name + "@")]:
            del state[n]


def created_name(op: Op) -> str | None:
    if op["op"] == "snapshot":
        return f"{op['name']}@{op['snap']}"
    if op["op"] == "clone":
        return str(op["clone"])
    return None


def replay(
    start: State, log: list[str], actual_names: set[str], *, journaled: bool = False
) -> tuple[State, list[Op]]:
    """The durable state at the last certain durable point, and the ops that may follow it.

    ``journaled``: every completed write and unmap is durable too (a kill of the process;
    the journal is replayed), only an interrupted one is a maybe.
    """
    durable = {k: bytearray(v) for k, v in start.items()}
    pending: list[Op] = []
    ops: list[tuple[Op, bool]] = []
    for line in log:
        if line.startswith("B "):
            ops.append((json.loads(line[2:]), False))
        elif line == "E":
            ops[-1] = (ops[-1][0], True)
    for op, completed in ops:
        if op["op"] in ("write", "unmap"):
            if journaled and completed:
                apply_op(durable, op)
            else:  # done or torn: a maybe either way until the next durable point
                pending.append(op)
            continue
        done = completed
        if not done:  # a durable op cut short: did its commit happen?
            made = created_name(op)
            if made is not None and made in actual_names:
                done = True
            if op["op"] == "delete" and str(op["name"]) not in actual_names:
                done = True
        if done:
            for p in pending:
                apply_op(durable, p)
            pending = []
            apply_durable(durable, op)
    return durable, pending


def verify(catalog: Catalog, durable: State, pending: list[Op]) -> State:
    assert set(catalog.vdisks) == set(durable), "the set of vdisks is not the durable one"
    actual_state: State = {}
    for name, base in durable.items():
        v = catalog.vdisk(name)
        actual = np.frombuffer(v.read(0, v.size), dtype=np.uint8)
        expect = np.frombuffer(bytes(base), dtype=np.uint8)
        ok = actual == expect
        for op in pending:
            if op["name"] != name:
                continue
            cand = bytearray(base)
            apply_op({name: cand}, op)
            lo, hi = int(op["offset"]), int(op["offset"]) + int(op["length"])  # type: ignore[arg-type]
            ok[lo:hi] |= actual[lo:hi] == np.frombuffer(bytes(cand[lo:hi]), dtype=np.uint8)
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, (
            f"{name}: {bad.size} bytes hold data never written there (first at {bad[0]})"
        )
        actual_state[name] = bytearray(actual.tobytes())
    return actual_state


def crash_loop(
    tmp_path: Path,
    kills: int,
    location: str | None = None,
    *,
    seed: int = 1234,
    before_kill: Callable[[], None] | None = None,
    after_kill: Callable[[], None] | None = None,
) -> None:
    """Run the workload ``kills`` times, SIGKILL it at a random instant, verify each time.

    ``before_kill`` / ``after_kill`` bracket the kill (the Ceph variant kills and restarts
    the OSD there).
    """
    rng = random.Random(seed)
    state: State = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "ops.log"
    for kill in range(kills):
        log_path.unlink(missing_ok=True)
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.targetvirt.crash_child",
                str(tmp_path),
                str(rng.getrandbits(32)),
                *([location] if location else []),
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
        )
        # wait until the child is into its workload, then kill at a random instant
        deadline = time.monotonic() + 30
        while not (log_path.exists() and log_path.stat().st_size > 2):
            assert child.poll() is None, (
                f"workload died: {child.stderr.read().decode() if child.stderr else ''}"
            )
            assert time.monotonic() < deadline, "workload did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))
        if before_kill is not None:
            before_kill()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, (
            child.stderr.read().decode() if child.stderr else ""
        )
        if child.stderr:
            child.stderr.close()
        if after_kill is not None:
            after_kill()
        if not state:  # the first run created a and b, both zero
            state = {"a": bytearray(8 * 65536 + 4096), "b": bytearray(8 * 65536 + 4096)}
        # a RADOS store held by the dead child is taken over: fence, break its lock
        store = open_store(str(tmp_path), location)
        rebooted = kill % 3 == 2
        journaled = store.journals and not rebooted
        catalog = Catalog.open(store, boot_id="another boot" if rebooted else None)
        try:
            report = check(catalog)
            assert not report.damage, report.lines()
            lines = log_path.read_text().splitlines()
            durable, pending = replay(state, lines, set(catalog.vdisks), journaled=journaled)
            state = verify(catalog, durable, pending)
            if kill % 10 == 9:  # reclaim what crashes leaked, then the checker is clean
                assert check(catalog, repair=True).reclaimed_segments >= 0
                assert check(catalog).clean
        finally:
            catalog.close()


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_flushed(tmp_path: Path) -> None:
    crash_loop(tmp_path, KILLS)


@pytest.mark.slow
@pytest.mark.ceph
def test_sigkill_on_rados_loses_nothing_flushed(tmp_path: Path, rados_location: str) -> None:
    """The same on the RADOS store and a pool of a RADOS container and a file."""
    crash_loop(tmp_path, CEPH_KILLS, rados_location)


@contextlib.contextmanager
def ceph_may_lose_objects(cluster: CephCluster) -> Iterator[None]:
    """Turn a failure caused by Ceph's own known loss (see CephCluster.kill_osd) into xfail.

    Only when the OSD declared an object unfound: every other failure stands.
    """
    try:
        yield
    except Exception:
        lost = cluster.unfound_objects()
        if lost:
            pytest.xfail(
                f"Ceph 16.2 bluestore lost {lost[0]} to an OSD SIGKILL (known Ceph issue, "
                "reproduced without targetvirt; see CephCluster.kill_osd)"
            )
        raise


@pytest.mark.slow
@pytest.mark.ceph
def test_osd_and_workload_killed_together_lose_nothing_flushed(
    tmp_path: Path, ceph_bluestore: CephCluster
) -> None:
    """The OSD (bluestore) dies mid-workload, then the workload; the OSD comes back.

    The workload's operations hang while the OSD is down (librados waits, it does not
    fail); what was acknowledged before the OSD died must all be there afterwards.
    """
    ns = f"crash{random.Random().getrandbits(32):08x}"
    location = f"rados:{ceph_bluestore.pool}/{ns}?conf={ceph_bluestore.client_conf}"
    with ceph_may_lose_objects(ceph_bluestore):
        crash_loop(
            tmp_path, OSD_KILLS, location, seed=99,
            before_kill=ceph_bluestore.kill_osd, after_kill=ceph_bluestore.start_osd,
        )  # fmt: skip


@pytest.mark.ceph
def test_osd_restart_under_io_loses_nothing(ceph_bluestore: CephCluster) -> None:
    """A live workload rides through an OSD kill and restart without an error or a loss."""
    ns = f"live{random.Random().getrandbits(32):08x}"
    location = f"rados:{ceph_bluestore.pool}/{ns}?conf={ceph_bluestore.client_conf}"
    catalog = Catalog.open(RadosStore(location, create=True))
    catalog.create_pool("p", location, 64 * SEG, segment_size=SEG)
    v = catalog.create_vdisk("v", "p", 16 * SEG)
    model = bytearray(v.size)
    rng = random.Random(7)
    progress = threading.Semaphore(0)
    stop = threading.Event()
    failure: list[BaseException] = []

    def workload() -> None:
        try:
            while not stop.is_set():
                off = rng.randrange(v.size - 1)
                data = rng.randbytes(min(rng.randint(1, 2 * SEG), v.size - off))
                v.write(off, data)
                model[off : off + len(data)] = data
                if rng.random() < 0.2:
                    catalog.commit()
                if rng.random() < 0.05:
                    catalog.snapshot("v", f"s{rng.getrandbits(24)}")
                progress.release()
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failure.append(e)
            progress.release()

    worker = threading.Thread(target=workload)
    worker.start()
    with ceph_may_lose_objects(ceph_bluestore):
        try:
            for _ in range(20):
                progress.acquire()
            ceph_bluestore.kill_osd()
            time.sleep(0.3)  # operations are now stuck in librados
            ceph_bluestore.start_osd()
            for _ in range(20):  # and they complete, then new ones too
                assert progress.acquire(timeout=120), "the workload never resumed"
        finally:
            stop.set()
            worker.join()
        assert not failure, failure
        catalog.commit()
        assert v.read(0, v.size) == model
        snaps = {n: catalog.vdisk(n).read(0, v.size) for n in catalog.vdisks if "@" in n}
        catalog.close()
        catalog = Catalog.open(RadosStore(location))
        try:
            assert catalog.vdisk("v").read(0, v.size) == model
            assert {n: catalog.vdisk(n).read(0, v.size) for n in snaps} == snaps
            assert check(catalog).clean
        finally:
            catalog.close()
