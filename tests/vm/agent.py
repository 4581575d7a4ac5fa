"""Guest-side command agent for the real-stack test guest (stdlib only).

Runs inside the QEMU guest as the ``--exec`` program of ``vng`` (with the guest's
``/usr/bin/python3``) and serves commands that the host drops into a channel folder on a
shared ``--rwdir`` (9p, mounted ``sync,dirsync`` by virtme-ng, so files the host writes
are visible immediately).  Protocol, all inside ``CHANNEL``:

- host writes ``<id>.cmd.json`` (atomically: temp file + rename), a JSON object with
  ``argv`` (list of str), ``timeout`` (seconds), optional ``cwd``, ``env`` (added to the
  agent's environment), ``stdin`` (path of a file to feed), ``background`` (start and
  return at once; output goes to ``log``), ``warm`` (``socket``, ``module``, ``args``:
  a ``python -m`` command the warm interpreter, tests/vm/warm.py, may run instead of
  ``argv``), or ``op: "shutdown"``;
- agent renames it to ``<id>.taken.json``, runs the command in its own thread and
  session, then writes ``<id>.out`` and ``<id>.err`` (raw bytes) and last
  ``<id>.result.json`` (``rc``, ``timed_out``, ``duration``, ``error``...), again
  atomically, so the result file's existence means the output files are complete;
- on timeout the agent kills the command's whole process group (SIGKILL) and reports
  ``timed_out: true``; a process stuck in D state is reported as ``stuck: true``.

The agent writes ``ready.json`` when it starts serving.  Command output is spooled to the
guest's tmpfs (``/run/agent``) and copied to the channel once, so chatty programs do not
pay a 9p round trip per write, and daemons that keep the output file open cannot make
the agent wait for them (only the command's own exit is awaited).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Where command output is spooled (a tmpfs in the guest); $TARGETVIRT_AGENT_SPOOL
#: overrides it, e.g. when the agent is exercised on the host by the harness's own tests.
SPOOL = Path(os.environ.get("TARGETVIRT_AGENT_SPOOL", "/run/agent"))
HOME = SPOOL.parent / "home" if "TARGETVIRT_AGENT_SPOOL" in os.environ else Path("/run/home")
KILL_GRACE = 10.0  # seconds to wait for a SIGKILLed process group before calling it stuck


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class Agent:
    def __init__(self, channel: Path) -> None:
        self.channel = channel
        self.stop = threading.Event()
        self.env = dict(os.environ)
        self.env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.env["LC_ALL"] = "C.UTF-8"
        self.env["HOME"] = str(HOME)
        self.env["TARGETCLI_HOME"] = str(HOME / ".targetcli")
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.env["PYTHONUNBUFFERED"] = "1"

    def serve(self) -> None:
        SPOOL.mkdir(parents=True, exist_ok=True)
        (HOME / ".targetcli").mkdir(parents=True, exist_ok=True)
        ready = {"pid": os.getpid(), "uptime": _uptime(), "python": sys.version.split()[0]}
        _write_atomic(self.channel / "ready.json", json.dumps(ready).encode())
        idle = 0
        while not self.stop.is_set():
            found = False
            for entry in sorted(os.listdir(self.channel)):
                if entry.endswith(".cmd.json") and not entry.startswith("."):
                    found = True
                    self._take(entry[: -len(".cmd.json")])
            idle = 0 if found else idle + 1
            # Poll quickly while busy, back off to 0.25 s when idle: a TCG guest pays for
            # every 9p directory read.
            time.sleep(0.02 if idle < 50 else 0.1 if idle < 200 else 0.25)

    def _take(self, cid: str) -> None:
        src = self.channel / f"{cid}.cmd.json"
        taken = self.channel / f"{cid}.taken.json"
        try:
            os.replace(src, taken)
            spec = json.loads(taken.read_text())
        except (OSError, ValueError) as e:
            self._result(cid, {"rc": None, "error": f"agent: bad command file: {e}"})
            return
        if spec.get("op") == "shutdown":
            self._result(cid, {"rc": 0})
            self.stop.set()
            return
        threading.Thread(target=self._run, args=(cid, spec), daemon=True).start()

    def _result(self, cid: str, res: dict[str, Any]) -> None:
        res.setdefault("timed_out", False)
        res.setdefault("stuck", False)
        res.setdefault("error", None)
        res["id"] = cid
        _write_atomic(self.channel / f"{cid}.result.json", json.dumps(res).encode())

    def _run(self, cid: str, spec: dict[str, Any]) -> None:
        out_path = SPOOL / f"{cid}.out"
        err_path = SPOOL / f"{cid}.err"
        env = dict(self.env)
        env.update(spec.get("env") or {})
        argv: list[str] = spec["argv"]
        timeout = float(spec.get("timeout", 60))
        start = time.monotonic()
        try:
            if spec.get("background"):
                log = spec.get("log") or str(SPOOL / f"{cid}.log")
                proc = self._spawn_warm(spec, env, log)
                if proc is None:
                    with open(log, "ab") as logf:
                        proc = subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            cwd=spec.get("cwd"),
                            env=env,
                            start_new_session=True,
                        )
                threading.Thread(target=proc.wait, daemon=True).start()  # reap it
                self._result(cid, {"rc": 0, "pid": proc.pid, "log": log, "duration": 0.0})
                return
            stdin_path = spec.get("stdin")
            with (
                open(stdin_path or os.devnull, "rb") as fin,
                open(out_path, "wb") as fout,
                open(err_path, "wb") as ferr,
            ):
                warm = self._run_warm(spec, env, (fin, fout, ferr), timeout)
                if warm is not None:
                    warm["duration"] = time.monotonic() - start
                    self._finish(cid, warm, out_path, err_path)
                    return
                proc = subprocess.Popen(
                    argv,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=spec.get("cwd"),
                    env=env,
                    start_new_session=True,
                )
            res: dict[str, Any] = {"pid": proc.pid}
            try:
                res["rc"] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                res["timed_out"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    res["rc"] = proc.wait(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:
                    res["rc"] = None
                    res["stuck"] = True  # uninterruptible sleep, most likely in the kernel
            res["duration"] = time.monotonic() - start
        except Exception as e:  # noqa: BLE001 - report any failure, never die silently
            res = {"rc": None, "error": f"{type(e).__name__}: {e}"}
            res["duration"] = time.monotonic() - start
        self._finish(cid, res, out_path, err_path)

    def _finish(self, cid: str, res: dict[str, Any], out_path: Path, err_path: Path) -> None:
        for p in (out_path, err_path):
            if p.exists():
                shutil.copyfile(p, self.channel / p.name)
                p.unlink()
        self._result(cid, res)

    def _spawn_warm(self, spec: dict[str, Any], env: dict[str, str], log: str) -> Any:
        """A background ``python -m`` command forked by the warm interpreter (a
        ``warm.Spawned``), when the spec asks for it and one is listening; else None."""
        warm = spec.get("warm")
        if not warm:
            return None
        import warm as server  # noqa: PLC0415 - tests/vm/warm.py, beside this file

        cwd = Path(spec.get("cwd") or os.getcwd())
        try:
            return server.spawn(warm["module"], warm["args"], log=Path(log), cwd=cwd, env=env,
                                socket_path=warm["socket"])  # fmt: skip
        except (OSError, RuntimeError):
            return None  # the warm interpreter is going away: start it the usual way

    def _run_warm(
        self,
        spec: dict[str, Any],
        env: dict[str, str],
        files: tuple[Any, Any, Any],
        timeout: float,
    ) -> dict[str, Any] | None:
        """A ``python -m`` command through the warm interpreter (tests/vm/warm.py) when the
        spec asks for it and one is listening; None: run ``argv`` as usual."""
        warm = spec.get("warm")
        if not warm:
            return None
        import warm as server  # noqa: PLC0415 - tests/vm/warm.py, beside this file

        fds = (files[0].fileno(), files[1].fileno(), files[2].fileno())
        try:
            proc = server.start(warm["module"], warm["args"], files=fds, cwd=spec.get("cwd"),
                                env=env, socket_path=warm["socket"])  # fmt: skip
        except RuntimeError as e:
            return {"rc": None, "error": str(e)}
        if proc is None:
            return None
        res: dict[str, Any] = {"pid": proc.pid, "warm": True}
        try:
            try:
                res["rc"] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                res["timed_out"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    res["rc"] = proc.wait(KILL_GRACE)
                except subprocess.TimeoutExpired:
                    res.update(rc=None, stuck=True)
        except RuntimeError:
            return {**res, "rc": None, "error": "warm interpreter: lost the command"}
        return res


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: agent.py CHANNEL_DIR", file=sys.stderr)
        return 2
    agent = Agent(Path(sys.argv[1]))
    with contextlib.suppress(KeyboardInterrupt):
        agent.serve()
    print("agent: shutting down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
