"""The quickstart, on a host whose kernel has LIO and TCMU: a file-backed pool and vdisk,
the handler daemon, an iSCSI export on 127.0.0.1 and the Linux initiator logged in to it.

``tools/quickstart`` runs this here when the kernel can, or inside a throwaway VM when it
cannot.  Everything lives in one work folder (default /var/lib/targetvirt-quickstart),
so an installed targetvirt is left alone; the handler talks D-Bus on the system bus when
targetvirt's policy is installed and nobody else serves org.targetvirt.Manager1 there,
else on a private bus of its own.  ``--teardown`` undoes it all.

Run as root.  Every step is printed as the command it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from targetvirt.manage.common import SERVICE

MODULES = ["configfs", "target_core_mod", "target_core_user", "iscsi_target_mod", "uio",
           "iscsi_tcp", "sd_mod"]  # fmt: skip
CONFIGFS = Path("/sys/kernel/config")
POLICIES = [Path("/etc/dbus-1/system.d/targetvirt.conf"),
            Path("/usr/share/dbus-1/system.d/targetvirt.conf")]  # fmt: skip
PORTAL = "127.0.0.1"
POOL, VDISK = "quickstart", "disk1"
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- the socket is in a 0700 folder of root's: only root reaches this bus -->
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class QuickstartError(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def run(argv: list[str], *, check: bool = True, quiet: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    if not quiet:
        say("  $ " + " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if out and not quiet:
        say("\n".join("    " + line for line in out.splitlines()))
    if check and proc.returncode != 0:
        raise QuickstartError(f"{' '.join(argv)} failed (exit {proc.returncode})")
    return proc


def kernel_support() -> str | None:
    """None when this kernel can run LIO with TCMU (loading the modules if needed)."""
    if shutil.which("modprobe"):
        for module in MODULES:
            subprocess.run(["modprobe", module], capture_output=True, check=False)
    if CONFIGFS.is_dir() and not os.path.ismount(CONFIGFS):
        subprocess.run(["mount", "-t", "configfs", "none", str(CONFIGFS)], capture_output=True,
                       check=False)  # fmt: skip
    missing = []
    if not (CONFIGFS / "target").is_dir():
        missing.append("LIO (configfs /sys/kernel/config/target)")
    if not Path("/sys/module/target_core_user").exists():
        missing.append("TCMU (target_core_user)")
    if not Path("/sys/module/iscsi_target_mod").exists():
        missing.append("the iSCSI target (iscsi_target_mod)")
    if not Path("/sys/class/uio").exists():
        missing.append("UIO")
    if missing:
        return f"this kernel ({os.uname().release}) lacks {', '.join(missing)}"
    return None


class Quickstart:
    def __init__(self, work: Path, size: str) -> None:
        self.work = work
        self.state = work / "state"
        self.run_dir = work / "run"
        self.size = size
        self.python = sys.executable
        self.env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    # --- pieces ---------------------------------------------------------------------------

    def shell(self, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [self.python, "-m", "targetvirt.manage.shell", "--run-dir", str(self.run_dir),
                *words]  # fmt: skip
        say("  $ targetvirt " + " ".join(words))
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        out = (proc.stdout + proc.stderr).strip()
        if out:
            say("\n".join("    " + line for line in out.splitlines()))
        if check and proc.returncode != 0:
            raise QuickstartError(f"targetvirt {' '.join(words)} failed")
        return proc

    def _system_bus_usable(self) -> bool:
        if not any(p.exists() for p in POLICIES):
            return False
        if not Path("/run/dbus/system_bus_socket").exists():
            return False
        proc = run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                    f"string:{SERVICE}"], check=False, quiet=True)  # fmt: skip
        return proc.returncode == 0 and "boolean false" in proc.stdout

    def _private_bus(self) -> str:
        socket = self.run_dir / "bus.sock"
        conf = self.run_dir / "bus.conf"
        conf.write_text(BUS_CONFIG.format(socket=socket))
        say(f"- a private D-Bus daemon ({socket}): targetvirt's policy is not installed "
            "system-wide")  # fmt: skip
        proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--fork", "--print-pid=1"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        (self.run_dir / "bus.pid").write_text(proc.stdout.readline().strip() + "\n")
        proc.wait(30)
        return f"unix:path={socket}"

    def _running(self) -> bool:
        pid_file = self.run_dir / "handler.pid"
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def start_daemon(self) -> None:
        if self._running():
            say("- targetvirt-handler is already running for this quickstart")
            return
        for d in (self.state, self.run_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [self.python, "-m", "targetvirt.manage.daemon", "--state-dir", str(self.state),
                "--run-dir", str(self.run_dir)]  # fmt: skip
        if not self._system_bus_usable():
            argv += ["--bus-address", self._private_bus()]
        log = self.work / "handler.log"
        say(f"- starting targetvirt-handler (log: {log})")
        say("  $ targetvirt-handler " + " ".join(argv[3:]))
        with open(log, "ab") as f:
            subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (self.run_dir / "handler.pid").exists() and self._answers():
                return
            time.sleep(0.5)
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        say("\n".join("    " + line for line in tail))
        self._stop_bus()
        raise QuickstartError(f"targetvirt-handler did not come up; see {log}")

    def _stop_bus(self) -> None:
        bus_pid = self.run_dir / "bus.pid"
        if bus_pid.exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(bus_pid.read_text()), signal.SIGTERM)
            bus_pid.unlink()

    def _answers(self) -> bool:
        argv = [self.python, "-m", "targetvirt.manage.shell", "--run-dir", str(self.run_dir),
                "info"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, env=self.env, check=False)
        return proc.returncode == 0

    @staticmethod
    def initiator_name() -> str:
        try:
            for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
                if line.startswith("InitiatorName="):
                    return line.split("=", 1)[1].strip()
        except OSError:
            pass
        raise QuickstartError(
            "no /etc/iscsi/initiatorname.iscsi: install open-iscsi (tools/setup-host does)"
        )

    @staticmethod
    def ensure_iscsid() -> None:
        if subprocess.run(["pgrep", "-x", "iscsid"], capture_output=True, check=False).returncode:
            if Path("/run/systemd/system").exists():
                run(["systemctl", "start", "iscsid"])
            else:
                run(["iscsid"])

    def iqn(self) -> str:
        found = subprocess.run(
            [self.python, "-m", "targetvirt.manage.shell", "--run-dir", str(self.run_dir),
             f"/vdisks/{VDISK}", "info"], capture_output=True, text=True, env=self.env,
            check=False,
        ).stdout  # fmt: skip
        for line in found.splitlines():
            if line.strip().startswith("iqn:"):
                return line.split(":", 1)[1].strip()
        raise QuickstartError(f"{VDISK} is not exported")

    @staticmethod
    def disk_of(iqn: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for sess in Path("/sys/class/iscsi_session").glob("session*"):
                try:
                    if (sess / "targetname").read_text().strip() != iqn:
                        continue
                except OSError:
                    continue
                for blk in sess.glob("device/target*/*:*:*:*/block/*"):
                    return f"/dev/{blk.name}"
            time.sleep(0.5)
        raise QuickstartError(f"no disk appeared for {iqn}")

    # --- the whole thing ------------------------------------------------------------------

    def up(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        say(f"targetvirt quickstart in {self.work}")
        self.start_daemon()
        listing = self.shell("ls", "/vdisks").stdout
        if f"o- {VDISK} " not in listing:
            self.shell("/pools", "create", f"name={POOL}", f"path={self.work / 'pool.img'}",
                       "size=2G")  # fmt: skip
            self.shell("/vdisks", "create", f"name={VDISK}", f"size={self.size}", f"pool={POOL}")
        initiator = self.initiator_name()
        if "LUN " not in self.shell("ls", f"/vdisks/{VDISK}").stdout:
            self.shell("/exports", "create", f"vdisk={VDISK}", f"portal={PORTAL}:3260",
                       f"acl={initiator}")  # fmt: skip
        iqn = self.iqn()
        self.ensure_iscsid()
        say(f"- logging the Linux initiator ({initiator}) in")
        run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", PORTAL])
        sessions = run(["iscsiadm", "-m", "session"], check=False, quiet=True).stdout
        if iqn not in sessions:
            run(["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL, "--login"])
        disk = self.disk_of(iqn)
        run(["lsblk", "-o", "NAME,SIZE,TRAN,VENDOR,MODEL", disk], check=False)
        self.shell("ls")
        say("")
        say(f"Done: vdisk {VDISK} of pool {POOL} is LUN 0 of {iqn} on {PORTAL}:3260,")
        say(f"and this host's initiator is logged in to it as {disk}.")
        say(f"Try: targetvirt --run-dir {self.run_dir} /vdisks/{VDISK} snapshot name=s1")
        say(f"Undo: tools/quickstart --teardown  (or: {self.python} -m "
            f"targetvirt.manage.quickstart --teardown --work {self.work})")  # fmt: skip
        return 0

    def down(self) -> int:
        say(f"tearing down the quickstart in {self.work}")
        if self._running():
            try:
                iqn = self.iqn()
            except QuickstartError:
                iqn = ""
            if iqn:
                run(["iscsiadm", "-m", "node", "-T", iqn, "-p", PORTAL, "--logout"], check=False)
                run(["iscsiadm", "-m", "node", "-o", "delete", "-T", iqn], check=False)
                self.shell("/exports", "delete", f"vdisk={VDISK}", check=False)
            pid = int((self.run_dir / "handler.pid").read_text())
            say(f"  $ kill {pid}   # targetvirt-handler")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)
        self._stop_bus()
        if self.work.exists():
            say(f"  $ rm -rf {self.work}")
            shutil.rmtree(self.work)
        say("Done.")
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quickstart", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/var/lib/targetvirt-quickstart",
                    help="folder for the pool file, metadata and logs")  # fmt: skip
    ap.add_argument("--size", default="1G", help="size of the vdisk (default 1G)")
    ap.add_argument(
        "--check", action="store_true",
        help="only say whether this kernel can run it (exit 0) or not (exit 3)",
    )  # fmt: skip
    ap.add_argument("--teardown", action="store_true", help="undo a previous quickstart")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("quickstart: run it as root (sudo tools/quickstart)", file=sys.stderr)
        return 1
    why = kernel_support()
    if args.check:
        print(why or "this kernel has LIO, TCMU and the iSCSI target")
        return 3 if why else 0
    qs = Quickstart(Path(args.work), args.size)
    try:
        if args.teardown:
            return qs.down()
        if why:
            print(f"quickstart: {why}", file=sys.stderr)
            return 3
        return qs.up()
    except QuickstartError as e:
        print(f"quickstart: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
