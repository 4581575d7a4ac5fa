"""bench.cputime: CPU per operation from /proc, against hand-written stat lines, a fake
/proc tree laid out as proc(5) describes it, a model of the arithmetic, and the real /proc."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import cputime
from bench.cputime import Cost, StatError, Tally, ThreadTime, parse_stat, per_op, snapshot

# A stat line as 6.1 writes it, comm with a space and a ')' in it; utime 1234, stime 56.
LINE = (
    "4242 (tv ring) x) S 1 4242 4242 0 -1 4194560 2191 0 0 0 1234 56 0 0 20 0 3 0 "
    "1700 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n"
)


def test_parse_stat_takes_the_comm_to_the_last_paren_then_utime_and_stime() -> None:
    assert parse_stat(LINE) == ("tv ring) x", 1234, 56)


@pytest.mark.parametrize(
    "bad", ["", "4242 no parens S 1", "4242 (x) S 1 2 3", "1 (x) S " + "y " * 20]
)
def test_a_stat_line_it_cannot_read_is_an_error_naming_it(bad: str) -> None:
    with pytest.raises(StatError, match="not a proc stat line"):
        parse_stat(bad)


def _stat(tid: int, comm: str, utime: int, stime: int) -> str:
    return f"{tid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 1 1 1\n"


def _fake_proc(root: Path, threads: dict[tuple[int, int], tuple[str, str, int, int]]) -> Path:
    """A /proc with ``{(pid, tid): (process comm, thread comm, utime, stime)}``."""
    for (pid, tid), (pcomm, tcomm, utime, stime) in threads.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "comm").write_text(pcomm + "\n")
        (task / "stat").write_text(_stat(tid, tcomm, utime, stime))
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return root


def test_snapshot_reads_every_thread_names_kworkers_as_one_and_applies_labels(
    tmp_path: Path,
) -> None:
    proc = _fake_proc(tmp_path, {
        (10, 10): ("python", "python", 5, 1),
        (10, 11): ("python", "msgr-worker-0", 7, 2),
        (20, 20): ("kworker/0:1-events", "kworker/0:1-events", 0, 3),
        (30, 30): ("tcmu-runner", "tcmu-runner", 9, 4),
    })  # fmt: skip
    snap = snapshot({10: "targetvirt-handler"}, proc=proc)
    assert snap == {
        (10, 10): ThreadTime("targetvirt-handler", "python", 5, 1),
        (10, 11): ThreadTime("targetvirt-handler", "msgr-worker-0", 7, 2),
        (20, 20): ThreadTime("kworker", "kworker", 0, 3),
        (30, 30): ThreadTime("tcmu-runner", "tcmu-runner", 9, 4),
    }


def test_per_op_divides_each_groups_ticks_by_the_operations() -> None:
    before = {
        (1, 1): ThreadTime("fio", "fio", 100, 20),
        (2, 2): ThreadTime("kworker", "kworker", 0, 10),
    }
    after = {
        (1, 1): ThreadTime("fio", "fio", 150, 30),  # 50 ticks user, 10 system
        (2, 2): ThreadTime("kworker", "kworker", 0, 10),  # none: left out
        (3, 3): ThreadTime("kworker", "kworker", 0, 30),  # born in between: 30 ticks
        (4, 4): ThreadTime("x", "y", 7),  # born in between
    }
    # 100 ticks/s: a tick is 10 ms; 1000 operations
    assert per_op(before, after, 1000, hz=100) == {
        ("fio", "fio"): Cost(500.0, 100.0),
        ("kworker", "kworker"): Cost(0.0, 300.0),
        ("x", "y"): Cost(70.0, 0.0),
    }
    assert list(per_op(before, after, 1000, hz=100)) == [
        ("fio", "fio"), ("kworker", "kworker"), ("x", "y")
    ]  # fmt: skip


def test_a_reused_thread_id_counts_from_zero_and_no_operations_is_an_error() -> None:
    before = {(1, 1): ThreadTime("a", "a", 500, 5), (2, 2): ThreadTime("c", "c", 5, 500)}
    after = {  # each tid now belongs to a new thread: one of its times went down
        (1, 1): ThreadTime("b", "b", 20, 6),
        (2, 2): ThreadTime("d", "d", 6, 20),
    }
    assert per_op(before, after, 10, hz=100) == {
        ("b", "b"): Cost(20_000.0, 6_000.0),
        ("d", "d"): Cost(6_000.0, 20_000.0),
    }
    with pytest.raises(ValueError, match="operations must be positive"):
        per_op(before, after, 0, hz=100)


tids = st.tuples(st.integers(1, 6), st.integers(1, 6))
ticks = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))
threads = st.dictionaries(
    tids, st.tuples(st.sampled_from(["fio", "python", "kworker"]), ticks), max_size=12
)
spent_ticks = st.tuples(st.integers(0, 10**4), st.integers(0, 10**4))


@given(before=threads, spent=st.dictionaries(tids, spent_ticks, max_size=12),
       ops=st.floats(0.5, 1e6))  # fmt: skip
def test_per_op_matches_a_model_sum_of_what_each_thread_spent(
    before: dict[tuple[int, int], tuple[str, tuple[int, int]]],
    spent: dict[tuple[int, int], tuple[int, int]],
    ops: float,
) -> None:
    b = {k: ThreadTime(name, name, u, s) for k, (name, (u, s)) in before.items()}
    a = dict(b)
    for k, (user, system) in spent.items():
        old = b.get(k, ThreadTime("new", "new", 0, 0))
        a[k] = ThreadTime(old.process, old.thread, old.utime + user, old.stime + system)
    model: dict[tuple[str, str], list[float]] = {}
    for k, t in a.items():
        old = b.get(k, ThreadTime("", "", 0, 0))
        du, ds = t.utime - old.utime, t.stime - old.stime
        if du or ds:
            sums = model.setdefault((t.process, t.thread), [0.0, 0.0])
            sums[0] += du * 1e6 / 100 / ops
            sums[1] += ds * 1e6 / 100 / ops
    got = per_op(b, a, ops, hz=100)
    assert got.keys() == model.keys()
    for g, (user, system) in model.items():
        assert got[g].user == pytest.approx(user)
        assert got[g].system == pytest.approx(system)
    totals = [c.total for c in got.values()]
    assert totals == sorted(totals, reverse=True)


def test_a_tally_weighs_each_run_by_its_operations() -> None:
    t = Tally()
    assert t.per_op() == {}
    t.add({("fio", "fio"): Cost(100.0, 20.0)}, 1000)
    t.add({("fio", "fio"): Cost(400.0, 0.0), ("kworker", "kworker"): Cost(0.0, 50.0)}, 3000)
    assert t.per_op() == {("fio", "fio"): Cost(325.0, 5.0), ("kworker", "kworker"): Cost(0, 37.5)}


def test_render_shows_the_largest_groups_of_any_column_and_each_total() -> None:
    text = cputime.render(
        {
            "qcow": {
                ("tcmu-runner", "tcmu-runner"): Cost(200.0, 100.0),
                ("kworker", "kworker"): Cost(0.0, 450.0),
            },
            "targetvirt": {
                ("targetvirt-handler", "python"): Cost(340.0, 200.0),
                ("kworker", "kworker"): Cost(0.0, 1144.0),
            },
        },
        top=2,
    )
    lines = text.splitlines()
    assert lines[0].split() == [
        "CPU", "µs", "per", "operation", "(of", "which", "system)", "qcow", "targetvirt"
    ]  # fmt: skip
    assert lines[2].split() == ["kworker", "450", "(sys", "450)", "1,144", "(sys", "1,144)"]
    assert lines[3].split() == ["targetvirt-handler", "/", "python", "0", "540", "(sys", "200)"]
    # top=2: tcmu-runner (300) is left out, but counts in the total
    assert lines[4].split() == [
        "total", "(all", "threads)", "750", "(sys", "550)", "1,684", "(sys", "1,344)"
    ]  # fmt: skip
    assert len(lines) == 5
    tally = Tally()
    tally.add({("a", "b"): Cost(1.26, 0.04), ("k", "k"): Cost(0.0, 2.0)}, 1)
    tallies = {"randwrite": {"targetvirt": tally}}
    assert cputime.to_json(tallies) == {"randwrite": {"targetvirt": {
        "k": {"user": 0.0, "system": 2.0}, "a / b": {"user": 1.3, "system": 0.0}
    }}}  # fmt: skip
    assert cputime.tables(tallies).splitlines()[:3] == [
        "", "CPU per operation, randwrite:", "CPU µs per operation (of which system)  targetvirt"
    ]  # fmt: skip


def test_the_real_proc_shows_this_threads_cpu_time_growing() -> None:
    me = (os.getpid(), threading.get_native_id())
    before = snapshot({os.getpid(): "me"})
    assert before[me].process == "me"
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:  # burn 0.3 s of CPU in this thread, mostly in
        sum(range(10_000))  # Python: reading a thread's CPU clock is a system call
    after = snapshot({os.getpid(): "me"})
    hz = os.sysconf("SC_CLK_TCK")
    # a busy loop in Python is user time; accounting is per tick: allow its coarseness
    user = after[me].utime - before[me].utime
    assert 0.15 * hz <= user <= 5 * hz
    assert after[me].stime - before[me].stime < user
    assert per_op(before, after, 1)[(after[me].process, after[me].thread)].user >= 150_000


def test_run_counted_runs_once_and_adds_the_cpu_of_that_run_to_the_tally() -> None:
    calls: list[int] = []

    def burn() -> str:
        calls.append(1)
        deadline = time.thread_time() + 0.2
        while time.thread_time() < deadline:
            pass
        return "done"

    assert cputime.run_counted(None, {}, burn, lambda _r, _s: 1) == "done"
    tally = Tally()
    assert cputime.run_counted(tally, {os.getpid(): "me"}, burn, lambda r, s: 2.0) == "done"
    assert len(calls) == 2
    assert tally.ops == 2.0
    mine = sum(c.total for (process, _), c in tally.per_op().items() if process == "me")
    assert 50_000 <= mine <= 2_500_000  # 0.2 s of CPU over two operations, per tick
