"""Host side of the real-stack test guest: boot Debian's kernel under QEMU with virtme-ng,
keep it running, and run commands in it through a shared folder.

The host kernel has no configfs/LIO/TCMU/UIO and cannot load modules, so LIO, the
initiators and our programs run inside a throwaway QEMU guest (TCG, no KVM) that sees the
host's filesystem read-only.  One guest serves a whole pytest session (see conftest.py)
or a hand session (``tools/vm``).

Command channel: a folder on a ``--rwdir`` share, served by ``agent.py`` in the guest
(protocol documented there).  Chosen over a virtio-serial socket because it is
stateless on the host side (any process, e.g. ``tools/vm exec`` in another shell, can
submit commands to a running guest and nothing needs reconnecting), needs no framing or
multiplexing code for concurrent and large outputs, and leaves every command with its
output in the results folder for post-mortems.  Its cost is polling latency (about
20-250 ms per command), which is noise next to TCG speed.  Guest death is detected by
watching the QEMU process (virtme-ng boots with ``panic=-1 -no-reboot``, so a guest
panic ends the process); a hung guest by the per-command deadline.

Workdir layout (the workdir is the ``--rwdir``, mounted at the same path in the guest)::

    <workdir>/console.log   vng/QEMU/guest console output
    <workdir>/channel/      command files (kept as a log)
    <workdir>/results/      for tests: write here from host or guest, it survives
    <workdir>/guest.json    boot facts: kernel, pid, boot and setup time
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

from tests.vm import warm

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]  # tests/vm/guest.py -> the checkout being tested
AGENT = HERE / "agent.py"
SETUP = HERE / "guest-setup.sh"

#: What the warm interpreter (tests/vm/warm.py) imports once for every ``module()`` call:
#: the shell's one-shot form and the harness's helpers, run a few hundred times a suite.
#: And the daemon, which tests/vm/tvlun.py has it fork (22 handler starts a suite).
WARM_MODULES = ("targetvirt.manage.shell", "targetvirt.manage.client", "targetvirt.catalog",
                "tests.vm.lio", "tests.vm.tvlun", "rtslib_fb",
                "targetvirt.manage.daemon")  # fmt: skip
WARM_SOCKET = warm.SOCKET

#: Seconds added to a command's own timeout before the host gives up on the guest:
#: the agent needs up to 10 s to kill a process group, plus polling and 9p latency.
DEADLINE_GRACE = 45.0


class GuestError(Exception):
    """Something went wrong in or with the test guest; the message is one line."""


class GuestDied(GuestError):
    """The guest is gone (QEMU exited, or it stopped answering and was killed)."""


class CommandFailed(GuestError):
    """A command run in the guest failed (non-zero exit, timeout, or failed to start)."""

    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(result.describe())


@dataclass(frozen=True)
class Result:
    """Outcome of one command run in the guest."""

    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    stuck: bool = False
    error: str | None = None
    cid: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out and self.error is None

    def describe(self) -> str:
        cmd = shlex.join(self.argv)
        if len(cmd) > 200:
            cmd = cmd[:200] + "..."
        if self.error:
            what = self.error
        elif self.timed_out:
            what = f"timed out after {self.duration:.0f} s" + (
                " and is stuck (D state?)" if self.stuck else ""
            )
        else:
            what = f"exit code {self.rc}"
        tail = (self.stderr.strip() or self.stdout.strip())[-1500:]
        tail = tail.replace("\n", " | ")
        return f"guest command {cmd!r}: {what}" + (f"; output: {tail}" if tail else "")

    def check(self) -> Result:
        if not self.ok:
            raise CommandFailed(self)
        return self


def find_kernel() -> Path:
    """The kernel to boot: $TARGETVIRT_VM_KERNEL, else the newest /boot/vmlinuz-* that has
    modules installed (Debian's linux-image-amd64)."""
    env = os.environ.get("TARGETVIRT_VM_KERNEL")
    if env:
        return Path(env)
    found = []
    for p in Path("/boot").glob("vmlinuz-*"):
        ver = p.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / ver / "modules.dep").exists():
            key = tuple(int(x) if x.isdigit() else 0 for x in ver.replace("-", ".").split("."))
            found.append((key, p))
    if not found:
        raise GuestError(
            "no bootable kernel: need /boot/vmlinuz-<ver> with /lib/modules/<ver> "
            "(apt-get install linux-image-amd64), or set TARGETVIRT_VM_KERNEL"
        )
    return max(found)[1]


