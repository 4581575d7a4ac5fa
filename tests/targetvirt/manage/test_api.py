"""org.targetvirt.Manager1 on a private bus, called with dbus-python as any client would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbus
import dbus.mainloop
import pytest

from targetvirt.errors import InvalidArgument, NotFound
from targetvirt.manage.api import ManagerBusService, options
from targetvirt.manage.client import ManagerClient
from targetvirt.manage.common import IFACE, PATH, SERVICE
from targetvirt.manage.manager import Manager
from tests.dbus_bus import SYSTEM_CONF, system_like_bus
from tests.targetvirt.manage.conftest import MIB


@pytest.fixture
def api(daemon: ManagerBusService, bus: str) -> Iterator[Any]:
    conn = dbus.bus.BusConnection(bus, mainloop=dbus.mainloop.NULL_MAIN_LOOP)
    yield dbus.Interface(conn.get_object(SERVICE, PATH, introspect=False), IFACE)
    conn.close()


def sv(**values: Any) -> dbus.Dictionary:
    return dbus.Dictionary(values, signature="sv")


def call_error(method: Any, *args: Any) -> tuple[str, str]:
    with pytest.raises(dbus.DBusException) as e:
        method(*args)
    return e.value.get_dbus_name(), e.value.get_dbus_message()


def test_typed_calls_and_json_results(api: Any, tmp_path: Path) -> None:
    r = json.loads(
        api.CreatePool("p1", sv(path=str(tmp_path / "p.img"), size=dbus.UInt64(32 * MIB)))
    )
    assert r["name"] == "p1" and r["message"].startswith("Created pool p1")
    r = json.loads(api.CreateVdisk("db", "p1", dbus.UInt64(8 * MIB), sv(cow="copy")))
    assert r["name"] == "db"
    r = json.loads(api.Snapshot("db", "s1", sv()))
    assert r["name"] == "db@s1"
    listing = json.loads(api.List())
    assert [v["name"] for v in listing["vdisks"]] == ["db", "db@s1"]
    assert json.loads(api.Info("vdisk", "db"))["cow"] == "copy"
    job = json.loads(api.Flatten("db"))
    assert job["kind"] == "flatten" and job["id"] == 1
    for _ in range(100):
        job = json.loads(api.Job(dbus.UInt32(1)))
        if job["state"] != "running":
            break
        time.sleep(0.05)
    assert job["state"] == "done" and job["result"]["copied"] == 0
    assert json.loads(api.Status())["vdisks"] == 2


def test_errors_are_named_and_one_line(api: Any) -> None:
    assert call_error(api.Info, "vdisk", "nope") == (
        "org.targetvirt.Error.NotFound", "no vdisk named 'nope'")  # fmt: skip
    assert call_error(api.CreatePool, "p", sv(frob=1)) == (
        "org.targetvirt.Error.InvalidArgument",
        "CreatePool has no option 'frob' (known: client_id, conf, device, keyring, path, "
        "preallocate, rados, segment_size, size, threshold)",
    )
    assert call_error(api.SetPool, "p", sv(frob=1)) == (
        "org.targetvirt.Error.InvalidArgument",
        "SetPool has no option 'frob' (known: threshold)",
    )
    assert call_error(api.SetPool, "p", sv(threshold=dbus.UInt32(50))) == (
        "org.targetvirt.Error.NotFound",
        "no pool named 'p'",
    )
    assert call_error(api.ClearContainer, "p", dbus.UInt32(0)) == (
        "org.targetvirt.Error.NotFound",
        "no pool named 'p'",
    )
    bad = "org.targetvirt.Error.InvalidArgument"
    assert call_error(api.CreatePool, "p", sv(size="big")) == (
        bad, "CreatePool option 'size' must be an integer")  # fmt: skip
    assert call_error(api.Export, "db", sv(acls=dbus.Array([1], signature="i"))) == (
        bad, "Export option 'acls' must be a list of strings")  # fmt: skip
    assert call_error(api.Freeze, "db", sv(timeout=dbus.Int32(3)))[0] == (
        "org.targetvirt.Error.NotFound")  # an integer timeout is fine; db is unknown  # fmt: skip
    assert call_error(api.CancelJob, dbus.UInt32(7)) == (
        "org.targetvirt.Error.NotFound",
        "no job 7",
    )


def test_client_raises_the_named_error(daemon: ManagerBusService, bus: str) -> None:
    client = ManagerClient(bus)
    try:
        with pytest.raises(NotFound, match=r"^no pool named 'x'$"):
            client.delete_pool("x")
    finally:
        client.close()


def test_only_allowed_users(manager: Manager, bus: str) -> None:
    service = ManagerBusService(manager, bus, allowed_uids={4242})
    service.start()
    try:
        conn = dbus.bus.BusConnection(bus, mainloop=dbus.mainloop.NULL_MAIN_LOOP)
        iface = dbus.Interface(conn.get_object(SERVICE, PATH, introspect=False), IFACE)
        assert call_error(iface.Status) == (
            "org.targetvirt.Error.AccessDenied", "only root may manage targetvirt")  # fmt: skip
        conn.close()
    finally:
        service.stop()


def test_a_long_call_does_not_stall_others(manager: Manager, api: Any, bus: str,
                                           tmp_path: Path) -> None:  # fmt: skip
    """Calls run in worker threads: a slow one (here a held manager lock) leaves Status free."""
    manager.create_pool("p1", path=str(tmp_path / "p.img"), size=32 * MIB)
    other = ManagerClient(bus)  # its own connection: one blocking caller per connection
    slow: list[Any] = []
    with manager.lock:
        t = threading.Thread(target=lambda: slow.append(other.create_vdisk("db", "p1", MIB)))
        t.start()
        time.sleep(0.2)
        assert json.loads(api.Status())["pools"] == 1  # answered while CreateVdisk waits
        assert not slow
    t.join(10)
    other.close()
    assert slow[0]["name"] == "db"


def test_options() -> None:
    assert options(sv(recursive=dbus.Boolean(True)), {"recursive": bool}, "X") == {
        "recursive": True}  # fmt: skip
    assert options(sv(timeout=dbus.UInt32(2)), {"timeout": float}, "X") == {"timeout": 2.0}
    with pytest.raises(InvalidArgument, match=r"^X option 'recursive' must be a boolean$"):
        options(sv(recursive=dbus.UInt32(1)), {"recursive": bool}, "X")
    with pytest.raises(InvalidArgument, match=r"^X option 'n' must be an integer$"):
        options(sv(n=dbus.Boolean(True)), {"n": int}, "X")


# --- the D-Bus policy file, enforced by a real dbus-daemon against a real non-root user --

POLICY = Path(__file__).resolve().parents[3] / "packaging" / "dbus" / "targetvirt.conf"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def can_switch_user() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    return subprocess.run([*NOBODY, "true"], capture_output=True, check=False).returncode == 0


needs_other_user = pytest.mark.skipif(
    not can_switch_user() or not SYSTEM_CONF.exists(),
    reason="needs root, setpriv and the system bus configuration to run a caller as nobody",
)


@pytest.fixture
def system_bus() -> Iterator[str]:
    """A system-like bus (the distribution's default policy plus ours) on a socket that
    the nobody user can reach."""
    folder = Path(tempfile.mkdtemp(prefix="tv-bus-"))
    folder.chmod(0o755)
    try:
        with system_like_bus(folder, POLICY) as address:
            yield address
    finally:
        shutil.rmtree(folder)


def dbus_send(address: str, dest: str, path: str, method: str, *args: str,
              as_nobody: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    argv = ["dbus-send", f"--bus={address}", "--print-reply", f"--dest={dest}", path, method,
            *args]  # fmt: skip
    return subprocess.run([*NOBODY, *argv] if as_nobody else argv, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip


BUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus")
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


@needs_other_user
def test_policy_admits_root_only(manager: Manager, system_bus: str) -> None:
    """packaging/dbus/targetvirt.conf on a bus with the system bus's default policy: root
    owns and calls org.targetvirt.Manager1; nobody may call it or take its names, though
    it can talk to the bus itself (so the refusal is the policy's, not a dead socket)."""
    service = ManagerBusService(manager, system_bus, allowed_uids=set())  # the bus decides
    service.start()
    try:
        status = (SERVICE, PATH, f"{IFACE}.Status")
        ok = dbus_send(system_bus, *status)
        assert ok.returncode == 0 and '"pools": 0' in ok.stdout, ok
        assert dbus_send(system_bus, *BUS, "org.freedesktop.DBus.GetId", as_nobody=True)
        refused = dbus_send(system_bus, *status, as_nobody=True)
        assert refused.returncode != 0 and ACCESS_DENIED in refused.stderr, refused
        for name in (SERVICE, "org.kernel.TCMUService1",
                     "org.kernel.TCMUService1.HandlerManager1.targetvirt"):  # fmt: skip
            take = dbus_send(system_bus, *BUS, "org.freedesktop.DBus.RequestName",
                             f"string:{name}", "uint32:4", as_nobody=True)  # fmt: skip
            assert take.returncode != 0 and ACCESS_DENIED in take.stderr, (name, take)
    finally:
        service.stop()


@needs_other_user
def test_shell_run_by_another_user_says_run_as_root(manager: Manager, system_bus: str) -> None:
    service = ManagerBusService(manager, system_bus, allowed_uids=set())
    service.start()
    try:
        shell = [sys.executable, "-m", "targetvirt.manage.shell", "--bus-address", system_bus,
                 "info"]  # fmt: skip
        checkout = str(POLICY.parents[2])
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": checkout, "HOME": "/nonexistent"}
        probe = subprocess.run([*NOBODY, sys.executable, "-c", "import targetvirt.manage.shell"],
                               capture_output=True, env=env, cwd="/", check=False)  # fmt: skip
        if probe.returncode:
            pytest.skip("the checkout or the venv is not readable by nobody here")
        r = subprocess.run([*NOBODY, *shell], capture_output=True, text=True, env=env, cwd="/",
                           timeout=60, check=False)  # fmt: skip
        assert (r.returncode, r.stdout) == (1, ""), r
        assert r.stderr == (f"targetvirt: the bus at {system_bus} does not let this user call "
                            f"{SERVICE}: run as root\n")  # fmt: skip
    finally:
        service.stop()
