"""The daemon's state on disk is private: folders 0700, files 0600, whatever the umask
(the TLS keys: tests/targetvirt/transport/test_tls.py)."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from targetvirt.manage import daemon
from tests.targetvirt.manage.conftest import MIB, open_manager
from tests.targetvirt.manage.fakes import FakeLio


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
