"""Two gateways serve one vdisk on Ceph through dm-multipath, in the guest (issue 7).

Everything a two-host deployment has, on one guest kernel:

* a single-node Ceph cluster on loopback (tests/ceph_cluster.py, memstore) holding the
  metadata store and the segments (one RADOS container);
* an active and a standby controller (``tests.targetvirt.controller_child``: the real
  ControllerService, driven through stdin for snapshots);
* two gateways: ``targetvirt-handler --controller rados:... --commands rados:...
  --devices gwN_*``, each its own agent (commands by RADOS watch/notify) serving its own
  LIO user backstore (``gw1_mp``, ``gw2_mp``) of the same vdisk;
* one iSCSI target with a TPG per gateway (portals 127.0.0.1 and 127.0.0.2), each device
  with a user ALUA group holding its gateway's LUN: gw1 active/optimized, gw2
  active/non-optimized (as ceph-iscsi lays them out);
* the Linux initiator logged in to both portals, multipathd grouping the two paths by
  ALUA priority (``path_grouping_policy group_by_prio``, ``prio alua``).

fio writes with crc32c verify through the multipath device while (a) a live snapshot is
taken, (b) gateway 1 is SIGKILLed -- LIO fails its queued commands after the device's
``cmd_time_out``, dm-multipath fails the path and goes on through gateway 2 -- and
restarted, (c) the active controller is SIGKILLed and the standby takes over.  Each
phase writes its own region and verifies it; at the end every region is verified again
(``--verify_only``), so what was acknowledged before a later fault is still there.

    python -m tests.vm.multipath DIR      # in the guest; one JSON object on stdout

Run as one guest command: the Ceph daemons die with the process that started them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

MIB = 1 << 20
VDISK = "mp"
SIZE = 64 * MIB
GATEWAYS = ("gw1", "gw2")
PORTALS = {"gw1": "127.0.0.1", "gw2": "127.0.0.2"}
ALUA = {"gw1": (1, 0), "gw2": (2, 1)}  # group id, state (0 active/optimized, 1 non-optimized)
TARGET = "iqn.2026-11.org.example:mp"
CMD_TIME_OUT = 20  # LIO fails what waits longer in a dead gateway's ring: the path fails
CONTROLLER_WAIT = 15.0  # below CMD_TIME_OUT: an I/O waiting for the controller fails first
STORE_LEASE = 5  # seconds: how long the standby waits for a dead active controller
PHASE = "6M"  # each phase's fio region
RATE = "192k"  # 32 s of writes per phase: every fault lands while fio writes

MULTIPATH_CONF = """\
defaults {
    user_friendly_names no
    find_multipaths no
    checker_timeout 5
    polling_interval 2
}
blacklist {
    device {
        vendor ".*"
    }
}
blacklist_exceptions {
    device {
        vendor "TGTVIRT"
    }
}
devices {
    device {
        vendor "TGTVIRT"
        product ".*"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        failback immediate
        no_path_retry queue
    }
}
"""


def _python() -> str:
    from tests.vm.tvlun import PYTHON  # noqa: PLC0415 - guest only

    return PYTHON


def _env() -> dict[str, str]:
    from tests.vm.tvlun import ROOT  # noqa: PLC0415

    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Controller:
    """A controller_child process; its lines are read as they come."""

    def __init__(self, d: Path, name: str, location: str, *extra: str) -> None:
        self.name = name
        self.log = d / f"{name}.log"
        self.lines: list[str] = []
        with open(self.log, "ab") as err:  # the child keeps its own descriptor
            self.proc = self._spawn(d, name, location, extra, err)
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def _spawn(d: Path, name: str, location: str, extra: tuple[str, ...], err: IO[bytes]
               ) -> subprocess.Popen[str]:  # fmt: skip
        return subprocess.Popen(
            [_python(), "-m", "tests.targetvirt.controller_child", "--store", location,
             "--unix", str(d / f"{name}.sock"), "--store-lease", str(STORE_LEASE),
             "--ack-timeout", "10", "--poll", "0.5", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            text=True, env=_env(), start_new_session=True,
        )  # fmt: skip

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()

    def wait_for(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.split()[:1] == [word] or line.startswith("error"):
                        self.lines.remove(line)
                        if line.startswith("error"):
                            raise RuntimeError(f"{self.name}: {line}")
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} did not say {word!r}: {self._tail()}")
                self._cond.wait(min(left, 1.0))

    def ask(self, command: str, word: str, timeout: float = 120.0) -> str:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        return self.wait_for(word, timeout)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def sinks(ctl: Controller, timeout: float = 60.0) -> str:
    """How each gateway's session gets its commands, once both say hello by notify (a
    session's command channel opens just after it registers)."""
    deadline = time.monotonic() + timeout
    while (said := ctl.ask("sinks", "sinks")).count("NotifySink") < len(GATEWAYS):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return said


