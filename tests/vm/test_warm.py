"""The warm interpreter (tests/vm/warm.py) behind the guest agent, without QEMU: agent and
server run on the host.  A ``module()`` command forked from it must look, to the caller,
exactly like ``python -m``: argv, stdin, stdout, stderr, environment, folder, exit code,
timeout.  (Not marked ``vm``.)

Run as a module (``python -m tests.vm.test_warm ARGS``) this file is the probe the tests
run: it reports what it was given and exits with the code in $PROBE_EXIT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import warm as warm_mod
from tests.vm.guest import Guest
from tests.vm.test_harness import _agent_guest

PROBE = "tests.vm.test_warm"


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[Guest]:
    g = _agent_guest(tmp_path)
    try:
        g.start_warm(str(tmp_path / "warm.sock"), wait=60)
        yield g
    finally:
        if "warm_pid" in g.info:  # on the host it outlives the agent (a guest ends it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(g.info["warm_pid"], signal.SIGTERM)
        g.shutdown(timeout=10)


def probe(g: Guest, *args: str, exit: int = 0, stdin: str = "") -> tuple[int | None, dict, str]:
    res = g.run(
        [str(g.python_path), "-m", PROBE, *args], input=stdin, check=False, cwd=g.checkout,
        env={"PYTHONPATH": str(g.checkout), "PROBE_EXIT": str(exit)}, warm=True,
    )  # fmt: skip
    report = json.loads(res.stdout) if res.stdout else {}
    return res.rc, report, res.stderr


def test_a_warm_command_sees_what_python_m_would(warm: Guest, tmp_path: Path) -> None:
    rc, got, err = probe(warm, "a b", "--c", exit=3, stdin="in put\n")
    assert (rc, err) == (3, "to stderr\n")
    assert got["warm"]  # forked from the server
    assert got["sid"] == got["pid"]  # a session of its own: the agent kills its group
    assert got["argv"] == ["a b", "--c"] and got["stdin"] == "in put\n"
    assert got["cwd"] == str(warm.checkout) and got["path0"] == str(warm.checkout)
    assert got["env"]["PROBE_EXIT"] == "3" and got["env"]["HOME"].endswith("home")
    # the same command without the warm interpreter: the same report
    socket = warm.info.pop("warm_socket")
    rc2, cold, err2 = probe(warm, "a b", "--c", exit=3, stdin="in put\n")
    assert (rc2, err2) == (3, "to stderr\n") and not cold["warm"]
    drop = ("pid", "sid", "warm", "env")
    assert {k: v for k, v in got.items() if k not in drop} == {
        k: v for k, v in cold.items() if k not in drop
    }
    warm.info["warm_socket"] = socket


def test_exit_codes_and_tracebacks_are_python_ms(warm: Guest) -> None:
    assert probe(warm, exit=0)[0] == 0
    rc, _, err = probe(warm, "--raise")
    assert rc == 1 and err.startswith("to stderr\nTraceback") and "ValueError: asked" in err
    rc, _, err = probe(warm, "--message")
    assert rc == 1 and err.endswith("a message\n")
    res = warm.module("tests.vm.timing", "/nonexistent", check=False)
    assert res.rc == 1 and res.stderr.startswith("timing: /nonexistent: no channel/")


def test_a_preloaded_module_runs_as_python_m_runs_it(warm: Guest) -> None:
    """The shell and the harness's helpers are imported by the server: run as __main__,
    they must print exactly what a cold start prints (no runpy warning on stderr)."""
    argv = [str(warm.python_path), "-m", "tests.vm.lio", "no-such-command"]
    env = {"PYTHONPATH": str(warm.checkout)}
    hot = warm.run(argv, check=False, cwd=warm.checkout, env=env, warm=True)
    socket = warm.info.pop("warm_socket")
    cold = warm.run(argv, check=False, cwd=warm.checkout, env=env)
    warm.info["warm_socket"] = socket
    assert cold.rc == 2 and "invalid choice" in cold.stderr, cold.describe()
    assert (hot.rc, hot.stdout, hot.stderr) == (cold.rc, cold.stdout, cold.stderr)


def test_a_warm_command_past_its_timeout_is_killed(warm: Guest) -> None:
    res = warm.run([str(warm.python_path), "-m", PROBE, "--sleep"], timeout=1, check=False,
                   cwd=warm.checkout, warm=True)  # fmt: skip
    assert res.timed_out and res.rc == -9
    assert probe(warm, exit=5)[0] == 5  # and the server goes on


def test_without_a_server_the_command_runs_as_usual(warm: Guest, tmp_path: Path) -> None:
    warm.info["warm_socket"] = str(tmp_path / "none.sock")
    rc, got, _ = probe(warm, "x", exit=4)
    assert rc == 4 and got["argv"] == ["x"] and not got["warm"]


@pytest.mark.parametrize(
    ("message", "nfds", "why"),
    [
        (b"{not json", 3, "bad request: Expecting property name"),
        (b'{"module": "x"}', 1, "1 file descriptors, not 3"),
        (b'{"module": ""}', 3, "no module"),
        (b'{"module": "x", "args": [1]}', 3, "args must be a list of strings"),
    ],
)
def test_a_bad_request_gets_an_error_and_the_server_goes_on(
    warm: Guest, message: bytes, nfds: int, why: str
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s, open(os.devnull) as f:
        s.connect(warm.info["warm_socket"])
        socket.send_fds(s, [message], [f.fileno()] * nfds)
        s.settimeout(30)
        answer = s.recv(4096).decode()
    assert answer.startswith("error bad request") and why in answer, answer
    assert probe(warm, exit=6)[0] == 6


def test_a_spawned_daemon_behaves_as_popen_does(warm: Guest, tmp_path: Path) -> None:
    """tests/vm/tvlun.py starts targetvirt-handler through ``spawn``: output to the log, a
    session of its own, polled, signalled and waited for as a Popen would be."""
    sock = warm.info["warm_socket"]
    log = tmp_path / "daemon.log"
    env = {"PYTHONPATH": str(warm.checkout), "PROBE_EXIT": "7"}
    proc = warm_mod.spawn(PROBE, ["--sleep", "x"], log=log, cwd=warm.checkout, env=env,
                          socket_path=sock)  # fmt: skip
    assert proc is not None and proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    assert os.getsid(proc.pid) == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM and proc.poll() == -signal.SIGTERM
    proc.kill()  # reaped: nothing to signal, no error
    done = warm_mod.spawn(PROBE, ["y"], log=log, cwd=warm.checkout, env=env, socket_path=sock)
    assert done is not None and done.wait(30) == 7
    report = json.loads(log.read_text().splitlines()[-1])
    assert report["argv"] == ["y"] and report["warm"] and report["env"]["PROBE_EXIT"] == "7"
    assert "to stderr" in log.read_text()  # stderr goes to the log too
    assert warm_mod.spawn(PROBE, [], log=log, cwd=warm.checkout, env=env,
                          socket_path=str(tmp_path / "none.sock")) is None  # fmt: skip


def test_a_background_command_is_forked_warm_when_asked(warm: Guest, tmp_path: Path) -> None:
    """``Guest.spawn(..., warm=True)`` (the shell tests' handler): the agent has the warm
    interpreter fork it; its output still goes to the log."""
    log = tmp_path / "bg.log"
    argv = [str(warm.python_path), "-m", PROBE, "z"]
    pid = warm.spawn(argv, log=log, cwd=warm.checkout,
                     env={"PYTHONPATH": str(warm.checkout)}, warm=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().endswith("}\n")):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.05)
    report = json.loads(log.read_text().splitlines()[-1])
    assert report["warm"] and report["pid"] == pid and report["argv"] == ["z"]


def _probe_main() -> int:
    if "--sleep" in sys.argv:
        time.sleep(60)
    print("to stderr", file=sys.stderr, flush=True)
    if "--raise" in sys.argv:
        raise ValueError("asked")
    if "--message" in sys.argv:
        sys.exit("a message")
    report = {
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "warm": "tests.vm.warm" in Path(f"/proc/{os.getppid()}/cmdline").read_text().split("\0"),
        "argv": sys.argv[1:],
        "stdin": sys.stdin.read(),
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "env": dict(os.environ),
    }
    print(json.dumps(report))
    return int(os.environ.get("PROBE_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(_probe_main())
