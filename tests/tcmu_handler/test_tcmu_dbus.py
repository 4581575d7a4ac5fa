"""The TCMUService1 registration, against a real (private) dbus-daemon."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dbus
import pytest

from targetvirt.errors import NotFound
from tcmu_handler import config
from tcmu_handler.tcmu_dbus import (
    HANDLER_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    ROOT_PATH,
    SERVICE,
    TcmuBusService,
    check_config,
)
from tests.dbus_bus import private_bus


def known(cfg: config.DevConfig) -> None:
    if cfg.vdisk != "db":
        raise NotFound(f"no vdisk named {cfg.vdisk!r}")


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    with private_bus(tmp_path) as address:
        yield address


def test_check_config_answers() -> None:
    assert check_config("targetvirt/db", known) == (True, "success")
    assert check_config("targetvirt/db@s1;ro=1", known) == (True, "success")
    ok, why = check_config("targetvirt/nope", known)
    assert not ok and why == "no vdisk named 'nope'"
    ok, why = check_config("qcow/db", known)
    assert not ok and "does not start with 'targetvirt/'" in why


def test_serves_tcmuservice1_alone_like_tcmu_runner_would(bus: str) -> None:
    service = TcmuBusService(known, address=bus)
    service.start()
    try:
        assert service.mode == "service"
        client = dbus.bus.BusConnection(bus)
        root = client.get_object(SERVICE, ROOT_PATH)
        objects = root.GetManagedObjects(dbus_interface=OBJECT_MANAGER_IFACE)
        path = f"{ROOT_PATH}/targetvirt"
        assert list(objects) == [path]
        assert "targetvirt/<vdisk>" in objects[path][HANDLER_IFACE]["ConfigDesc"]
        handler = dbus.Interface(client.get_object(SERVICE, path), HANDLER_IFACE)
        assert tuple(handler.CheckConfig("targetvirt/db")) == (True, "success")
        ok, why = handler.CheckConfig("targetvirt/bad:name")
        assert not ok and "':'" in why
        desc = client.get_object(SERVICE, path).Get(
            HANDLER_IFACE, "ConfigDesc", dbus_interface="org.freedesktop.DBus.Properties"
        )
        assert str(desc).startswith("targetvirt/")
        client.close()
    finally:
        service.stop()


FAKE_RUNNER = r"""
import sys, dbus, dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
DBusGMainLoop(set_as_default=True)
bus = dbus.bus.BusConnection(sys.argv[1])
# What tcmu-runner does on RegisterHandler (libtcmu-register.c): check the handler's bus
# name is present, then forward CheckConfig calls to it.
class Manager(dbus.service.Object):
    @dbus.service.method(
        "org.kernel.TCMUService1.HandlerManager1", in_signature="ss", out_signature="bs")
    def RegisterHandler(self, subtype, desc):
        name = "org.kernel.TCMUService1.HandlerManager1." + subtype
        if not bus.name_has_owner(name):
            return False, "Cannot find handler bus name: " + name
        path = "/org/kernel/TCMUService1/HandlerManager1/" + subtype
        handler = dbus.Interface(bus.get_object(name, path), "org.kernel.TCMUService1")
        ok, msg = handler.CheckConfig(subtype + "/db")
        print("registered", subtype, bool(ok), msg, flush=True)
        return True, "succeeded"
name = dbus.service.BusName("org.kernel.TCMUService1", bus)
Manager(bus, "/org/kernel/TCMUService1/HandlerManager1")
print("ready", flush=True)
GLib.MainLoop().run()
"""


def test_registers_with_a_running_tcmu_runner(bus: str, tmp_path: Path) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", FAKE_RUNNER, bus], stdout=subprocess.PIPE, text=True
    )
    try:
        assert runner.stdout is not None and runner.stdout.readline().strip() == "ready"
        service = TcmuBusService(known, address=bus)
        service.start()
        try:
            assert service.mode == "registered"
            assert runner.stdout.readline().split() == [
                "registered",
                "targetvirt",
                "True",
                "success",
            ]
            client = dbus.bus.BusConnection(bus)
            handler = dbus.Interface(
                client.get_object(f"{MANAGER_IFACE}.targetvirt", f"{MANAGER_PATH}/targetvirt"),
                HANDLER_IFACE,
            )
            ok, _ = handler.CheckConfig("targetvirt/zz")
            assert not ok
            client.close()
        finally:
            service.stop()
    finally:
        runner.kill()
        runner.wait()