def provision(location: str) -> None:
    from targetvirt.catalog import Catalog  # noqa: PLC0415
    from targetvirt.store.rados import RadosStore  # noqa: PLC0415

    cat = Catalog.open(RadosStore(location, create=True))
    try:
        cat.create_pool("p", location, 4 * SIZE)
        cat.create_vdisk(VDISK, "p", SIZE)
    finally:
        cat.close()


class Gateway:
    """targetvirt-handler for one gateway: an agent, serving only its own device."""

    def __init__(self, d: Path, name: str, location: str) -> None:
        from tests.vm.tvlun import Handler  # noqa: PLC0415

        self.handler = Handler(d / name)
        self.argv = (
            "--controller", location, "--agent-id", name, "--devices", f"{name}_*",
            "--no-dbus", "--controller-wait", str(CONTROLLER_WAIT), "--commands", location,
        )  # fmt: skip

    def start(self) -> None:
        self.handler.start(*self.argv, timeout=300)


def export(size: int) -> None:
    """Both gateways' backstores, one TPG each, ALUA groups, demo-mode iSCSI."""
    from tests.vm import lio  # noqa: PLC0415
    from tests.vm.tvlun import create_lun  # noqa: PLC0415

    rts = lio._rtslib()
    target = rts.Target(rts.FabricModule("iscsi"), TARGET)
    for tag, gw in enumerate(GATEWAYS, start=1):
        so_name = f"{gw}_{VDISK}"
        create_lun(so_name, VDISK, size, cmd_time_out=CMD_TIME_OUT)
        so = lio.find_storage_object(so_name)
        gid, state = ALUA[gw]
        group = rts.ALUATargetPortGroup(so, gw, gid)
        group.alua_access_type = 1  # implicit: the target sets the states
        group.alua_access_state = state
        tpg = rts.TPG(target, tag)
        for attr, value in (
            ("generate_node_acls", "1"),
            ("authentication", "0"),
            ("demo_mode_write_protect", "0"),
            ("cache_dynamic_acls", "1"),
        ):
            tpg.set_attribute(attr, value)  # fmt: skip
        rts.NetworkPortal(tpg, PORTALS[gw], 3260)
        lun = rts.LUN(tpg, 0, so)
        lun.alua_tg_pt_gp_name = gw
        tpg.enable = True


def sh(*argv: str, timeout: float = 120.0) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def login() -> dict[str, str]:
    """Log in through both portals; each gateway's path (sdX), once both are there."""
    for portal in PORTALS.values():
        sh("iscsiadm", "-m", "discovery", "-t", "st", "-p", portal)
    sh("iscsiadm", "-m", "node", "-T", TARGET, "-o", "update",
       "-n", "node.session.timeo.replacement_timeout", "-v", "10")  # fmt: skip
    sh("iscsiadm", "-m", "node", "-T", TARGET, "--login")
    deadline, disks = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        disks = disks_of_gateways()
        if len(disks) == len(GATEWAYS):
            return disks
        time.sleep(0.5)
    raise RuntimeError(f"expected a path per gateway, found {disks}")


