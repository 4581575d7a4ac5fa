"""The ``org.kernel.TCMUService1`` side of a TCMU handler, on the system bus.

targetcli lists ``user:<subtype>`` backstores and validates their config strings through
this service.  Two ways to appear there:

* tcmu-runner runs (it owns ``org.kernel.TCMUService1``): own
  ``org.kernel.TCMUService1.HandlerManager1.targetvirt``, export ``CheckConfig`` at
  ``/org/kernel/TCMUService1/HandlerManager1/targetvirt``, then ``RegisterHandler`` with
  tcmu-runner, which forwards targetcli's calls to us;
* it does not: own ``org.kernel.TCMUService1`` ourselves and serve the ObjectManager at
  ``/org/kernel/TCMUService1`` with one child, ``.../targetvirt`` (this also keeps D-Bus
  activation from starting tcmu-runner behind our back).

dbus-python dispatches method calls from a GLib main loop; :class:`TcmuBusService` runs
one in its own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import dbus
import dbus.mainloop.glib
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

from targetvirt.errors import TargetvirtError
from tcmu_handler import config

log = logging.getLogger(__name__)

SERVICE = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"
HANDLER_IFACE = "org.kernel.TCMUService1"
MANAGER_PATH = "/org/kernel/TCMUService1/HandlerManager1"
MANAGER_IFACE = "org.kernel.TCMUService1.HandlerManager1"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
CONFIG_DESC = (
    "targetvirt/<vdisk>[@<snapshot>][;ro=1]: a targetvirt vdisk (or a snapshot, read-only)"
    " served by targetvirt-handler"
)

# check(config_string_without_subtype_check) -> None or raises TargetvirtError
VdiskCheck = Callable[[config.DevConfig], None]


def check_config(text: str, exists: VdiskCheck) -> tuple[bool, str]:
    """CheckConfig's answer for a full ``targetvirt/...`` config string."""
    try:
        parsed = config.parse(text)
        exists(parsed)
    except TargetvirtError as e:
        return False, str(e)
    return True, "success"


class _Handler(dbus.service.Object):  # type: ignore[misc]
    """The per-subtype object: CheckConfig and the ConfigDesc property."""

    def __init__(self, conn: Any, path: str, exists: VdiskCheck) -> None:
        super().__init__(conn, path)
        self._exists = exists

    @dbus.service.method(HANDLER_IFACE, in_signature="s", out_signature="bs")  # type: ignore[untyped-decorator]
    def CheckConfig(self, configstr: str) -> tuple[bool, str]:
        return check_config(str(configstr), self._exists)

    @dbus.service.method(PROPERTIES_IFACE, in_signature="ss", out_signature="v")  # type: ignore[untyped-decorator]
    def Get(self, interface: str, prop: str) -> Any:
        if interface == HANDLER_IFACE and prop == "ConfigDesc":
            return dbus.String(CONFIG_DESC)
        raise dbus.exceptions.DBusException(
            f"no property {interface}.{prop}", name="org.freedesktop.DBus.Error.UnknownProperty"
        )

    @dbus.service.method(PROPERTIES_IFACE, in_signature="s", out_signature="a{sv}")  # type: ignore[untyped-decorator]
    def GetAll(self, interface: str) -> dict[str, Any]:
        if interface == HANDLER_IFACE:
            return {"ConfigDesc": dbus.String(CONFIG_DESC)}
        return {}


class _ObjectManager(dbus.service.Object):  # type: ignore[misc]
    """``/org/kernel/TCMUService1`` when no tcmu-runner runs: lists our one handler."""

    @dbus.service.method(OBJECT_MANAGER_IFACE, out_signature="a{oa{sa{sv}}}")  # type: ignore[untyped-decorator]
    def GetManagedObjects(self) -> dict[str, Any]:
        child = dbus.ObjectPath(f"{ROOT_PATH}/{config.SUBTYPE}")
        props = dbus.Dictionary({"ConfigDesc": dbus.String(CONFIG_DESC)}, signature="sv")
        return {child: dbus.Dictionary({HANDLER_IFACE: props}, signature="sa{sv}")}


class TcmuBusService:
    """Registers the ``targetvirt`` subtype on the system bus (or the bus at ``address``)."""

    def __init__(self, exists: VdiskCheck, address: str | None = None) -> None:
        self._exists = exists
        self._address = address
        self._loop: Any = None
        self._thread: threading.Thread | None = None
        self._objects: list[Any] = []
        self._names: list[Any] = []
        self.mode = ""

    def start(self) -> None:
        """Connect and register; raises on failure (the daemon logs it and goes on)."""
        dbus.mainloop.glib.threads_init()
        DBusGMainLoop(set_as_default=True)
        bus = dbus.bus.BusConnection(self._address) if self._address else dbus.SystemBus()
        # The loop runs first: tcmu-runner may call CheckConfig while we register.
        self._loop = GLib.MainLoop()
        self._thread = threading.Thread(target=self._loop.run, name="tcmu-dbus", daemon=True)
        self._thread.start()
        if bus.name_has_owner(SERVICE):
            self._register_with_runner(bus)
        else:
            self._serve_alone(bus)

    def _serve_alone(self, bus: Any) -> None:
        self._names.append(dbus.service.BusName(SERVICE, bus, do_not_queue=True))
        self._objects.append(_ObjectManager(bus, ROOT_PATH))
        self._objects.append(_Handler(bus, f"{ROOT_PATH}/{config.SUBTYPE}", self._exists))
        self.mode = "service"
        log.info("owning %s: targetcli sees user:%s without tcmu-runner", SERVICE, config.SUBTYPE)

    def _register_with_runner(self, bus: Any) -> None:
        name = f"{MANAGER_IFACE}.{config.SUBTYPE}"
        self._names.append(dbus.service.BusName(name, bus, do_not_queue=True))
        self._objects.append(_Handler(bus, f"{MANAGER_PATH}/{config.SUBTYPE}", self._exists))
        manager = dbus.Interface(bus.get_object(SERVICE, MANAGER_PATH), MANAGER_IFACE)
        # Asynchronous: our connection must stay free to answer tcmu-runner's calls
        # (CheckConfig) while it processes the registration.
        done = threading.Event()
        result: list[Any] = []

        def replied(ok: bool, message: str) -> None:
            result.append((bool(ok), str(message)))
            done.set()

        def failed(error: Exception) -> None:
            result.append((False, str(error)))
            done.set()

        manager.RegisterHandler(
            config.SUBTYPE, CONFIG_DESC, reply_handler=replied, error_handler=failed
        )
        if not done.wait(30):
            raise TargetvirtError("tcmu-runner did not answer RegisterHandler in 30 s")
        ok, message = result[0]
        if not ok:
            raise TargetvirtError(f"tcmu-runner refused to register {config.SUBTYPE}: {message}")
        self.mode = "registered"
        log.info("registered subtype %s with tcmu-runner", config.SUBTYPE)

    def stop(self) -> None:
        for obj in self._objects:
            obj.remove_from_connection()
        self._objects.clear()
        self._names.clear()
        if self._loop is not None:
            self._loop.quit()
        if self._thread is not None:
            self._thread.join(timeout=5)
