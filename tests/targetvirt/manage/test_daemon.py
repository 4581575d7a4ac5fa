"""The daemon, without the kernel: the LUNs it builds for the TCMU service hear of their
pool's soft threshold; a failing container fails only what meets it; its state on disk is
private: folders 0700, files 0600, whatever the umask (the TLS keys:
tests/targetvirt/transport/test_tls.py)."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from targetvirt.errors import NotFound
from targetvirt.manage import controld, daemon
from targetvirt.manage.common import agent_of
from targetvirt.manage.controld import ControllerService
from targetvirt.manage.daemon import AgentHandler, Handler, Serving, make_handler, parse_args
from targetvirt.transport.inprocess import InProcessLink
from tcmu_handler import config
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.service import DeviceInfo
from tests.targetvirt.faults import (
    GOOD,
    MEDIUM_READ,
    READ,
    SOFT_THRESHOLD,
    SPACE_ALLOCATION_FAILED,
    FaultyFiles,
    ScsiLun,
    outcome,
)
from tests.targetvirt.manage.conftest import open_manager
from tests.targetvirt.manage.fakes import FakeLio

MIB = 1 << 20
TUR = bytes(6)


@dataclass
class FakeDevice:
    name: str
    backend: BlockBackend
    lun: LunState


class FakeTcmu:
    """What the daemon looks at of its TCMU service: the devices it serves."""

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}

    def stop(self) -> None:
        pass


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[Handler]:
    args = parse_args(["--state-dir", str(tmp_path / "state"), "--run-dir",
                       str(tmp_path / "run"), "--no-dbus", "--no-restore"])  # fmt: skip
    h = Handler(args)
    h.tcmu = FakeTcmu()
    yield h
    h.stop()


def serve(handler: Handler, spec: str, size: int) -> ScsiLun:
    """Open a LUN as the TCMU service does (the daemon's open_lun) and 'serve' it."""
    cfg = config.parse(spec)
    key = f"user_1/{cfg.vdisk}"
    backend, lun = handler.open_lun(cfg, DeviceInfo(1, cfg.vdisk, 512, size, spec))
    handler.tcmu.devices[key] = FakeDevice(key, backend, lun)
    return ScsiLun(backend, "", MIB, lun=lun)


def test_every_lun_of_the_pool_reports_its_soft_threshold(handler: Handler, tmp_path: Path) -> None:
    cat = handler.catalog
    cat.create_pool("p", str(tmp_path / "p.img"), 11 * MIB, threshold=60)  # 10 segments
    cat.create_pool("q", str(tmp_path / "q.img"), 11 * MIB)
    for name, pool in (("a", "p"), ("b", "p"), ("c", "q")):
        cat.create_vdisk(name, pool, 8 * MIB)
    a, b, c = (serve(handler, f"targetvirt/{n}", 8 * MIB) for n in "abc")
    for i in range(5):
        assert outcome(a.write(i * MIB, b"x" * MIB)) is GOOD
    assert [outcome(x.run(TUR)) for x in (a, b, c)] == [GOOD, GOOD, GOOD]
    assert outcome(b.write(0, b"y" * 4096)) is GOOD  # 6 of 10 segments: 60 %
    assert [outcome(x.run(TUR)) for x in (a, b, c)] == [SOFT_THRESHOLD] * 2 + [GOOD]
    assert [outcome(x.run(TUR)) for x in (a, b, c)] == [GOOD, GOOD, GOOD]
    assert outcome(a.read(0, 4096)) is GOOD


def test_a_failing_container_fails_only_the_reads_that_meet_it(
    handler: Handler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = FaultyFiles(monkeypatch)
    cat = handler.catalog
    cat.create_pool("p", str(tmp_path / "p.img"), 11 * MIB)
    cat.create_vdisk("a", "p", 8 * MIB)
    a = serve(handler, "targetvirt/a", 8 * MIB)
    for i in range(3):
        assert outcome(a.write(i * MIB, bytes([i + 1]) * MIB)) is GOOD
    c = cat.pool("p").containers[0]
    faults.fail(c.path, c.offset_of(1), 4096, ops=[READ])
    assert outcome(a.read(MIB, 4096)) == MEDIUM_READ
    # its only container failed, the pool can take no new data: past its threshold; the
    # controller announces a crossing found by an agent's failure report at its next tick
    # (the daemon's timer runs it within a second)
    handler.controller.tick()
    assert outcome(a.run(TUR)) == SOFT_THRESHOLD
    assert outcome(a.read(MIB + 4096, 4096)) is GOOD
    assert outcome(a.read(2 * MIB, 4096)) is GOOD
    assert [u.state for u in cat.pool("p").usage()] == ["failed"]
    assert outcome(a.write(0, b"z" * 4096)) is GOOD  # in place
    assert outcome(a.write(5 * MIB, b"z" * 4096)) == SPACE_ALLOCATION_FAILED
    assert cat.clear_failure("p", 0)
    assert outcome(a.write(5 * MIB, b"z" * 4096)) is GOOD


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask 022", "umask 000"])
def test_state_files_are_private(tmp_path: Path, mask: int) -> None:
    state = tmp_path / "state"
    with umask(mask):
        catalog = daemon.open_catalog(str(state))
        catalog.close()
        m = open_manager(state, FakeLio())
        try:
            m.create_pool("p1", path=str(tmp_path / "p1.img"), size=64 * MIB)
            m.create_vdisk("db", "p1", MIB)
            m.export("db", acls=["iqn.2020-01.org.example:client"])
            m.catalog.commit()
            files = sorted(p.name for p in state.iterdir())
            assert files == ["exports.json", "targetvirt.db", "targetvirt.db-shm",
                             "targetvirt.db-wal", "targetvirt.db.lock"]  # fmt: skip
            assert mode(state) == 0o700
            for name in files:
                assert mode(state / name) == 0o600, name
            assert mode(tmp_path / "p1.img") == 0o600  # a container holds vdisk data
        finally:
            m.stop()
            m.catalog.close()


def test_run_dir_is_private(tmp_path: Path) -> None:
    """The daemon makes its run folder (bus address, pid) 0700 before anything else."""
    run = tmp_path / "run"
    blocker = tmp_path / "file"
    blocker.write_text("")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with umask(0):  # the state folder cannot be made under a file: main stops there
            rc = daemon.main(["--state-dir", str(blocker / "state"), "--run-dir", str(run)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert rc == 1
    assert mode(run) == 0o700


# --- agent only: --controller ------------------------------------------------------------


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[ControllerService, str]]:
    """targetvirt-controller on the handler's state folder, serving a Unix socket; pool p
    and vdisk a made beforehand (as an operator would, where the controller runs)."""
    state = tmp_path / "state"
    catalog = daemon.open_catalog(str(state))
    catalog.create_pool("p", str(tmp_path / "p.img"), 11 * MIB)
    catalog.create_vdisk("a", "p", 8 * MIB)
    catalog.close()
    sock = str(tmp_path / "ctl.sock")
    service = ControllerService(controld.parse_args(["--state-dir", str(state), "--unix", sock]))
    service.start()
    yield service, sock
    service.stop()


@pytest.fixture
def agent_handler(tmp_path: Path, controller: tuple[ControllerService, str]) -> Iterator[Serving]:
    args = parse_args(["--controller", f"unix:{controller[1]}", "--run-dir",
                       str(tmp_path / "run"), "--no-dbus", "--agent-id", "gw1"])  # fmt: skip
    (tmp_path / "run").mkdir()  # main() makes it
    h = make_handler(args)
    h.tcmu = FakeTcmu()
    h._connect()  # what start() does before the (kernel) TCMU service
    yield h
    h.stop()


def test_agent_mode_has_no_catalog_nor_controller(agent_handler: Serving) -> None:
    assert isinstance(agent_handler, AgentHandler)
    assert not hasattr(agent_handler, "catalog") and not hasattr(agent_handler, "controller")
    assert not isinstance(agent_handler.agent.link, InProcessLink)


def test_agent_mode_serves_luns_with_the_vdisks_identity(
    agent_handler: Serving, controller: tuple[ControllerService, str]
) -> None:
    service, _ = controller
    assert service.catalog is not None
    uuid = service.catalog.vdisk("a").uuid
    cfg = config.parse("targetvirt/a")
    backend, lun = agent_handler.open_lun(cfg, DeviceInfo(1, "a", 512, 8 * MIB, "targetvirt/a"))
    expected = LunState.for_vdisk(uuid, 8 * MIB // 512, segment_size=MIB)
    assert (lun.naa, lun.serial) == (expected.naa, expected.serial)
    a = ScsiLun(backend, "", MIB, lun=lun)
    assert outcome(a.write(MIB, b"x" * 4096)) is GOOD
    assert outcome(a.read(MIB, 4096)) is GOOD
    assert service.controller is not None and service.controller.servers("a") == ["gw1"]
    assert service.catalog.vdisk("a").read(MIB, 4) == b"xxxx"  # the controller's table
    agent_handler.check_vdisk(cfg)  # CheckConfig: asks the controller
    with pytest.raises(NotFound, match="nosuch"):
        agent_handler.check_vdisk(config.parse("targetvirt/nosuch"))
    with pytest.raises(NotFound):
        agent_handler.open_lun(config.parse("targetvirt/nosuch"),
                               DeviceInfo(1, "n", 512, MIB, "targetvirt/nosuch"))  # fmt: skip


def test_an_agent_handler_tells_the_shell_where_management_is(
    agent_handler: Serving, tmp_path: Path
) -> None:
    assert isinstance(agent_handler, AgentHandler)
    agent_handler.mark_agent()  # what start() does once it serves
    assert agent_of(tmp_path / "run") == f"unix:{tmp_path}/ctl.sock"
    agent_handler.stop()
    assert agent_of(tmp_path / "run") is None


def test_the_default_mode_is_unchanged(handler: Handler) -> None:
    assert isinstance(handler.agent.link, InProcessLink)
    assert handler.agent.controller_wait == 0  # in process the controller is always there


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--controller", "ctl.example"], "give unix:PATH, HOST:PORT or rados:POOL"),
        (["--controller", "ctl.example:7443"], "needs --tls-dir"),
        (["--controller", "unix:"], "needs a socket path"),
        (["--tls-dir", "/x"], "need --controller"),
        (["--commands", "rados:p"], "need --controller"),
        (["--controller", "unix:/s", "--commands", "/tmp/x"], "--commands '/tmp/x': give rados:"),
        (["--controller", "unix:/s", "--controller-wait", "-1"], "--controller-wait must be"),
        (["--devices", " "], "--devices needs a pattern"),
        (["--workers", "0"], "--workers and --network-workers must be at least 1"),
        (["--network-workers", "-2"], "--workers and --network-workers must be at least 1"),
    ],
)
def test_bad_agent_arguments_are_refused_in_one_line(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err


def test_an_unreachable_controller_fails_the_start_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sock, run = f"unix:{tmp_path}/none.sock", str(tmp_path / "run")
        rc = daemon.main(
            ["--controller", sock, "--no-dbus", "--run-dir", run, "--controller-wait", "0"]
        )
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("targetvirt-handler: controller at unix:") and "Traceback" not in err


@pytest.mark.ceph
def test_an_agent_handler_takes_commands_by_notify(tmp_path: Path, rados_location: str) -> None:
    """``--controller rados:... --commands rados:...``: the gateway's agent hears the
    controller's commands as notifies on the headers of what it serves, and acks them;
    a live snapshot (freeze, drain, thaw by notify) and the copy-on-write after it work."""
    from targetvirt.catalog import Catalog  # noqa: PLC0415
    from targetvirt.store.rados import RadosStore  # noqa: PLC0415

    catalog = Catalog.open(RadosStore(rados_location, create=True))
    catalog.create_pool("p", rados_location, 16 * MIB)
    catalog.create_vdisk("a", "p", 8 * MIB)
    catalog.close()
    sock = str(tmp_path / "ctl.sock")
    service = ControllerService(controld.parse_args(
        ["--store", rados_location, "--unix", sock, "--commands", rados_location]))  # fmt: skip
    service.start()
    (tmp_path / "run").mkdir()
    h = make_handler(parse_args(["--controller", rados_location, "--commands", rados_location,
                                 "--run-dir", str(tmp_path / "run"), "--no-dbus",
                                 "--agent-id", "gw1"]))  # fmt: skip
    try:
        h.tcmu = FakeTcmu()
        h._connect()
        cfg = config.parse("targetvirt/a")
        backend, lun = h.open_lun(cfg, DeviceInfo(1, "a", 512, 8 * MIB, "targetvirt/a"))
        a = ScsiLun(backend, "", MIB, lun=lun)
        assert outcome(a.write(MIB, b"x" * 4096)) is GOOD
        ctl = service.controller
        assert ctl is not None
        assert [type(s.sink).__name__ for s in ctl.sessions()] == ["NotifySink"]
        ctl.snapshot("a", "s1")  # freeze and thaw reach the agent by notify
        assert outcome(a.write(MIB, b"y" * 4096)) is GOOD  # copy-on-write after it
        assert outcome(a.read(MIB, 4096)) is GOOD
        assert service.catalog is not None
        assert service.catalog.vdisk("a").read(MIB, 4) == b"yyyy"
        assert service.catalog.vdisk("a@s1").read(MIB, 4) == b"xxxx"
    finally:
        h.stop()
        service.stop()
