"""The daemon's management API on D-Bus: ``org.targetvirt.Manager1``.

Bus name and interface ``org.targetvirt.Manager1``, object ``/org/targetvirt/Manager1``,
on the system bus (the policy in ``packaging/dbus/targetvirt.conf`` admits root only),
or on the bus at ``$TARGETVIRT_BUS_ADDRESS`` (tests, VMs).

Every method takes its required arguments typed and its optional ones in an ``a{sv}``
dictionary, and returns one JSON document (``s``): a result with a ``message`` line,
or for long operations a *job* (``{"id": 3, "state": "running", ...}``) to follow with
``Job(u)`` and stop with ``CancelJob(u)``; ``JobChanged(s)`` signals carry the same
JSON.  Refusals are D-Bus errors named ``org.targetvirt.Error.<Kind>`` (NotFound,
InvalidArgument, AlreadyExists, InUse, ReadOnly, PoolFull, NotAvailable, ...) whose
message is the one-line explanation; anything unexpected is
``org.targetvirt.Error.Internal``.

=================  ================================  =========================================
method             arguments                          options (a{sv})
=================  ================================  =========================================
Status             -                                  -
List               -                                  -
Info               s kind, s name                     -  (kind: pool vdisk export job daemon)
CreatePool         s name                             path s, device s, size t,
                                                      segment_size t, preallocate b
DeletePool         s name                             -
AddContainer       s pool                             path s, device s, size t, preallocate b
RemoveContainer    s pool, u container                -
Evacuate           s pool, u container                -  -> job
CreateVdisk        s name, s pool, t size             cow s, segment_size t
DeleteVdisk        s name                             recursive b  -> job
Snapshot           s vdisk, s name                    mode s
Clone              s source, s name                   snapshot s, mode s
GroupSnapshot      as vdisks, s name                  mode s
Rollback           s vdisk, s snapshot                -  -> job
Flatten            s vdisk                            -  -> job
Resize             s vdisk, t size                    -
Freeze             s vdisk                            mode s, timeout d
Thaw               s vdisk                            -
Delay              s vdisk, d timeout                 -
Resume             s vdisk                            -
Export             s vdisk                            iqn s, portals as, acls as, userid s,
                                                      password s, mutual_userid s,
                                                      mutual_password s, demo b, readonly b,
                                                      lun u
Unexport           s vdisk                            -
RestoreExports     -                                  -
Check              -                                  repair b  -> job
Job                u id                               -
CancelJob          u id                               -
=================  ================================  =========================================

Method calls run in worker threads, so a long call never stalls the others (nor the
``org.kernel.TCMUService1`` answers the handler gives targetcli).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dbus
import dbus.mainloop.glib
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

from targetvirt.errors import InvalidArgument, TargetvirtError
from targetvirt.manage.common import ERROR_PREFIX, IFACE, PATH, SERVICE
from targetvirt.manage.jobs import Job
from targetvirt.manage.manager import Manager

log = logging.getLogger(__name__)


Call = Callable[[], Any]

# Connections of stopped services, never collected (see ManagerBusService.stop).
_RETIRED: list[Any] = []


def error_name(e: BaseException) -> str:
    if isinstance(e, TargetvirtError):
        name = type(e).__name__
        return ERROR_PREFIX + ("Failed" if name == "TargetvirtError" else name)
    return ERROR_PREFIX + "Internal"


def _native(value: Any) -> Any:
    """dbus-python values as plain Python values."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath)):
        return str(value)
    if isinstance(value, (dbus.Byte, dbus.Int16, dbus.Int32, dbus.Int64, dbus.UInt16,
                          dbus.UInt32, dbus.UInt64)):  # fmt: skip
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, (dbus.Array, list, tuple)):
        return [_native(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {str(k): _native(v) for k, v in value.items()}
    return value


_TYPES: dict[type, str] = {str: "a string", int: "an integer", bool: "a boolean",
                           float: "a number", list: "a list of strings"}  # fmt: skip


def options(raw: Any, spec: dict[str, type], method: str) -> dict[str, Any]:
    """Check an ``a{sv}`` against ``{name: type}``; returns plain values."""
    out: dict[str, Any] = {}
    for key, given in _native(raw).items():
        value = given
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise InvalidArgument(f"{method} has no option {key!r} (known: {known})")
        want = spec[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if want is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise InvalidArgument(f"{method} option {key!r} must be {_TYPES[want]}")
        out[key] = value
    return out


def _dump(result: Any) -> str:
    if isinstance(result, Job):
        result = result.public()
    return json.dumps(result, sort_keys=True)


_SOURCE = {"path": str, "device": str, "size": int, "preallocate": bool}
_EXPORT = {"iqn": str, "portals": list, "acls": list, "userid": str, "password": str,
           "mutual_userid": str, "mutual_password": str, "demo": bool, "readonly": bool,
           "lun": int}  # fmt: skip


def _m(in_signature: str) -> Any:
    return dbus.service.method(
        IFACE, in_signature=in_signature, out_signature="s",
        async_callbacks=("_ok", "_err"), sender_keyword="_sender",
    )  # fmt: skip


class ManagerObject(dbus.service.Object):  # type: ignore[misc]
    """``/org/targetvirt/Manager1``: each method hands its call to a worker thread."""

    def __init__(
        self, conn: Any, manager: Manager, pool: ThreadPoolExecutor, allowed_uids: set[int]
    ) -> None:
        super().__init__(conn, PATH)
        self._conn = conn
        self.m = manager
        self._pool = pool
        self._allowed = allowed_uids

    # --- plumbing --------------------------------------------------------------------------

    def _run(self, sender: str | None, ok: Any, err: Any, call: Call) -> None:
        if sender is not None and self._allowed:
            try:
                uid = int(self._conn.get_unix_user(sender))
            except dbus.DBusException:
                uid = -1
            if uid not in self._allowed:
                err(dbus.DBusException(
                    "only root may manage targetvirt", name=ERROR_PREFIX + "AccessDenied"
                ))  # fmt: skip
                return
        self._pool.submit(self._work, ok, err, call)

    @staticmethod
    def _work(ok: Any, err: Any, call: Call) -> None:
        try:
            result = _dump(call())
        except Exception as e:  # every failure becomes a D-Bus error
            if isinstance(e, TargetvirtError):
                text = str(e)
            else:
                log.exception("management call failed")
                text = f"internal error: {type(e).__name__}: {e}"
            exc = dbus.DBusException(text.splitlines()[0] if text else type(e).__name__,
                                     name=error_name(e))  # fmt: skip
            GLib.idle_add(lambda: err(exc) and False)
            return
        GLib.idle_add(lambda: ok(result) and False)

    @dbus.service.signal(IFACE, signature="s")  # type: ignore[untyped-decorator]
    def JobChanged(self, job: str) -> None:
        pass

    # --- status ------------------------------------------------------------------------------

    @_m("")  # type: ignore[untyped-decorator]
    def Status(self, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, self.m.status)

    @_m("")  # type: ignore[untyped-decorator]
    def List(self, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, self.m.listing)

    @_m("ss")  # type: ignore[untyped-decorator]
    def Info(self, kind: str, name: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.info(str(kind), str(name)))

    # --- pools ---------------------------------------------------------------------------------

    @_m("sa{sv}")  # type: ignore[untyped-decorator]
    def CreatePool(self, name: str, opts: Any, _ok: Any, _err: Any,
                   _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {**_SOURCE, "segment_size": int}, "CreatePool")
            return self.m.create_pool(str(name), **o)

        self._run(_sender, _ok, _err, call)

    @_m("s")  # type: ignore[untyped-decorator]
    def DeletePool(self, name: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.delete_pool(str(name)))

    @_m("sa{sv}")  # type: ignore[untyped-decorator]
    def AddContainer(self, pool: str, opts: Any, _ok: Any, _err: Any,
                     _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            return self.m.add_container(str(pool), **options(opts, _SOURCE, "AddContainer"))

        self._run(_sender, _ok, _err, call)

    @_m("su")  # type: ignore[untyped-decorator]
    def RemoveContainer(self, pool: str, cid: int, _ok: Any, _err: Any,
                        _sender: str | None = None) -> None:  # fmt: skip
        self._run(_sender, _ok, _err, lambda: self.m.remove_container(str(pool), int(cid)))

    @_m("su")  # type: ignore[untyped-decorator]
    def Evacuate(self, pool: str, cid: int, _ok: Any, _err: Any,
                 _sender: str | None = None) -> None:  # fmt: skip
        self._run(_sender, _ok, _err, lambda: self.m.evacuate(str(pool), int(cid)))

    # --- vdisks --------------------------------------------------------------------------------

    @_m("ssta{sv}")  # type: ignore[untyped-decorator]
    def CreateVdisk(self, name: str, pool: str, size: int, opts: Any, _ok: Any, _err: Any,
                    _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"cow": str, "segment_size": int}, "CreateVdisk")
            return self.m.create_vdisk(str(name), str(pool), int(size), **o)

        self._run(_sender, _ok, _err, call)

    @_m("sa{sv}")  # type: ignore[untyped-decorator]
    def DeleteVdisk(self, name: str, opts: Any, _ok: Any, _err: Any,
                    _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"recursive": bool}, "DeleteVdisk")
            return self.m.delete_vdisk(str(name), **o)

        self._run(_sender, _ok, _err, call)

    @_m("ssa{sv}")  # type: ignore[untyped-decorator]
    def Snapshot(self, vdisk: str, name: str, opts: Any, _ok: Any, _err: Any,
                 _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"mode": str}, "Snapshot")
            return self.m.snapshot(str(vdisk), str(name), **o)

        self._run(_sender, _ok, _err, call)

    @_m("ssa{sv}")  # type: ignore[untyped-decorator]
    def Clone(self, source: str, name: str, opts: Any, _ok: Any, _err: Any,
              _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"snapshot": str, "mode": str}, "Clone")
            return self.m.clone(str(source), str(name), **o)

        self._run(_sender, _ok, _err, call)

    @_m("assa{sv}")  # type: ignore[untyped-decorator]
    def GroupSnapshot(self, vdisks: Any, name: str, opts: Any, _ok: Any, _err: Any,
                      _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"mode": str}, "GroupSnapshot")
            return self.m.group_snapshot([str(v) for v in vdisks], str(name), **o)

        self._run(_sender, _ok, _err, call)

    @_m("ss")  # type: ignore[untyped-decorator]
    def Rollback(self, vdisk: str, snap: str, _ok: Any, _err: Any,
                 _sender: str | None = None) -> None:  # fmt: skip
        self._run(_sender, _ok, _err, lambda: self.m.rollback(str(vdisk), str(snap)))

    @_m("s")  # type: ignore[untyped-decorator]
    def Flatten(self, vdisk: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.flatten(str(vdisk)))

    @_m("st")  # type: ignore[untyped-decorator]
    def Resize(self, vdisk: str, size: int, _ok: Any, _err: Any,
               _sender: str | None = None) -> None:  # fmt: skip
        self._run(_sender, _ok, _err, lambda: self.m.resize(str(vdisk), int(size)))

    @_m("sa{sv}")  # type: ignore[untyped-decorator]
    def Freeze(self, vdisk: str, opts: Any, _ok: Any, _err: Any,
               _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            o = options(opts, {"mode": str, "timeout": float}, "Freeze")
            return self.m.freeze(str(vdisk), **o)

        self._run(_sender, _ok, _err, call)

    @_m("s")  # type: ignore[untyped-decorator]
    def Thaw(self, vdisk: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.thaw(str(vdisk)))

    @_m("sd")  # type: ignore[untyped-decorator]
    def Delay(self, vdisk: str, timeout: float, _ok: Any, _err: Any,
              _sender: str | None = None) -> None:  # fmt: skip
        self._run(_sender, _ok, _err, lambda: self.m.delay(str(vdisk), float(timeout)))

    @_m("s")  # type: ignore[untyped-decorator]
    def Resume(self, vdisk: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.resume(str(vdisk)))

    # --- exports -------------------------------------------------------------------------------

    @_m("sa{sv}")  # type: ignore[untyped-decorator]
    def Export(self, vdisk: str, opts: Any, _ok: Any, _err: Any,
               _sender: str | None = None) -> None:  # fmt: skip
        def call() -> Any:
            return self.m.export(str(vdisk), **options(opts, _EXPORT, "Export"))

        self._run(_sender, _ok, _err, call)

    @_m("s")  # type: ignore[untyped-decorator]
    def Unexport(self, vdisk: str, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.unexport(str(vdisk)))

    @_m("")  # type: ignore[untyped-decorator]
    def RestoreExports(self, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, self.m.restore_exports)

    # --- checker, jobs ---------------------------------------------------------------------------

    @_m("a{sv}")  # type: ignore[untyped-decorator]
    def Check(self, opts: Any, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.check(**options(opts, {"repair": bool},
                                                                            "Check")))  # fmt: skip

    @_m("u")  # type: ignore[untyped-decorator]
    def Job(self, jid: int, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.job(int(jid)))

    @_m("u")  # type: ignore[untyped-decorator]
    def CancelJob(self, jid: int, _ok: Any, _err: Any, _sender: str | None = None) -> None:
        self._run(_sender, _ok, _err, lambda: self.m.cancel_job(int(jid)))


class ManagerBusService:
    """Owns ``org.targetvirt.Manager1`` on the system bus (or the bus at ``address``)."""

    def __init__(
        self,
        manager: Manager,
        address: str | None = None,
        *,
        workers: int = 8,
        allowed_uids: set[int] | None = None,
    ) -> None:
        self.manager = manager
        self.address = address
        self.workers = workers
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.getuid()}
        self._loop: Any = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._object: ManagerObject | None = None
        self._name: Any = None
        self._conn: Any = None

    def start(self) -> None:
        dbus.mainloop.glib.threads_init()
        DBusGMainLoop(set_as_default=True)
        self._conn = dbus.bus.BusConnection(self.address or dbus.bus.BUS_SYSTEM)
        # libdbus makes a process whose system-bus connection closes call _exit(1): neither
        # our own close() at stop nor a restart of dbus-daemon may kill the data path.
        self._conn.set_exit_on_disconnect(False)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dbus-call")
        self._object = ManagerObject(self._conn, self.manager, self._pool, self.allowed_uids)
        # The loop runs on the default GLib context, which other services of the daemon
        # may also run; whichever loop owns the context dispatches for all of them.
        self._loop = GLib.MainLoop()
        self._thread = threading.Thread(target=self._loop.run, name="manager-dbus", daemon=True)
        self._thread.start()
        self._name = dbus.service.BusName(SERVICE, self._conn, do_not_queue=True)
        obj = self._object
        self.manager.jobs.changed = lambda job: GLib.idle_add(
            lambda: obj.JobChanged(_dump(job)) and False
        )
        where = self.address or "the system bus"
        log.info("management API %s on %s", SERVICE, where)

    def stop(self) -> None:
        self.manager.jobs.changed = lambda job: None
        if self._object is not None:
            self._object.remove_from_connection()
            self._object = None
        self._name = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._loop is not None:
            self._loop.quit()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # The connection stays open, and referenced (the process is about to exit, or a
        # test goes on): the other GLib loop of the process (TCMUService1's, on the same
        # default context) may still dispatch its last messages (NameLost...), and
        # dbus-python fails that loop if the connection was closed or collected.  So the
        # module keeps it: a service dropped by its owner (tests make one per test) must
        # not take its connection with it while the context may still dispatch for it.
        _RETIRED.append(self._conn)
