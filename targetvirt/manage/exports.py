"""What targetvirt exports over iSCSI, as plain data, and where it is kept.

An *export* is one iSCSI target of ours: its IQN, portals, node ACLs, CHAP settings and
LUNs, each LUN a vdisk or a snapshot (read-only).  The table of exports lives in the
state folder (``exports.json``, written atomically, mode 0600: it holds CHAP secrets)
and is the truth that :class:`Exporter` implementations apply to LIO; restoring after
a reboot is applying it again.

The storage object of a LUN is a ``user`` backstore named after the vdisk, with the
config string ``targetvirt/<vdisk>[@<snapshot>][;ro=1]``, a stable unit serial (the
vdisk's uuid) and ``nl_reply_supported=-1`` so that no netlink reply (ours, or
tcmu-runner's -ENOENT) can refuse or block its creation.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from targetvirt.errors import StoreCorrupt

FORMAT_VERSION = 1
IQN_PREFIX = "iqn.2003-01.org.targetvirt"
CONTROL = "nl_reply_supported=-1"


@dataclass
class Lun:
    """One LUN of a target: a vdisk (or ``vdisk@snapshot``) as LUN ``lun``."""

    vdisk: str
    lun: int
    readonly: bool = False

    @property
    def so_name(self) -> str:
        """The storage object's name in LIO (configfs accepts '@')."""
        return self.vdisk

    @property
    def config(self) -> str:
        text = f"targetvirt/{self.vdisk}"
        if self.readonly and "@" not in self.vdisk:
            text += ";ro=1"
        return text


@dataclass
class Target:
    """One iSCSI target of ours (TPG 1)."""

    iqn: str
    portals: list[str] = field(default_factory=lambda: ["0.0.0.0:3260"])
    acls: list[str] = field(default_factory=list)
    userid: str = ""
    password: str = ""
    mutual_userid: str = ""
    mutual_password: str = ""
    demo: bool = False
    luns: list[Lun] = field(default_factory=list)

    @property
    def auth(self) -> str:
        if self.mutual_userid:
            return "mutual CHAP"
        return "CHAP" if self.userid else "none"

    def lun_of(self, vdisk: str) -> Lun | None:
        return next((lun for lun in self.luns if lun.vdisk == vdisk), None)

    def free_lun(self) -> int:
        used = {lun.lun for lun in self.luns}
        return next(n for n in range(len(used) + 1) if n not in used)

    def public(self) -> dict[str, Any]:
        """As shown to users: secrets left out."""
        d = asdict(self)
        for key in ("password", "mutual_password"):
            d[key] = "***" if d[key] else ""
        d["auth"] = self.auth
        return d


@dataclass
class LunSpec:
    """Everything LIO needs to create a LUN's storage object."""

    lun: Lun
    size: int
    serial: str


class Exporter(Protocol):
    """Applies targets to LIO.  Every method is idempotent."""

    def unavailable(self) -> str | None:
        """None when LIO can be used, else why not (one line)."""

    def ensure_storage_object(self, spec: LunSpec) -> bool:
        """Create the LUN's storage object unless it exists; True if it was created."""

    def storage_object_conflict(self, spec: LunSpec) -> str | None:
        """Why a storage object of that name cannot be ours (another config), or None."""

    def foreign_target(self, iqn: str) -> bool:
        """Whether LIO has a target of that name (any owner)."""

    def apply_target(self, target: Target, specs: list[LunSpec]) -> None:
        """Make the target, TPG, attributes, portals, LUNs, ACLs and CHAP match."""

    def remove_lun(self, target: Target, lun: Lun) -> None:
        """Unmap the LUN and delete its storage object."""

    def remove_target(self, target: Target) -> None:
        """Delete the target (with everything under it) and its LUNs' storage objects."""

    def set_size(self, lun: Lun, size: int) -> None:
        """Tell LIO (and so the handler and the initiator) the LUN's new size."""

    def status(self, target: Target) -> dict[str, Any]:
        """Live facts for ``info``: enabled, sessions, per-LUN storage object status."""


class ExportTable:
    """The persisted table of targets (``<state-dir>/exports.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.targets: dict[str, Target] = {}
        self.load()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise StoreCorrupt(f"cannot read {self.path}: {e}") from None
        try:
            if raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {raw.get('version')!r}")
            for body in raw["targets"]:
                luns = [Lun(**lun) for lun in body.pop("luns")]
                target = Target(**body, luns=luns)
                self.targets[target.iqn] = target
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreCorrupt(f"{self.path} is malformed: {e}") from None

    def save(self) -> None:
        data = {"version": FORMAT_VERSION, "targets": [asdict(t) for t in self.targets.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".exports.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def find(self, vdisk: str) -> tuple[Target, Lun] | None:
        for target in self.targets.values():
            lun = target.lun_of(vdisk)
            if lun is not None:
                return target, lun
        return None

    def exported_under(self, vdisk: str) -> list[tuple[Target, Lun]]:
        """Exports of ``vdisk`` itself and of its snapshots."""
        return [
            (t, lun)
            for t in self.targets.values()
            for lun in t.luns
            if lun.vdisk == vdisk or lun.vdisk.startswith(vdisk + "@")
        ]


def _iqn_part(text: str) -> str:
    part = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip(".-")
    return part or "x"


def default_iqn(vdisk: str, taken: set[str], hostname: str | None = None) -> str:
    """``iqn.2003-01.org.targetvirt:<host>.<vdisk>`` (made IQN-safe), unique in ``taken``."""
    host = _iqn_part((hostname or socket.gethostname()).split(".")[0])
    base = f"{IQN_PREFIX}:{host}.{_iqn_part(vdisk.replace('@', '.at.'))}"
    iqn, n = base, 2
    while iqn in taken:
        iqn = f"{base}-{n}"
        n += 1
    return iqn
