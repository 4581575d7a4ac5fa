"""A targetvirt LUN in the guest, for tests and benchmarks: runs INSIDE the guest.

``Handler`` starts ``targetvirt-handler`` on a state folder (creating a pool whose
container lives on the given folder, and vdisks), waits until it serves, and stops it
with SIGTERM.  ``create_lun`` makes the LIO user backstore ``targetvirt/<vdisk>`` for a
vdisk; the daemon picks it up through netlink.

    python -m tests.vm.tvlun up DIR VDISK SIZE [DAEMON-ARGS]  # pool, vdisk, handler, backstore
    python -m tests.vm.tvlun stop DIR                         # SIGTERM the handler, wait
    python -m tests.vm.tvlun restart DIR [DAEMON-ARGS]        # start it again (after a kill)
    python -m tests.vm.tvlun crash DIR SECONDS [DAEMON-ARGS]  # start it, SIGKILL it SECONDS later
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.vm import lio, warm

if TYPE_CHECKING:
    from targetvirt.catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
DAEMON = "targetvirt.manage.daemon"


POLICY = ROOT / "packaging" / "dbus" / "targetvirt.conf"
SYSTEM_POLICY = Path("/etc/dbus-1/system.d/targetvirt.conf")


def install_bus_policy() -> None:
    """What the package installs: the system bus lets root own the daemon's names."""
    if SYSTEM_POLICY.exists() and SYSTEM_POLICY.read_bytes() == POLICY.read_bytes():
        return
    shutil.copyfile(POLICY, SYSTEM_POLICY)
    subprocess.run(
        ["dbus-send", "--system", "--type=method_call", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"], check=True,
    )  # fmt: skip


class Handler:
    """One targetvirt-handler daemon with its state in ``dir/state``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.state = dir / "state"
        self.run_dir = dir / "run"
        self.log = dir / "handler.log"
        self.proc: subprocess.Popen[bytes] | warm.Spawned | None = None

    def catalog(self) -> Catalog:
        """The catalog, opened directly: only while the daemon is not running."""
        # Imported here: ``restart``/``stop`` need no catalog, and importing it (numpy...)
        # costs seconds under TCG on every one of the kill test's restarts.
        from targetvirt.catalog import Catalog  # noqa: PLC0415 - see above
        from targetvirt.store.sqlite import SqliteStore  # noqa: PLC0415

        self.state.mkdir(parents=True, exist_ok=True)
        return Catalog.open(SqliteStore(str(self.state / "targetvirt.db"), create=True))

    def provision(self, vdisk: str, size: int, *, pool_bytes: int | None = None,
                  cow: str = "redirect") -> None:  # fmt: skip
        """Pool ``p`` (one container on ``dir``) and a vdisk, made before the daemon starts."""
        cat = self.catalog()
        try:
            if "p" not in cat.pools:
                cat.create_pool("p", str(self.dir / "pool0"), pool_bytes or (2 * size + (64 << 20)))
            if vdisk not in cat.vdisks:
                cat.create_vdisk(vdisk, "p", size, cow)  # type: ignore[arg-type]
        finally:
            cat.close()

    def start(self, *extra: str, timeout: float = 120.0) -> None:
        start = self.launch(*extra)
        self.wait_ready(start, timeout)

    def launch(self, *extra: str) -> int:
        """Start the daemon; returns where its part of the log begins."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "--no-dbus" not in extra:
            install_bus_policy()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # The log is appended to across restarts: only what this process writes counts.
        start = self.log.stat().st_size if self.log.exists() else 0
        args = ["--state-dir", str(self.state), "--run-dir", str(self.run_dir), *extra]
        # Forked by the warm interpreter when the guest has one: the daemon's imports take
        # ~13 s of its ~18 s start under TCG, and the suite starts it a few dozen times.
        self.proc = warm.spawn(DAEMON, args, log=self.log, cwd=ROOT, env=env)
        if self.proc is None:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [PYTHON, "-m", DAEMON, *args], stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=ROOT, start_new_session=True,
                )  # fmt: skip
        return start

    def wait_ready(self, start: int, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while b"ready:" not in (ours := self.log.read_bytes()[start:]):
            if self.proc.poll() is not None:
                raise RuntimeError(f"targetvirt-handler exited: {ours[-2000:].decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"targetvirt-handler not ready in {timeout} s")
            time.sleep(0.2)
        if b"not serving" in ours:  # a device it should have taken over
            raise RuntimeError(f"targetvirt-handler refused a device: {ours[-2000:].decode()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def create_lun(so_name: str, vdisk: str, size: int, *, cmd_time_out: int = 180) -> None:
    """The LIO user backstore for a vdisk (nl_reply_supported=-1: immune to tcmu-runner).

    ``cmd_time_out``: how long LIO lets a command wait in the ring before failing it.  The
    kernel's 30 s is too short for a Python daemon restarting under TCG emulation (it
    can only be changed before the LUN is exported).
    """
    so = lio.create_user(so_name, f"targetvirt/{vdisk}", size, control="nl_reply_supported=-1")
    so.set_attribute("cmd_time_out", str(cmd_time_out))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("up", "stop", "restart", "crash"):
        print(__doc__, file=sys.stderr)
        return 2
    handler = Handler(Path(argv[1]))
    pidfile = handler.dir / "handler.pid"
    if argv[0] == "up":
        vdisk, size = argv[2], lio.parse_size(argv[3])
        handler.provision(vdisk, size)
        handler.start(*argv[4:])
        create_lun(vdisk, vdisk, size)
        assert handler.proc is not None
        pidfile.write_text(str(handler.proc.pid))
        return 0
    if argv[0] == "restart":  # after a crash: the LUN exists, the daemon takes it over
        handler.start(*argv[2:])
        assert handler.proc is not None
        pidfile.write_text(str(handler.proc.pid))
        return 0
    if argv[0] == "crash":  # a crash loop: killed wherever its start has got to
        start = handler.launch(*argv[3:])
        time.sleep(float(argv[2]))
        got = handler.log.read_bytes()[start:].decode(errors="replace").splitlines()
        handler.kill()
        print(got[-1] if got else "(nothing logged)")
        return 0
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    for _ in range(600):  # it finishes in-flight commands and commits, then exits
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