def venv_python() -> Path:
    """The project venv's python (same path inside the guest, which sees the host's
    filesystem): the checkout's .venv if there is one, else the running interpreter."""
    p = CHECKOUT / ".venv" / "bin" / "python"
    return p if p.exists() else Path(sys.executable)


def default_workdir() -> Path:
    base = Path(os.environ.get("TARGETVIRT_VM_RESULTS", CHECKOUT / ".vm-results"))
    return base / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")


class Guest:
    """A running test guest, or a handle on one started by another process (attach)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.channel = self.workdir / "channel"
        self.results = self.workdir / "results"
        self.console = self.workdir / "console.log"
        self.info_path = self.workdir / "guest.json"
        self.checkout = CHECKOUT
        self.python_path = venv_python()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # pid of the vng process (its own process group)
        self.dead: str | None = None  # why the guest is gone, once it is
        self.info: dict[str, Any] = {}
        self._seq = count(1)

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def boot(
        cls,
        workdir: Path | None = None,
        *,
        kernel: Path | None = None,
        memory: str | None = None,
        cpus: int | None = None,
        timeout: float = 600.0,
        setup: bool = True,
        disks: Sequence[Path] = (),
    ) -> Guest:
        """Boot a guest, wait for its agent, run the one-time setup; raise GuestError
        (with the console tail) if any of it fails.  ``disks``: raw image files on the
        host, attached read-write as virtio-blk disks (/dev/vda, /dev/vdb, ... in order)."""
        g = cls(workdir or default_workdir())
        g._start(kernel or find_kernel(), memory, cpus, timeout, disks)
        if setup:
            try:
                g.setup()
            except GuestError:
                g.shutdown()
                raise
        return g

    @classmethod
    def attach(cls, workdir: Path) -> Guest:
        """A handle on a guest booted by another process (``tools/vm start``)."""
        g = cls(workdir)
        try:
            g.info = json.loads(g.info_path.read_text())
        except (OSError, ValueError) as e:
            raise GuestError(f"no guest in {workdir}: {e}") from e
        g.pid = int(g.info["pid"])
        if not g.alive():
            raise GuestDied(f"guest in {workdir} (pid {g.pid}) is not running")
        return g

    def _start(
        self,
        kernel: Path,
        memory: str | None,
        cpus: int | None,
        timeout: float,
        disks: Sequence[Path] = (),
    ) -> None:
        memory = memory or os.environ.get("TARGETVIRT_VM_MEMORY", "2G")
        cpus = cpus or int(os.environ.get("TARGETVIRT_VM_CPUS", "2"))
        for d in (self.channel, self.results):
            d.mkdir(parents=True, exist_ok=True)
        _precompile()
        bindir = Path(sys.prefix) / "bin"
        vng = shutil.which("vng", path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        if vng is None:
            raise GuestError("vng (virtme-ng) not found; pip install virtme-ng (tools/setup-host)")
        argv = [
            vng,
            "--run",
            str(kernel),
            "--memory",
            memory,
            "--cpus",
            str(cpus),
            "--rwdir",
            str(self.workdir),
            "--exec",
            # --exec is a shell command line in the guest; quote our two paths.
            shlex.join(["/usr/bin/python3", str(AGENT), str(self.channel)]),
        ]
        for disk in disks:
            argv += ["--disk", _disk_path(disk)]
        if os.environ.get("TARGETVIRT_VM_KVM") != "1":
            # /dev/kvm exists on the build machines but the guest hangs under it.
            argv.insert(1, "--disable-kvm")
        env = dict(os.environ)
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # vng runs virtme-run
        t0 = time.monotonic()
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.info = {
            "pid": self.pid,
            "kernel": str(kernel),
            "memory": memory,
            "cpus": cpus,
            "argv": argv,
            "checkout": str(self.checkout),
            "python": str(self.python_path),
        }
        self._save_info()
        ready = self.channel / "ready.json"
        deadline = t0 + timeout
        while not ready.exists():
            if not self.alive():
                raise GuestDied(f"guest exited during boot; {self.console_tail()}")
            if time.monotonic() > deadline:
                self.kill(f"no agent after {timeout:.0f} s of boot")
                raise GuestDied(f"guest did not come up in {timeout:.0f} s; {self.console_tail()}")
            time.sleep(0.1)
        self.info["boot_seconds"] = round(time.monotonic() - t0, 2)
        with contextlib.suppress(OSError, ValueError):
            self.info["guest_uptime_at_agent"] = json.loads(ready.read_text())["uptime"]
        self._save_info()

    def setup(self) -> None:
        """The one-time guest setup (modules, configfs, lo, dbus, /run/ram, iscsid)."""
        t0 = time.monotonic()
        res = self.run(["sh", str(SETUP)], timeout=300, check=False)
        (self.results / "guest-setup.log").write_text(res.stdout + res.stderr)
        if not res.ok:
            raise GuestError(f"guest setup failed: {res.describe()}")
        self.info["setup_seconds"] = round(time.monotonic() - t0, 2)
        self.info["uname"] = self.run(["uname", "-r"]).stdout.strip()
        self.start_warm()
        self._save_info()

    def start_warm(self, socket: str = WARM_SOCKET, *, wait: float = 0.0) -> None:
        """Start the warm interpreter: once it has imported (half a minute under TCG),
        ``module()`` commands fork from it instead of starting Python (seconds each);
        until then, or if it is gone, the agent starts them as usual.  ``wait``: seconds
        to wait until it serves (its log, read on the host, says so)."""
        log = self.results / "warm.log"
        env = {"PYTHONPATH": str(self.checkout), "OPENBLAS_NUM_THREADS": "1"}
        argv = [self.python_path, "-m", "tests.vm.warm", socket, *WARM_MODULES]
        pid = self.spawn(argv, log=log, cwd=self.checkout, env=env)
        self.info["warm_socket"] = socket
        self.info["warm_pid"] = pid
        deadline = time.monotonic() + wait
        while wait and "serving on" not in (text := log.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise GuestError(f"the warm interpreter did not start: {text[-2000:]}")
            time.sleep(0.1)

    def _save_info(self) -> None:
        self.info_path.write_text(json.dumps(self.info, indent=2) + "\n")

    @property
    def boot_seconds(self) -> float:
        return float(self.info.get("boot_seconds", 0.0))

    def alive(self) -> bool:
        if self.dead is not None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _pid_runs(self.pid, str(self.workdir))

    def _check_alive(self) -> None:
        if self.dead is None and not self.alive():
            rc = self.proc.returncode if self.proc is not None else None
            self.dead = f"QEMU exited (exit code {rc}); {self.console_tail()}"
        if self.dead is not None:
            raise GuestDied(f"the test guest is dead: {self.dead}")

    def kill(self, reason: str) -> None:
        """Stop the guest at once (its vng/QEMU process group only)."""
        if self.dead is None:
            self.dead = reason
        if self.pid is None:
            return
        if self.proc is None and not _pid_runs(self.pid, str(self.workdir)):
            return  # attached, and the pid is no longer our guest
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            if self._wait_exit(10.0):
                return

    def _wait_exit(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    return True
            elif self.pid is None or not _pid_runs(self.pid, str(self.workdir)):
                return True
            time.sleep(0.1)
        return False

    def shutdown(self, timeout: float = 120.0) -> None:
        """Ask the agent to exit (the guest then powers off); kill it if that fails."""
        if self.alive():
            with contextlib.suppress(GuestError):
                self.run(["sh", "-c", 'dmesg > "$0"', str(self.results / "dmesg.txt")])
            with contextlib.suppress(GuestError, OSError):
                self._submit({"op": "shutdown"}, timeout=30.0)
            if not self._wait_exit(timeout):
                self.kill("did not power off after shutdown")
        if self.dead is None:
            self.dead = "shut down"

    def console_tail(self, size: int = 2000) -> str:
        try:
            data = self.console.read_bytes()[-size:]
        except OSError:
            return "no console log"
        text = data.decode(errors="replace").strip().replace("\n", " | ")
        return f"console tail ({self.console}): {text}" if text else "console log empty"

    # ----------------------------------------------------------------- commands

    def _submit(self, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        self._check_alive()
        cid = f"{time.strftime('%H%M%S')}-{os.getpid()}-{next(self._seq):05d}"
        tmp = self.channel / f".{cid}.cmd.tmp"
        tmp.write_text(json.dumps(dict(spec)))
        os.replace(tmp, self.channel / f"{cid}.cmd.json")
        result = self.channel / f"{cid}.result.json"
        deadline = time.monotonic() + timeout + DEADLINE_GRACE
        delay = 0.01
        while not result.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                what = spec.get("argv") or spec.get("op")
                reason = (
                    f"agent did not answer command {cid} ({what}) within "
                    f"{timeout + DEADLINE_GRACE:.0f} s; guest considered hung and killed"
                )
                if self.proc is not None:
                    self.kill(reason)
                raise GuestDied(reason)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        res: dict[str, Any] = json.loads(result.read_text())
        res["cid"] = cid
        return res

    def _read_output(self, cid: str, suffix: str) -> str:
        p = self.channel / f"{cid}.{suffix}"
        try:
            return p.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 120.0,
        check: bool = True,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
        warm: bool = False,
    ) -> Result:
        """Run ``argv`` in the guest as root and wait for it (at most ``timeout`` s, then
        its process group is killed).  ``check`` raises CommandFailed unless it exited 0.
        The environment is the agent's (PATH with sbin, HOME=/run/home,
        TARGETCLI_HOME) plus ``env``.  ``warm``: ``argv`` is ``python -m MODULE ARGS``, which
        the warm interpreter may run instead (see ``start_warm``)."""
        argv = [str(a) for a in argv]
        spec: dict[str, Any] = {"argv": argv, "timeout": timeout}
        if warm and self.info.get("warm_socket"):
            spec["warm"] = _warm_spec(self.info["warm_socket"], argv)
        if cwd is not None:
            spec["cwd"] = str(cwd)
        if env:
            spec["env"] = dict(env)
        stdin_file: Path | None = None
        if input is not None:
            stdin_file = self.channel / f"stdin-{os.getpid()}-{next(self._seq)}"
            stdin_file.write_bytes(input.encode() if isinstance(input, str) else input)
            spec["stdin"] = str(stdin_file)
        raw = self._submit(spec, timeout)
        if stdin_file is not None:
            stdin_file.unlink(missing_ok=True)
        cid = raw["cid"]
        res = Result(
            argv=argv,
            rc=raw.get("rc"),
            stdout=self._read_output(cid, "out"),
            stderr=self._read_output(cid, "err"),
            duration=float(raw.get("duration") or 0.0),
            timed_out=bool(raw.get("timed_out")),
            stuck=bool(raw.get("stuck")),
            error=raw.get("error"),
            cid=cid,
        )
        return res.check() if check else res

    def sh(self, script: str, *, timeout: float = 120.0, check: bool = True) -> Result:
        """Run a fixed shell snippet (``sh -ec``); pass data as files or env, never by
        formatting untrusted strings into the script."""
        return self.run(["sh", "-ec", script], timeout=timeout, check=check)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log: str | Path,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        warm: bool = False,
    ) -> int:
        """Start a background process (its own session) in the guest; stdout and stderr
        go to ``log`` (a guest path, e.g. under ``results``).  Returns its guest pid.
        ``warm``: ``argv`` is ``python -m MODULE ARGS``, which the warm interpreter may
        fork instead (see ``start_warm``)."""
        spec: dict[str, Any] = {
            "argv": [str(a) for a in argv],
            "background": True,
            "log": str(log),
            "timeout": 30,
        }
        if warm and self.info.get("warm_socket"):
            spec["warm"] = _warm_spec(self.info["warm_socket"], spec["argv"])
        if cwd is not None:
            spec["cwd"] = str(cwd)
        if env:
            spec["env"] = dict(env)
        raw = self._submit(spec, 30.0)
        if raw.get("error") or raw.get("pid") is None:
            raise GuestError(f"could not start {shlex.join(spec['argv'])}: {raw.get('error')}")
        return int(raw["pid"])

    def python(
        self,
        code: str,
        *,
        args: Sequence[str] = (),
        timeout: float = 120.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run a Python snippet in the guest with the project venv's python, the checkout
        as working directory and on PYTHONPATH (so ``import targetvirt`` and
        ``import tests.vm.lio`` work), and ``args`` as sys.argv[1:]."""
        script = self.channel / f"snippet-{os.getpid()}-{next(self._seq)}.py"
        script.write_text(code)
        full_env = {"PYTHONPATH": str(self.checkout)}
        full_env.update(env or {})
        try:
            return self.run(
                [str(self.python_path), str(script), *args],
                timeout=timeout,
                check=check,
                cwd=self.checkout,
                env=full_env,
            )
        finally:
            script.unlink(missing_ok=True)

    def python_json(self, code: str, *, args: Sequence[str] = (), timeout: float = 120.0) -> Any:
        """Run a snippet that prints one JSON document last on stdout; return it parsed."""
        return _last_json(self.python(code, args=args, timeout=timeout))

    def module(
        self,
        module: str,
        *args: str,
        timeout: float = 120.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """``python -m module args...`` in the guest with the venv python and the
        checkout on PYTHONPATH (e.g. ``module("bench.lun", "--json")``), forked from the
        warm interpreter when the guest has one."""
        full_env = {"PYTHONPATH": str(self.checkout)}
        full_env.update(env or {})
        return self.run(
            [str(self.python_path), "-m", module, *args],
            timeout=timeout,
            check=check,
            cwd=self.checkout,
            env=full_env,
            warm=True,
        )

    def lio(self, *args: str, timeout: float = 120.0) -> Any:
        """One ``tests.vm.lio`` subcommand in the guest; returns its JSON output."""
        return _last_json(self.module("tests.vm.lio", *args, timeout=timeout))

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _warm_spec(socket: str, argv: list[str]) -> dict[str, Any]:
    """What the agent needs to ask the warm interpreter for ``python -m MODULE ARGS``."""
    i = argv.index("-m") + 1
    return {"socket": socket, "module": argv[i], "args": argv[i + 1 :]}


def _precompile() -> None:
    """Write the checkout's bytecode on the host before the guest boots.  The guest sees
    the tree read-only, so a module whose .pyc is missing or stale (just edited, just
    merged) is compiled again by every guest process that imports it: ~3 s of each
    handler start under TCG, where a stat over 9p costs ~4 ms."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0",
         *(str(CHECKOUT / d) for d in ("targetvirt", "tcmu_handler", "tests", "bench"))],
        check=False, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _disk_path(disk: Path) -> str:
    """A disk image's path as vng takes it (it builds QEMU's ``-drive file=`` option from
    it, where ``,`` and ``=`` would be separators, and a shell line, where blanks split)."""
    path = str(Path(disk).resolve())
    if not Path(path).is_file() or any(c in path for c in ",= \t\n'\"\\"):
        raise GuestError(f"disk image {path!r}: not a file, or a name vng cannot pass on")
    return path


def _last_json(res: Result) -> Any:
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if not lines:
        raise GuestError(f"guest command printed nothing: {res.describe()}")
    try:
        return json.loads(lines[-1])
    except ValueError as e:
        raise GuestError(f"guest command did not end with JSON ({e}): {res.describe()}") from e


def _pid_runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line mentions
    ``marker`` (so a recycled pid is not mistaken for our guest)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline
