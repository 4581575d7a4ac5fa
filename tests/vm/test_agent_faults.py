"""Controller faults under the real handler: ``targetvirt-handler --controller unix:...``
(an agent only) serves a tcm_loop LUN in the guest while ``targetvirt-controller`` runs as
its own process on the handler's state folder.  fio writes with crc32c verify while

(a) the controller is killed (SIGKILL) and started again: the agent's I/O that needs the
    controller waits for it (``--controller-wait``), the agent registers with the new
    controller and reloads its tables, fio goes on and its verify passes;
(b) the controller is stopped (SIGSTOP, the agent is partitioned from it) with a 5 s
    lease: once the lease has run out a write does not complete -- it is held, not
    failed, since a single-path Linux initiator turns the "no lease" sense (NOT READY,
    04h/0Ah) into EIO -- while reads of written data go on; after SIGCONT the write
    completes and fio's verify passes.

The LUN and the disk get a 180 s command timeout (LIO's cmd_time_out and sd's), above the
agent's 120 s controller wait: a Python controller restarting under TCG took 20-60 s
(60 s on a busy host: a 60 s wait was too close).

    python -m tests.vm.test_agent_faults up DIR SIZE               # in the guest: JSON out
    python -m tests.vm.test_agent_faults restart DIR DEV LOG       # fio, SIGKILL + restart
    python -m tests.vm.test_agent_faults partition DIR DEV LOG     # fio, SIGSTOP, probes, SIGCONT
    python -m tests.vm.test_agent_faults down DIR                  # stop both daemons

fio is started by the guest-side command itself, 3 s before the fault: a Python start in
the TCG guest takes longer than fio's whole write phase (the first run of this test
faulted the controller after fio had written everything).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.guest import Guest

MIB = 1 << 20
WHERE = "/run/ram/tv-agent"
VDISK = "agentlun"
SIZE = "128M"
LEASE = 5.0  # the controller's agent lease (seconds)
WAIT = 120.0  # the agent's controller wait: above a TCG controller restart (10-60 s seen)
TIMEOUT = 180  # LIO cmd_time_out and sd's timeout: above WAIT
MARK, PROBE = 100 * MIB, 101 * MIB  # outside fio's region: written before the partition
FIO_SIZE = "24M"


# --- in the guest ---------------------------------------------------------------------------


def _controller_argv(d: Path) -> list[str]:
    from tests.vm.tvlun import PYTHON  # noqa: PLC0415 - guest only

    return [PYTHON, "-m", "targetvirt.manage.controld", "--state-dir", str(d / "state"),
            "--unix", str(d / "ctl.sock"), "--lease", str(LEASE)]  # fmt: skip


def start_controller(d: Path) -> float:
    """Start targetvirt-controller; returns when it serves (guest monotonic)."""
    from tests.vm.tvlun import ROOT  # noqa: PLC0415

    log = d / "controller.log"
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _controller_argv(d), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        )  # fmt: skip
    (d / "controller.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 120
    while b"active: serving" not in (ours := log.read_bytes()[start:]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"targetvirt-controller did not start: {ours[-2000:].decode()}")
        time.sleep(0.1)
    return time.monotonic()


def up(d: Path, size: int) -> dict[str, Any]:
    from tests.vm import lio  # noqa: PLC0415
    from tests.vm.tvlun import Handler, create_lun  # noqa: PLC0415

    d.mkdir(parents=True, exist_ok=True)
    handler = Handler(d)
    handler.provision(VDISK, size)  # pool and vdisk, made where the controller will run
    # both start at once (Python starts are slow under TCG): the handler waits for the
    # controller up to its --controller-wait
    start = handler.launch("--controller", f"unix:{d / 'ctl.sock'}", "--no-dbus",
                           "--controller-wait", str(WAIT), "--agent-id", "gw1")  # fmt: skip
    start_controller(d)
    handler.wait_ready(start, 180)
    assert handler.proc is not None
    (d / "handler.pid").write_text(str(handler.proc.pid))
    create_lun(VDISK, VDISK, size, cmd_time_out=TIMEOUT)
    out = lio.export_loopback(VDISK)
    Path(f"/sys/block/{Path(out['dev']).name}/device/timeout").write_text(f"{TIMEOUT}\n")
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie (whose parent is gone and nobody reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_fio(d: Path, dev: str, log: Path) -> int:
    """fio writing a 24 MiB region at 2 MiB/s (12 s of writes, so the fault lands while it
    writes), then verifying every block (crc32c); no flush: the mapping journal keeps what
    it wrote.  Returns once it has written for 3 s."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["fio", f"--name={log.stem}", f"--filename={dev}", "--ioengine=libaio",
             "--direct=1", "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8",
             f"--size={FIO_SIZE}", "--rate=,2m", "--verify=crc32c", "--verify_fatal=1",
             "--do_verify=1", "--randrepeat=0", "--verify_state_save=0"],
            stdout=out, stderr=subprocess.STDOUT, cwd=d, start_new_session=True,
        )  # fmt: skip
    time.sleep(3.0)
    if proc.poll() is not None:
        raise RuntimeError(f"fio ended at once: {log.read_text()[-2000:]}")
    return proc.pid


def restart(d: Path, dev: str, log: Path) -> dict[str, Any]:
    fio = start_fio(d, dev, log)
    pid = int((d / "controller.pid").read_text())
    ev: dict[str, Any] = {"fio": fio, "fio_writing": alive(fio), "killed": time.monotonic()}
    os.kill(pid, signal.SIGKILL)
    while alive(pid):  # dead, or a zombie: its store lock is released
        time.sleep(0.05)
    ev["active"] = start_controller(d)
    ev["fio_running_at_restart"] = alive(fio)
    return ev


class Block:
    """One 4 KiB O_DIRECT buffer (mmap: page aligned)."""

    def __init__(self, data: bytes = b"") -> None:
        self.buf = mmap.mmap(-1, 4096)
        self.buf[: len(data)] = data

    def bytes(self) -> bytes:
        return bytes(self.buf[:4096])


def _io(dev: str, offset: int, block: Block, write: bool) -> None:
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        n = (os.pwritev if write else os.preadv)(fd, [block.buf], offset)
        if n != 4096:
            raise OSError(f"short {'write' if write else 'read'}: {n}")
    finally:
        os.close(fd)


def disk_writes(dev: str) -> tuple[int, int]:
    """(write requests completed, write requests in flight) of the disk, from sysfs."""
    stat = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    inflight = Path(f"/sys/block/{Path(dev).name}/inflight").read_text().split()
    return int(stat[4]), int(inflight[1])


def partition(d: Path, dev: str, log: Path) -> dict[str, Any]:
    """SIGSTOP the controller under fio; past the lease, a write is issued and a written
    block read; the write must still be pending when SIGCONT comes, and complete after."""
    mark, old, new = (Block(os.urandom(4096)) for _ in range(3))
    _io(dev, MARK, mark, True)
    _io(dev, PROBE, old, True)
    pid = int((d / "controller.pid").read_text())
    fio = start_fio(d, dev, log)
    ev: dict[str, Any] = {"fio": fio, "fio_writing": alive(fio), "stopped": time.monotonic()}
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(LEASE + 2.0)  # the agent's lease was renewed before the stop, at best
        ev["disk_writes_at_issue"] = disk_writes(dev)
        done: dict[str, Any] = {}

        def probe_write() -> None:
            try:
                _io(dev, PROBE, new, True)
            except OSError as e:
                done["error"] = str(e)
            done["at"] = time.monotonic()

        ev["issued"] = time.monotonic()
        writer = threading.Thread(target=probe_write, daemon=True)
        writer.start()
        back = Block()
        _io(dev, MARK, back, False)
        ev["read_ok"], ev["read_at"] = back.bytes() == mark.bytes(), time.monotonic()
        time.sleep(2.0)
        ev["pending_before_cont"] = writer.is_alive()
        ev["disk_writes_before_cont"] = disk_writes(dev)
        ev["fio_running_at_cont"] = alive(fio)
        ev["write_done_before_cont"] = dict(done)
    finally:
        ev["continued"] = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    writer.join(WAIT + 60)
    ev["write_error"], ev["write_done"] = done.get("error"), done.get("at")
    back = Block()
    _io(dev, PROBE, back, False)
    ev["readback_ok"] = back.bytes() == new.bytes()
    return ev


def down(d: Path) -> None:
    for name in ("handler.pid", "controller.pid"):
        try:
            pid = int((d / name).read_text())
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        for _ in range(600):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    cmd, d = argv[0], Path(argv[1])
    if cmd == "up":
        from tests.vm.lio import parse_size  # noqa: PLC0415

        print(json.dumps(up(d, parse_size(argv[2]))))
    elif cmd == "restart":
        print(json.dumps(restart(d, argv[2], Path(argv[3]))))
    elif cmd == "partition":
        print(json.dumps(partition(d, argv[2], Path(argv[3]))))
    elif cmd == "down":
        down(d)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


# --- on the host ----------------------------------------------------------------------------


@pytest.fixture
def lun(guest: Guest, results_dir: Path) -> Iterator[str]:
    """The agent-served LUN's /dev/sdX."""
    try:
        out = _json(guest.module("tests.vm.test_agent_faults", "up", WHERE, SIZE,
                                 timeout=400).stdout)  # fmt: skip
        yield str(out["dev"])
    finally:
        # the LUN goes first, while the handler still answers its removal
        guest.module("tests.vm.lio", "clear", timeout=120, check=False)
        guest.module("tests.vm.test_agent_faults", "down", WHERE, timeout=180, check=False)
        for log in ("handler.log", "controller.log"):
            guest.run(["cp", f"{WHERE}/{log}", str(results_dir)], check=False)
        guest.run(["rm", "-rf", WHERE], check=False)


def _json(stdout: str) -> Any:
    return json.loads([ln for ln in stdout.splitlines() if ln.strip()][-1])


def _finished_clean(guest: Guest, pid: int, log: Path) -> None:
    """Wait for fio (a zombie once done: its parent exited) and check its verify."""
    guest.run(["sh", "-c", f"while [ -e /proc/{pid} ] && ! grep -q '^State:.*Z' "
               f"/proc/{pid}/status 2>/dev/null; do sleep 1; done"], timeout=600)  # fmt: skip
    text = log.read_text()
    assert "err= 0" in text, text[-3000:]
    assert "verify: bad" not in text.lower() and "bad magic" not in text.lower(), text[-3000:]


@pytest.mark.vm
@pytest.mark.timeout(1200)
def test_controller_killed_and_stopped_under_io(guest: Guest, lun: str, results_dir: Path) -> None:
    events: dict[str, Any] = {}
    # (a) SIGKILL and restart under I/O
    log = results_dir / "fio-restart.log"
    ev = events["restart"] = _json(guest.module("tests.vm.test_agent_faults", "restart", WHERE,
                                                lun, str(log), timeout=300).stdout)  # fmt: skip
    (results_dir / "events.json").write_text(json.dumps(events, indent=2))
    assert ev["fio_writing"] and ev["fio_running_at_restart"], ev  # the fault hit its writes
    _finished_clean(guest, ev["fio"], log)
    # (b) SIGSTOP: partitioned past the lease, then SIGCONT
    log = results_dir / "fio-partition.log"
    out = guest.module("tests.vm.test_agent_faults", "partition", WHERE, lun, str(log),
                       timeout=400)  # fmt: skip
    ev = events["partition"] = _json(out.stdout)
    (results_dir / "events.json").write_text(json.dumps(events, indent=2))
    assert ev["fio_writing"] and ev["fio_running_at_cont"], ev
    assert ev["read_ok"], ev  # reads of written data go on without a lease
    assert ev["pending_before_cont"], ev  # no write completes without a lease...
    (done_at_issue, _), (done_before_cont, in_flight) = (
        ev["disk_writes_at_issue"], ev["disk_writes_before_cont"],
    )  # fmt: skip
    assert done_before_cont == done_at_issue and in_flight > 1, ev  # ...fio's neither
    assert ev["write_error"] is None, ev  # held, not failed: the initiator sees no error
    assert ev["write_done"] > ev["continued"], ev
    assert ev["readback_ok"], ev
    _finished_clean(guest, ev["fio"], log)
    # the agent registered with the first controller and again with its successor (and
    # reloaded its tables: fio's verify read them)
    said = guest.run(["cat", f"{WHERE}/controller.log"]).stdout
    assert said.count("agent gw1 registered") >= 2, said[-3000:]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
