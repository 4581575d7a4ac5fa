"""Crash consistency: a workload killed with SIGKILL at random instants, many times.

After each kill the store reopens, the checker finds no damage, and every vdisk holds,
byte for byte, either its state at the last completed flush or the data of a write
issued after it (an unflushed write may be lost, torn, or kept; nothing else may appear).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from targetvirt.catalog import Catalog
from targetvirt.check import check
from targetvirt.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("TV_CRASH_KILLS", "60"))

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


def replay(start: State, log: list[str], actual_names: set[str]) -> tuple[State, list[Op]]:
    """The durable state at the last certain durable point, and the ops that may follow it."""
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
            pending.append(op)  # done or torn: a maybe either way until the next durable point
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


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_flushed(tmp_path: Path) -> None:
    rng = random.Random(1234)
    state: State = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "ops.log"
    for kill in range(KILLS):
        log_path.unlink(missing_ok=True)
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.targetvirt.crash_child",
                str(tmp_path),
                str(rng.getrandbits(32)),
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
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, (
            child.stderr.read().decode() if child.stderr else ""
        )
        if child.stderr:
            child.stderr.close()
        if not state:  # the first run created a and b, both zero
            state = {"a": bytearray(8 * 65536 + 4096), "b": bytearray(8 * 65536 + 4096)}
        catalog = Catalog.open(SqliteStore(str(tmp_path / "meta.db")))
        try:
            report = check(catalog)
            assert not report.damage, report.lines()
            lines = log_path.read_text().splitlines()
            durable, pending = replay(state, lines, set(catalog.vdisks))
            state = verify(catalog, durable, pending)
            if kill % 10 == 9:  # reclaim what crashes leaked, then the checker is clean
                assert check(catalog, repair=True).reclaimed_segments >= 0
                assert check(catalog).clean
        finally:
            catalog.close()