def start_multipath(disks: list[str]) -> str:
    """multipathd over the two paths; the /dev/mapper device."""
    Path("/etc/multipath.conf").write_text(MULTIPATH_CONF)
    Path("/etc/multipath").mkdir(exist_ok=True)
    sh("multipathd")  # forks; its socket is in /run
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError):
            sh("multipathd", "reconfigure", timeout=30)
            maps = sh("multipath", "-l", "-v1", timeout=30).split()
            if maps:
                dev = f"/dev/mapper/{maps[0]}"
                if os.path.exists(dev) and len(paths()) == len(disks):
                    return dev
        time.sleep(2)
    raise RuntimeError(f"no multipath map over {disks}: {sh('multipath', '-ll')}")


def paths() -> list[dict[str, str]]:
    """multipathd's view of each path: device, priority, dm state, checker state."""
    out = sh("multipathd", "show", "paths", "raw", "format", "%d %p %t %T", timeout=30)
    rows = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0].startswith("sd"):
            rows.append({"dev": f[0], "prio": f[1], "dm_state": f[2], "checker": f[3]})
    return rows


Fio = tuple[subprocess.Popen[bytes], Path]


def fio(d: Path, dev: str, phase: int, *, verify_only: bool = False) -> Fio:
    """One phase's fio job (its own 6 MiB region, its own seed), started; and its log."""
    log = d / f"fio-{phase}{'-reverify' if verify_only else ''}.log"
    argv = [
        "fio", f"--name=phase{phase}", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
        "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8", f"--offset={phase * 8}M",
        f"--size={PHASE}", f"--randseed={1000 + phase}", "--verify=crc32c", "--verify_fatal=1",
        "--verify_state_save=0",
    ]  # fmt: skip
    argv += ["--verify_only"] if verify_only else [f"--rate=,{RATE}", "--do_verify=1"]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=d), log


def finish(job: Fio, timeout: float = 900) -> dict[str, Any]:
    """Wait for a fio job; its exit code and whether its log says every verify passed."""
    proc, log = job
    rc = proc.wait(timeout)
    text = log.read_text(errors="replace")
    return {"rc": rc, "err0": "err= 0" in text, "bad": "verify: bad" in text.lower()
            or "bad magic" in text.lower(), "tail": text[-1500:] if rc else ""}  # fmt: skip


def disks_of_gateways() -> dict[str, str]:
    """Each gateway's path (sdX), from the portal address of its iSCSI session."""
    gateway_at = {portal: gw for gw, portal in PORTALS.items()}
    found = {}
    for sess in Path("/sys/class/iscsi_session").glob("session*"):
        conns = list(sess.glob("device/connection*/iscsi_connection/connection*"))
        address = (conns[0] / "persistent_address").read_text().strip() if conns else ""
        for blk in sess.glob("device/target*/*:*:*:*/block/*"):
            if address in gateway_at:
                found[gateway_at[address]] = blk.name
    return found


def writes(disks: dict[str, str]) -> dict[str, int]:
    """Write requests completed through each gateway's path so far."""
    return {gw: int(Path(f"/sys/block/{sd}/stat").read_text().split()[4])
            for gw, sd in disks.items()}  # fmt: skip


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {gw: after[gw] - before[gw] for gw in after}


def run(d: Path) -> dict[str, Any]:
    from tests.ceph_cluster import CephCluster  # noqa: PLC0415

    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"t0": time.monotonic()}
    ceph = CephCluster(str(d / "ceph")).start()
    ctls: list[Controller] = []
    gws: dict[str, Gateway] = {}
    try:
        location = f"rados:{ceph.pool}/tv?conf={ceph.client_conf}"
        provision(location)
        out["ceph_up"] = time.monotonic()
        ctls.append(Controller(d, "ctl0", location, "--commands", location))
        ctls[0].wait_for("active", 300)
        ctls.append(Controller(d, "ctl1", location, "--standby", "--commands", location))
        gws = {gw: Gateway(d, gw, location) for gw in GATEWAYS}
        starts = {gw: g.handler.launch(*g.argv) for gw, g in gws.items()}
        for gw, g in gws.items():
            g.handler.wait_ready(starts[gw], 300)
        ctls[1].wait_for("waiting", 300)
        out["daemons_up"] = time.monotonic()
        out["sinks"] = sinks(ctls[0])
        export(SIZE)
        disks = login()
        dev = start_multipath(list(disks.values()))
        out["disks"] = disks
        out["paths"] = paths()
        out["topology"] = sh("multipath", "-ll", timeout=30)
        out["rtpg"] = {gw: sh("sg_rtpg", "-d", f"/dev/{sd}", timeout=60)
                       for gw, sd in disks.items()}  # fmt: skip
        out["mapped"] = time.monotonic()
        phases(d, dev, disks, ctls, gws, out)
        return out
    finally:
        teardown(ctls, gws)
        ceph.stop()


