"""The :class:`~targetvirt.manage.exports.Exporter` that drives LIO with rtslib-fb.

Order matters to LIO and to the handler: a LUN's storage object is created (and the
handler picks its device up: the manager waits for that) before the LUN is mapped and
the TPG is enabled, so an initiator never finds a LUN nobody serves.  Every method
is idempotent and changes only what differs, so applying a target that exists is a
no-op: in particular the attributes that send RECONFIG events to the handler
(``dev_config``, ``dev_size``, ``emulate_write_cache``) are never rewritten to the
value they already have.

rtslib-fb is imported lazily: this module loads on hosts without configfs (the
exporter then reports itself unavailable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from targetvirt.errors import TargetvirtError
from targetvirt.manage.exports import CONTROL, Lun, LunSpec, Target
from targetvirt.manage.values import parse_portal

CONFIGFS_TARGET = Path("/sys/kernel/config/target")
TPG_TAG = 1


@contextlib.contextmanager
def _lio(what: str) -> Iterator[None]:
    """rtslib and configfs errors become one-line TargetvirtErrors."""
    try:
        yield
    except TargetvirtError:
        raise
    except Exception as e:  # noqa: BLE001 - RTSLibError, OSError...: say what failed
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TargetvirtError(f"LIO refused to {what}: {text}") from None


def _rts() -> Any:
    import rtslib_fb  # noqa: PLC0415 - only usable where configfs exists

    return rtslib_fb


class LioExporter:
    """Exports through the kernel's LIO target (configfs), with rtslib-fb."""

    def __init__(
        self, configfs: Path = CONFIGFS_TARGET, *, cmd_time_out: int | None = None
    ) -> None:
        self.configfs = configfs
        # How long LIO holds a command for the handler before failing it (NOT READY):
        # the window a handler restart must fit in.  None keeps LIO's default (30 s).
        self.cmd_time_out = cmd_time_out

    def unavailable(self) -> str | None:
        if not self.configfs.is_dir():
            return (
                f"{self.configfs} does not exist (this kernel has no LIO target, or "
                "target_core_mod is not loaded, or configfs is not mounted)"
            )
        try:
            _rts()
        except ImportError as e:
            return f"rtslib-fb is not installed ({e})"
        return None

    # --- storage objects -------------------------------------------------------------------

    def _find_so(self, name: str) -> Any:
        rts = _rts()
        for so in rts.RTSRoot().storage_objects:
            if so.plugin == "user" and so.name == name:
                return so
        return None

    def storage_object_conflict(self, spec: LunSpec) -> str | None:
        with _lio(f"look up storage object {spec.lun.so_name}"):
            so = self._find_so(spec.lun.so_name)
            if so is None:
                return None
            config = so.config or ""
        if config != spec.lun.config:
            return (
                f"LIO already has a user storage object named {spec.lun.so_name} with config "
                f"{config!r} (not {spec.lun.config!r}); delete it first"
            )
        return None

    def ensure_storage_object(self, spec: LunSpec) -> bool:
        name = spec.lun.so_name
        with _lio(f"create storage object {name}"):
            so = self._find_so(name)
            if so is not None:
                if int(so.size) != spec.size:
                    so.set_attribute("dev_size", str(spec.size))
                return False
            rts = _rts()
            rts.RTSRoot()  # sets target/dbroot before the first storage object, as targetcli
            so = rts.UserBackedStorageObject(
                name, config=spec.lun.config, size=spec.size, wwn=spec.serial, control=CONTROL
            )
            if self.cmd_time_out is not None:  # only possible before the LUN is mapped
                so.set_attribute("cmd_time_out", str(self.cmd_time_out))
            return True

    def set_size(self, lun: Lun, size: int) -> None:
        with _lio(f"resize storage object {lun.so_name}"):
            so = self._find_so(lun.so_name)
            if so is None:
                raise TargetvirtError(f"LIO has no storage object {lun.so_name}")
            # dev_size on an enabled device sends RECONFIG(DEV_SIZE): the handler resizes
            # the LUN and queues CAPACITY DATA HAS CHANGED for the initiators.
            so.set_attribute("dev_size", str(size))

    def _delete_so(self, lun: Lun) -> None:
        so = self._find_so(lun.so_name)
        if so is not None and (so.config or "") == lun.config:
            so.delete()

    # --- targets -----------------------------------------------------------------------------

    def _target(self, iqn: str, mode: str) -> Any:
        rts = _rts()
        return rts.Target(rts.FabricModule("iscsi"), iqn, mode=mode)

    def foreign_target(self, iqn: str) -> bool:
        with _lio(f"look up target {iqn}"):
            return (self.configfs / "iscsi" / iqn).is_dir()

    def _tpg(self, target: Target) -> Any | None:
        rts = _rts()
        try:
            t = self._target(target.iqn, "lookup")
            return rts.TPG(t, TPG_TAG, mode="lookup")
        except rts.RTSLibError:
            return None

    def apply_target(self, target: Target, specs: list[LunSpec]) -> None:
        with _lio(f"set up target {target.iqn}"):
            rts = _rts()
            tpg = rts.TPG(self._target(target.iqn, "any"), TPG_TAG, mode="any")
            self._auth(tpg, target)
            self._portals(rts, tpg, target)
            luns = self._luns(rts, tpg, specs)
            self._acls(rts, tpg, target, luns)
            if not tpg.enable:
                tpg.enable = True

    @staticmethod
    def _set(tpg: Any, name: str, value: str) -> None:
        if str(tpg.get_attribute(name)).strip() != value:
            tpg.set_attribute(name, value)

    def _auth(self, tpg: Any, target: Target) -> None:
        demo = "1" if target.demo else "0"
        self._set(tpg, "generate_node_acls", demo)
        self._set(tpg, "cache_dynamic_acls", demo)
        self._set(tpg, "demo_mode_write_protect", "0")
        if target.demo:  # CHAP for initiators without an ACL lives on the TPG
            for attr in ("userid", "password", "mutual_userid", "mutual_password"):
                value = getattr(target, attr)
                if (getattr(tpg, f"chap_{attr}") or "") != value:
                    setattr(tpg, f"chap_{attr}", value)
        self._set(tpg, "authentication", "1" if target.userid else "0")

    @staticmethod
    def _portals(rts: Any, tpg: Any, target: Target) -> None:
        have = {f"{np.ip_address}:{np.port}": np for np in tpg.network_portals}
        for text in target.portals:
            if text not in have:
                ip, port = parse_portal(text)
                rts.NetworkPortal(tpg, f"[{ip}]" if ":" in ip else ip, port, mode="create")
        for text, np in have.items():
            if text not in target.portals:
                np.delete()

    def _luns(self, rts: Any, tpg: Any, specs: list[LunSpec]) -> dict[int, Any]:
        have = {lun.lun: lun for lun in tpg.luns}
        out: dict[int, Any] = {}
        for spec in specs:
            number = spec.lun.lun
            so = self._find_so(spec.lun.so_name)
            if so is None:
                raise TargetvirtError(f"storage object {spec.lun.so_name} is missing")
            lun = have.pop(number, None)
            if lun is not None and lun.storage_object.path != so.path:
                lun.delete()
                lun = None
            out[number] = lun if lun is not None else rts.LUN(tpg, number, so)
        for lun in have.values():
            lun.delete()
        return out

    @staticmethod
    def _acls(rts: Any, tpg: Any, target: Target, luns: dict[int, Any]) -> None:
        readonly = {spec_lun.lun: spec_lun.readonly for spec_lun in target.luns}
        have = {acl.node_wwn: acl for acl in tpg.node_acls}
        for iqn in target.acls:
            acl = have.pop(iqn, None) or rts.NodeACL(tpg, iqn, mode="create")
            for attr in ("userid", "password", "mutual_userid", "mutual_password"):
                value = getattr(target, attr)
                if (getattr(acl, f"chap_{attr}") or "") != value:
                    setattr(acl, f"chap_{attr}", value)
            mapped = {m.mapped_lun: m for m in acl.mapped_luns}
            for number, lun in luns.items():
                m = mapped.pop(number, None)
                wp = readonly.get(number, False)
                if m is not None and (m.tpg_lun.lun != number or bool(m.write_protect) != wp):
                    m.delete()
                    m = None
                if m is None:
                    rts.MappedLUN(acl, number, lun, write_protect=wp)
            for m in mapped.values():
                m.delete()
        for acl in have.values():
            acl.delete()

    def remove_lun(self, target: Target, lun: Lun) -> None:
        with _lio(f"remove LUN {lun.lun} of {target.iqn}"):
            tpg = self._tpg(target)
            if tpg is not None:
                for have in tpg.luns:
                    if have.lun == lun.lun:
                        have.delete()  # with the mapped LUNs that point at it
            self._delete_so(lun)

    def remove_target(self, target: Target) -> None:
        with _lio(f"remove target {target.iqn}"):
            rts = _rts()
            try:
                t = self._target(target.iqn, "lookup")
            except rts.RTSLibError:
                t = None
            if t is not None:
                t.delete()
            for lun in target.luns:
                self._delete_so(lun)

    def status(self, target: Target) -> dict[str, Any]:
        with _lio(f"read target {target.iqn}"):
            tpg = self._tpg(target)
            if tpg is None:
                return {"present": False}
            sessions = []
            for acl in tpg.node_acls:
                session = acl.session
                if session:
                    sessions.append(f"{acl.node_wwn} ({session.get('state', '?').lower()})")
            dyn = Path(tpg.path) / "dynamic_sessions"
            if dyn.exists():
                sessions += [s for s in dyn.read_text().split("\x00") if s.strip()]
            luns = {}
            for lun in tpg.luns:
                so = lun.storage_object
                luns[str(lun.lun)] = {"storage_object": so.name, "status": so.status,
                                      "size": int(so.size)}  # fmt: skip
            return {
                "present": True,
                "enabled": bool(tpg.enable),
                "portals": sorted(f"{np.ip_address}:{np.port}" for np in tpg.network_portals),
                "luns": luns,
                "sessions": sorted(s.strip() for s in sessions),
            }
