"""targetvirt-controller on a file store (the handler's state folder), without Ceph:
arguments, serving an agent of another link, a restart that finds every mapping."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from targetvirt.agent import Agent
from targetvirt.errors import StoreLocked
from targetvirt.manage import controld, daemon
from targetvirt.manage.controld import ControllerService
from targetvirt.transport.network import NetworkLink

MIB = 1 << 20


def run_main(argv: list[str]) -> int:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return controld.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--store", "ftp:x", "--unix", "/s"], "give file:DIR (a state folder) or rados:POOL"),
        (["--store", "file:", "--unix", "/s"], "needs a folder"),
        (["--state-dir", "/d", "--unix", "/s", "--standby"], "--standby needs a RADOS store"),
        (["--state-dir", "/d"], "needs --unix PATH or --tcp HOST:PORT"),
        (["--state-dir", "/d", "--tcp", "127.0.0.1:0"], "--tcp needs --tls-dir"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("targetvirt-controller: ") and why in err, err
    assert len(err.strip().splitlines()) == 1


def test_store_and_state_dir_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        controld.parse_args(["--store", "file:/a", "--state-dir", "/b", "--unix", "/s"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_state_folder_that_cannot_be_made_ends_the_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = run_main(["--state-dir", str(blocker / "state"), "--unix", str(tmp_path / "s")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("targetvirt-controller: ") and "Traceback" not in err


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    catalog = daemon.open_catalog(str(d))
    catalog.create_pool("p", str(tmp_path / "p.img"), 9 * MIB)
    catalog.create_vdisk("v", "p", 4 * MIB)
    catalog.close()
    return d


Start = Callable[[], ControllerService]


@pytest.fixture
def start(state: Path, tmp_path: Path) -> Iterator[Start]:
    services: list[ControllerService] = []

    def start() -> ControllerService:
        s = ControllerService(controld.parse_args(
            ["--store", f"file:{state}", "--unix", str(tmp_path / "ctl.sock"), "--lease", "3"]
        ))  # fmt: skip
        s.start()
        services.append(s)
        return s

    yield start
    for s in services:
        s.stop()


def test_the_handlers_state_folder_is_served_to_an_agent(start: Start, tmp_path: Path) -> None:
    service = start()
    assert service.lease_lost == ""  # no store lease on a file store
    agent = Agent("gw", NetworkLink(f"unix:{tmp_path}/ctl.sock", call_timeout=5))
    try:
        vd = agent.serve("v")
        vd.write_from(MIB + 7, [memoryview(b"hello")], False)
        vd.flush()
    finally:
        agent.close()
    service.stop()
    catalog = daemon.open_catalog(str(tmp_path / "state"))  # the handler would open this
    try:
        assert catalog.vdisk("v").read(MIB + 7, 5) == b"hello"
    finally:
        catalog.close()


def test_one_writer_per_state_folder(start: Start, tmp_path: Path) -> None:
    start()
    with pytest.raises(StoreLocked, match="in use by another process"):
        daemon.open_catalog(str(tmp_path / "state"))