def phases(d: Path, dev: str, disks: dict[str, str], ctls: list[Controller],
           gws: dict[str, Gateway], out: dict[str, Any]) -> None:  # fmt: skip
    # (a) a live snapshot while fio writes
    f = fio(d, dev, 0)
    time.sleep(4)
    before = writes(disks)
    out["snapshot"] = ctls[0].ask(f"snapshot {VDISK} snap1", "window")
    out["a"] = finish(f)
    out["a_writes"] = delta(writes(disks), before)

    # (b) gateway 1 killed under I/O (LIO fails what waits in its ring after cmd_time_out,
    # dm-multipath fails the path over to gateway 2), then restarted
    f = fio(d, dev, 1)
    time.sleep(4)
    out["b_killed"] = time.monotonic()
    gws["gw1"].handler.kill()
    before = writes(disks)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and delta(writes(disks), before)["gw2"] < 20:
        time.sleep(0.5)
    out["b_failed_over"] = time.monotonic()
    out["b_writes_while_down"] = delta(writes(disks), before)
    out["b_paths_down"] = paths()
    gws["gw1"].start()
    out["b_restarted"] = time.monotonic()
    before = writes(disks)
    out["b"] = finish(f)
    out["b_writes_after_restart"] = delta(writes(disks), before)
    deadline = time.monotonic() + 120  # the path checker reinstates gateway 1's path
    while time.monotonic() < deadline and any(p["dm_state"] != "active" for p in paths()):
        time.sleep(1)
    out["b_reinstated"] = time.monotonic()

    # (c) the active controller killed under I/O; the standby takes over
    f = fio(d, dev, 2)
    time.sleep(4)
    before = writes(disks)
    out["c_killed"] = time.monotonic()
    ctls[0].kill()
    ctls[1].wait_for("active", 120)
    out["c_standby_active"] = time.monotonic()
    out["c_agents"] = ctls[1].ask(f"await {' '.join(GATEWAYS)}", "agents")
    out["c_sinks"] = sinks(ctls[1])
    out["c"] = finish(f)
    out["c_writes"] = delta(writes(disks), before)  # failback: gateway 1 again, alone
    out["c_snapshot"] = ctls[1].ask(f"snapshot {VDISK} snap2", "window")

    # everything acknowledged in every phase is still there
    out["reverify"] = [finish(fio(d, dev, n, verify_only=True)) for n in range(3)]
    out["paths_end"] = paths()
    out["done"] = time.monotonic()


def teardown(ctls: list[Controller], gws: dict[str, Gateway]) -> None:
    """Map, sessions and LIO go first (while the gateways answer), then the daemons."""
    from tests.vm import lio  # noqa: PLC0415

    for argv in (["multipath", "-F"], ["multipathd", "shutdown"],
                 ["iscsiadm", "-m", "node", "--logoutall=all"],
                 ["iscsiadm", "-m", "node", "-o", "delete"]):  # fmt: skip
        with contextlib.suppress(Exception):
            subprocess.run(argv, capture_output=True, timeout=120, check=False)
    with contextlib.suppress(Exception):
        lio.clear()
    for g in gws.values():
        with contextlib.suppress(Exception):
            g.handler.stop(30)
    for c in ctls:
        c.kill()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(run(Path(argv[0])), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
