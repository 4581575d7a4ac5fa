"""The guest harness's command channel, exercised without QEMU: the guest agent runs on
the host as a plain process serving a temporary channel folder.  (Not marked ``vm``.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import guest as guest_mod
from tests.vm.guest import AGENT, CommandFailed, Guest, GuestDied


def _agent_guest(tmp_path: Path) -> Guest:
    g = Guest(tmp_path / "work")
    g.channel.mkdir(parents=True)
    g.results.mkdir(parents=True)
    env = dict(os.environ, TARGETVIRT_AGENT_SPOOL=str(tmp_path / "spool"))
    g.proc = subprocess.Popen(
        [sys.executable, str(AGENT), str(g.channel)],
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    g.pid = g.proc.pid
    end = time.monotonic() + 30
    while not (g.channel / "ready.json").exists():
        assert time.monotonic() < end, "agent did not start"
        time.sleep(0.02)
    return g


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Guest]:
    g = _agent_guest(tmp_path)
    yield g
    g.shutdown(timeout=10)
    assert g.proc is not None and g.proc.poll() is not None


def test_run_returns_output_and_exit_code(local: Guest) -> None:
    res = local.run(["sh", "-c", 'echo out; echo err >&2; exit "$0"', "3"], check=False)
    assert (res.rc, res.stdout, res.stderr, res.ok) == (3, "out\n", "err\n", False)
    assert local.run(["printf", "%s", "x y"]).stdout == "x y"


def test_failure_raises_with_output(local: Guest) -> None:
    with pytest.raises(CommandFailed, match=r"exit code 1.*boom"):
        local.run(["sh", "-c", "echo boom >&2; exit 1"])


def test_missing_program_is_reported(local: Guest) -> None:
    res = local.run(["/nonexistent/program"], check=False)
    assert res.rc is None and res.error is not None and "FileNotFoundError" in res.error


def test_timeout_kills_process_group(local: Guest) -> None:
    t0 = time.monotonic()
    res = local.run(["sh", "-c", "sleep 60 & sleep 60"], timeout=1, check=False)
    assert res.timed_out and not res.ok and time.monotonic() - t0 < 15
    with pytest.raises(CommandFailed, match="timed out"):
        local.run(["sleep", "30"], timeout=0.5)


def test_input_env_cwd(local: Guest, tmp_path: Path) -> None:
    res = local.run(
        ["sh", "-c", 'cat; echo "$FOO"; pwd'], input="in\n", env={"FOO": "bar"}, cwd=tmp_path
    )
    assert res.stdout.splitlines() == ["in", "bar", str(tmp_path)]


def test_daemon_holding_stdout_does_not_block(local: Guest) -> None:
    # A command that leaves a child behind with our stdout open must still return.
    res = local.run(["sh", "-c", "sleep 30 & echo started"], timeout=20)
    assert res.stdout == "started\n" and res.duration < 15


def test_spawn_background(local: Guest) -> None:
    log = local.results / "bg.log"
    pid = local.spawn(["sh", "-c", "echo hello; sleep 30"], log=log)
    end = time.monotonic() + 10
    while "hello" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end
        time.sleep(0.05)
    local.run(["kill", str(pid)])


def test_python_snippet_runs_in_checkout(local: Guest) -> None:
    out = local.python_json(
        "import json, os, sys, tests.vm.lio as l; "
        "print(json.dumps([os.getcwd(), sys.argv[1:], l.iqn('x')]))",
        args=["a", "b"],
    )
    assert out == [str(guest_mod.CHECKOUT), ["a", "b"], "iqn.2026-11.org.example:x"]


def test_dead_guest_fails_fast(tmp_path: Path) -> None:
    g = _agent_guest(tmp_path)
    assert g.proc is not None
    g.proc.kill()
    g.proc.wait()
    for _ in range(2):  # and every later call too
        with pytest.raises(GuestDied, match="dead"):
            g.run(["true"])


def test_hung_guest_is_killed_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "guest" that never answers: a process that is not an agent.
    g = Guest(tmp_path / "work")
    g.channel.mkdir(parents=True)
    g.proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    g.pid = g.proc.pid
    monkeypatch.setattr(guest_mod, "DEADLINE_GRACE", 0.5)
    with pytest.raises(GuestDied, match="did not answer"):
        g.run(["true"], timeout=0.5)
    assert g.proc.poll() is not None
    with pytest.raises(GuestDied, match="did not answer"):
        g.run(["true"])


def test_find_kernel_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARGETVIRT_VM_KERNEL", "/boot/vmlinuz-x")
    assert guest_mod.find_kernel() == Path("/boot/vmlinuz-x")


def test_tests_with_guests_of_their_own_are_collected_first() -> None:
    """The power-cut test boots its own guests: it must run before the session guest is
    up, even when pytest is given its file last (conftest's collection order)."""
    top = Path(__file__).parent
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "vm", str(top / "test_stack.py"), str(top / "test_powercut.py")],
        capture_output=True, text=True, timeout=120, check=False, cwd=top.parent.parent,
    )  # fmt: skip
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert res.returncode == 0, res.stdout + res.stderr
    assert ids[0].startswith("tests/vm/test_powercut.py::"), ids
    stack = [i for i in ids if i.startswith("tests/vm/test_stack.py::")]
    assert stack == ids[1:] and stack[0].endswith("test_guest_basics"), ids  # order kept
