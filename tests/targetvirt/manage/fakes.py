"""An in-memory stand-in for LIO, for host tests of the manager, the API and the shell."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from targetvirt.errors import TargetvirtError
from targetvirt.manage.exports import Lun, LunSpec, Target


@dataclass
class FakeLio:
    """Records what an Exporter was asked to do, as LIO would hold it."""

    why_unavailable: str | None = None
    storage_objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)  # method -> error text

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise TargetvirtError(self.fail[method])

    def unavailable(self) -> str | None:
        return self.why_unavailable

    def storage_object_conflict(self, spec: LunSpec) -> str | None:
        so = self.storage_objects.get(spec.lun.so_name)
        if so is not None and so["config"] != spec.lun.config:
            return f"LIO already has a user storage object named {spec.lun.so_name}"
        return None

    def ensure_storage_object(self, spec: LunSpec) -> bool:
        self._maybe_fail("ensure_storage_object")
        self.calls.append(("so", spec.lun.so_name))
        if spec.lun.so_name in self.storage_objects:
            self.storage_objects[spec.lun.so_name]["size"] = spec.size
            return False
        self.storage_objects[spec.lun.so_name] = {
            "config": spec.lun.config, "size": spec.size, "serial": spec.serial,
        }  # fmt: skip
        return True

    def foreign_target(self, iqn: str) -> bool:
        return iqn in self.foreign

    def apply_target(self, target: Target, specs: list[LunSpec]) -> None:
        self._maybe_fail("apply_target")
        self.calls.append(("target", target.iqn))
        self.targets[target.iqn] = {
            "portals": list(target.portals), "acls": list(target.acls), "demo": target.demo,
            "auth": target.auth, "luns": {s.lun.lun: s.lun.so_name for s in specs},
            "enabled": True,
        }  # fmt: skip

    def remove_lun(self, target: Target, lun: Lun) -> None:
        self.calls.append(("remove_lun", lun.so_name))
        if target.iqn in self.targets:
            self.targets[target.iqn]["luns"].pop(lun.lun, None)
        self.storage_objects.pop(lun.so_name, None)

    def remove_target(self, target: Target) -> None:
        self.calls.append(("remove_target", target.iqn))
        self.targets.pop(target.iqn, None)
        for lun in target.luns:
            self.storage_objects.pop(lun.so_name, None)

    def set_size(self, lun: Lun, size: int) -> None:
        self._maybe_fail("set_size")
        self.calls.append(("set_size", lun.so_name))
        self.storage_objects[lun.so_name]["size"] = size

    def status(self, target: Target) -> dict[str, Any]:
        t = self.targets.get(target.iqn)
        return {"present": t is not None, "sessions": []}

    def clear(self) -> None:
        """What a reboot (or targetctl clear) does to LIO."""
        self.storage_objects.clear()
        self.targets.clear()
