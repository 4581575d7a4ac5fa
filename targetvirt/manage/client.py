"""A client of the daemon's management API (``org.targetvirt.Manager1``), for the shell.

Calls are synchronous; D-Bus errors come back as the :class:`TargetvirtError` subclass
they name, so the shell prints exactly the daemon's one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import dbus
import dbus.mainloop

from targetvirt import errors
from targetvirt.errors import TargetvirtError
from targetvirt.manage.common import ERROR_PREFIX, IFACE, PATH, SERVICE, NotAvailable

CALL_TIMEOUT = 3600.0  # seconds: exports wait for devices, freezes for drains


class DaemonUnreachable(TargetvirtError):
    """The shell cannot talk to targetvirt-handler."""


class AccessDenied(TargetvirtError):
    """The bus or the daemon refused the caller."""


class InternalError(TargetvirtError):
    """The daemon failed unexpectedly (its log has the details)."""


_KINDS: dict[str, type[TargetvirtError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, TargetvirtError)
}
_KINDS.update(NotAvailable=NotAvailable, Failed=TargetvirtError, Internal=InternalError,
              AccessDenied=AccessDenied)  # fmt: skip


def _bus_name(address: str | None) -> str:
    return f"the bus at {address}" if address else "the system bus"


def translate(e: dbus.DBusException, address: str | None) -> TargetvirtError:
    name = e.get_dbus_name() or ""
    text = (e.get_dbus_message() or str(e)).strip().splitlines()
    message = text[0] if text else name
    if name.startswith(ERROR_PREFIX):
        cls = _KINDS.get(name[len(ERROR_PREFIX) :], TargetvirtError)
        if cls is errors.ScsiError:
            cls = TargetvirtError
        return cls(message)
    where = _bus_name(address)
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner"):  # fmt: skip
        return DaemonUnreachable(
            f"targetvirt-handler is not running: nobody serves {SERVICE} on {where} "
            "(start it: systemctl start targetvirt-handler)"
        )
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return AccessDenied(f"{where} does not let this user call {SERVICE}: run as root")
    if name == "org.freedesktop.DBus.Error.NoReply":
        return DaemonUnreachable(f"targetvirt-handler did not answer on {where} in time")
    return DaemonUnreachable(f"cannot talk to targetvirt-handler on {where}: {message}")


class ManagerClient:
    """One connection to the management API."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        try:
            # No main loop: calls block, and a daemon's loop in the same process (tests)
            # must not dispatch this connection.
            self._bus = dbus.bus.BusConnection(
                address or dbus.bus.BUS_SYSTEM, mainloop=dbus.mainloop.NULL_MAIN_LOOP
            )
            self._bus.set_exit_on_disconnect(False)
        except dbus.DBusException as e:
            raise DaemonUnreachable(
                f"cannot connect to {_bus_name(address)}: "
                f"{(e.get_dbus_message() or str(e)).strip().splitlines()[0]}"
            ) from None
        try:
            # This asks the bus to start the daemon if nobody owns the name (D-Bus
            # activation through systemd, with the files packaging installs).
            obj = self._bus.get_object(SERVICE, PATH, introspect=False)
        except dbus.DBusException as e:
            self._bus.close()
            raise translate(e, address) from None
        self._iface = dbus.Interface(obj, IFACE)

    def close(self) -> None:
        self._bus.close()

    def call(self, method: str, *args: Any) -> Any:
        try:
            raw = getattr(self._iface, method)(*args, timeout=CALL_TIMEOUT)
        except dbus.DBusException as e:
            raise translate(e, self.address) from None
        return json.loads(str(raw))

    # --- typed helpers ---------------------------------------------------------------------

    @staticmethod
    def _opts(values: dict[str, Any]) -> dbus.Dictionary:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                out[key] = dbus.Boolean(value)
            elif isinstance(value, int):
                out[key] = dbus.UInt64(value) if value >= 0 else dbus.Int64(value)
            elif isinstance(value, float):
                out[key] = dbus.Double(value)
            elif isinstance(value, (list, tuple)):
                out[key] = dbus.Array([str(v) for v in value], signature="s")
            else:
                out[key] = dbus.String(value)
        return dbus.Dictionary(out, signature="sv")

    def status(self) -> Any:
        return self.call("Status")

    def listing(self) -> Any:
        return self.call("List")

    def info(self, kind: str, name: str) -> Any:
        return self.call("Info", kind, name)

    def create_pool(self, name: str, **opts: Any) -> Any:
        return self.call("CreatePool", name, self._opts(opts))

    def set_pool(self, name: str, **opts: Any) -> Any:
        return self.call("SetPool", name, self._opts(opts))

    def clear_container(self, pool: str, cid: int) -> Any:
        return self.call("ClearContainer", pool, dbus.UInt32(cid))

    def delete_pool(self, name: str) -> Any:
        return self.call("DeletePool", name)

    def add_container(self, pool: str, **opts: Any) -> Any:
        return self.call("AddContainer", pool, self._opts(opts))

    def remove_container(self, pool: str, cid: int) -> Any:
        return self.call("RemoveContainer", pool, dbus.UInt32(cid))

    def evacuate(self, pool: str, cid: int) -> Any:
        return self.call("Evacuate", pool, dbus.UInt32(cid))

    def create_vdisk(self, name: str, pool: str, size: int, **opts: Any) -> Any:
        return self.call("CreateVdisk", name, pool, dbus.UInt64(size), self._opts(opts))

    def delete_vdisk(self, name: str, **opts: Any) -> Any:
        return self.call("DeleteVdisk", name, self._opts(opts))

    def snapshot(self, vdisk: str, name: str, **opts: Any) -> Any:
        return self.call("Snapshot", vdisk, name, self._opts(opts))

    def clone(self, source: str, name: str, **opts: Any) -> Any:
        return self.call("Clone", source, name, self._opts(opts))

    def group_snapshot(self, vdisks: Sequence[str], name: str, **opts: Any) -> Any:
        return self.call(
            "GroupSnapshot", dbus.Array(list(vdisks), signature="s"), name, self._opts(opts)
        )

    def rollback(self, vdisk: str, snapshot: str) -> Any:
        return self.call("Rollback", vdisk, snapshot)

    def flatten(self, vdisk: str) -> Any:
        return self.call("Flatten", vdisk)

    def resize(self, vdisk: str, size: int) -> Any:
        return self.call("Resize", vdisk, dbus.UInt64(size))

    def freeze(self, vdisk: str, **opts: Any) -> Any:
        return self.call("Freeze", vdisk, self._opts(opts))

    def thaw(self, vdisk: str) -> Any:
        return self.call("Thaw", vdisk)

    def delay(self, vdisk: str, timeout: float) -> Any:
        return self.call("Delay", vdisk, dbus.Double(timeout))

    def resume(self, vdisk: str) -> Any:
        return self.call("Resume", vdisk)

    def export(self, vdisk: str, **opts: Any) -> Any:
        return self.call("Export", vdisk, self._opts(opts))

    def unexport(self, vdisk: str) -> Any:
        return self.call("Unexport", vdisk)

    def restore_exports(self) -> Any:
        return self.call("RestoreExports")

    def check(self, **opts: Any) -> Any:
        return self.call("Check", self._opts(opts))

    def job(self, jid: int) -> Any:
        return self.call("Job", dbus.UInt32(jid))

    def cancel_job(self, jid: int) -> Any:
        return self.call("CancelJob", dbus.UInt32(jid))
