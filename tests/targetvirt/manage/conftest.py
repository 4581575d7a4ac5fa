"""Fixtures: a Manager over a real catalog (and a fake LIO), served on a private bus."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from targetvirt.catalog import Catalog
from targetvirt.manage.api import ManagerBusService
from targetvirt.manage.manager import Manager
from targetvirt.manage.shell import main
from targetvirt.store.sqlite import SqliteStore
from tests.dbus_bus import private_bus
from tests.targetvirt.manage.fakes import FakeLio

MIB = 1 << 20


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def lio() -> FakeLio:
    return FakeLio()


def open_manager(state: Path, lio: FakeLio, **kw: object) -> Manager:
    catalog = Catalog.open(SqliteStore(str(state / "targetvirt.db"), create=True))
    return Manager(catalog, state, exporter=lio, hostname="host1", **kw)  # type: ignore[arg-type]


@pytest.fixture
def manager(state: Path, lio: FakeLio) -> Iterator[Manager]:
    m = open_manager(state, lio)
    yield m
    m.stop()
    m.catalog.close()


@pytest.fixture
def world(manager: Manager, tmp_path: Path) -> Manager:
    """Pool p1 (64 MiB file), vdisk db with snapshot db@s1 and clone c1, vdisk web exported
    (with a snapshot web@w1), ready for refusals."""
    manager.create_pool("p1", path=str(tmp_path / "p1.img"), size=64 * MIB)
    manager.create_vdisk("db", "p1", 16 * MIB)
    manager.snapshot("db", "s1")
    manager.clone("db", "c1", snapshot="s1")
    manager.create_vdisk("web", "p1", 8 * MIB)
    manager.snapshot("web", "w1")
    manager.export("web", acls=["iqn.2020-01.org.example:client"])
    return manager


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    with private_bus(tmp_path) as address:
        yield address


@pytest.fixture
def daemon(manager: Manager, bus: str) -> Iterator[ManagerBusService]:
    service = ManagerBusService(manager, bus)
    service.start()
    yield service
    service.stop()


@dataclass
class Run:
    rc: int
    out: str
    err: str


Shell = Callable[..., Run]


@pytest.fixture
def tv(daemon: ManagerBusService, bus: str) -> Shell:
    """Run the shell's main() in-process against the daemon: tv("/vdisks", "info")."""

    def run(*argv: str) -> Run:
        out, err = io.StringIO(), io.StringIO()
        rc = main(["--bus-address", bus, *argv], out=out, err=err)
        return Run(rc, out.getvalue(), err.getvalue())

    return run
