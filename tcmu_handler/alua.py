"""A user backstore's ALUA target port groups, read from configfs (the I/O edge of
``tcmu_handler/scsi/alua.py``).

Layout and formats, as the 6.1 kernel writes them (target_core_configfs.c,
target_core_alua.c, target_core_stat.c, target_core_fabric_configfs.c):

- ``core/user_<hba>/<dev>/alua/<group>/`` for every group; ``default_tg_pt_gp`` (id 0)
  exists from the device's creation, user groups are made with mkdir.
- In a group (``target_core_alua_tg_pt_gp_attrs``): ``tg_pt_gp_id`` ("%hu\\n", or empty
  until an id is written), ``alua_access_state`` ("%d\\n"), ``alua_access_status``
  ("None" / "Altered by Explicit STPG" / "Altered by Implicit ALUA", core_alua_dump_status),
  ``alua_access_type`` ("None" / "Implicit" / "Explicit" / "Implicit and Explicit",
  core_alua_show_access_type), ``alua_support_<state>`` ("0\\n" or "1\\n", for
  transitioning, offline, lba_dependent, unavailable, standby, active_optimized,
  active_nonoptimized), ``preferred``, ``implicit_trans_secs``, ``nonop_delay_msecs``,
  ``trans_delay_msecs``, ``alua_write_metadata`` ("%d\\n"), and ``members``: one
  "<fabric>/<wwn>/tpgt_<tag>/<lun>\\n" per port, each followed by a NUL byte
  (target_tg_pt_gp_members_show copies snprintf's terminator too).
- A port's relative target port identifier is its LUN's
  ``<fabric>/<wwn>/tpgt_<tag>/lun/<lun>/statistics/scsi_port/indx`` ("%u\\n"; in 6.1 the
  per-device ``lun_rtpi`` LIO numbers in the order LUNs are mapped), its protocol
  ``statistics/scsi_transport/proto_id``, and whether its TPG is enabled
  ``tpgt_<tag>/enable`` ("%d\\n"). tcmu-runner (target.c) reads the same files. The
  fabric is named as the fabric ops name it ("iSCSI"), its configfs folder by its alias
  ("iscsi").

Fallbacks (all documented, none raises into the data path): no ``alua/`` folder or only
the default group: no ALUA. A group without an id yet (being set up: the kernel lets no
port join it) or one removed while being read: left out. A port whose LUN or TPG is removed
while being read: left out. A fabric without an ``enable`` attribute (tcm_loop): enabled.
Anything else unexpected (an unparsable value, a state the kernel never writes) is an
:class:`AluaConfigError`; :class:`ConfigfsAlua` logs it once and keeps the last good
configuration (or none).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import threading
from pathlib import Path

from targetvirt.clock import Clock, MonotonicClock
from targetvirt.errors import AluaConfigError, InvalidArgument
from tcmu_handler.scsi import alua as model
from tcmu_handler.scsi.lun import LunState

log = logging.getLogger(__name__)

STATUS_NAMES = {
    "None": model.STATUS_NONE,
    "Altered by Explicit STPG": model.STATUS_ALTERED_BY_EXPLICIT_STPG,
    "Altered by Implicit ALUA": model.STATUS_ALTERED_BY_IMPLICIT_ALUA,
}
ACCESS_TYPES = {
    "None": 0,
    "Implicit": model.TPGS_IMPLICIT,
    "Explicit": model.TPGS_EXPLICIT,
    "Implicit and Explicit": model.TPGS_IMPLICIT | model.TPGS_EXPLICIT,
}
SUPPORT_FILES = {
    "alua_support_transitioning": model.T_SUP,
    "alua_support_offline": model.O_SUP,
    "alua_support_lba_dependent": model.LBD_SUP,
    "alua_support_unavailable": model.U_SUP,
    "alua_support_standby": model.S_SUP,
    "alua_support_active_optimized": model.AO_SUP,
    "alua_support_active_nonoptimized": model.AN_SUP,
}
# Fabric ops names whose configfs folder is named otherwise (their fabric_alias).
FABRIC_FOLDERS = {"iSCSI": "iscsi"}
_MEMBER = re.compile(r"([^/]+)/([^/]+)/tpgt_(\d+)/(lun_\d+)")
_MAX_ATTRIBUTE = 4096  # a configfs attribute shows at most a page


class _Vanished(Exception):
    """What was being read was removed meanwhile (configfs rmdir): leave it out."""


def _read(path: Path) -> str:
    """One attribute's text; _Vanished if it is gone (ENOENT, or ENODEV from a LUN
    whose device is being unlinked)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_ATTRIBUTE)
    except FileNotFoundError:
        raise _Vanished(str(path)) from None
    except OSError as e:
        if e.errno == errno.ENODEV:
            raise _Vanished(str(path)) from None
        raise AluaConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise AluaConfigError(f"{path} is not ASCII: {_quote(raw)}") from None


def _quote(value: str | bytes) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(path: Path, top: int) -> int:
    return _parse_int(path, _read(path), top)


def _parse_int(path: Path, text: str, top: int) -> int:
    value = text.removesuffix("\n")
    if not value.isdigit() or int(value) > top:
        raise AluaConfigError(f"{path} holds {_quote(text)}, not a number 0..{top}")
    return int(value)


def _name(path: Path, names: dict[str, int]) -> int:
    text = _read(path)
    value = names.get(text.removesuffix("\n"))
    if value is None:
        raise AluaConfigError(f"{path} holds {_quote(text)}, not one of {', '.join(names)}")
    return value


# --- ports ---------------------------------------------------------------------------------


def _fabric_folder(target_root: Path, fabric: str) -> Path:
    folder = target_root / FABRIC_FOLDERS.get(fabric, fabric)
    if not folder.is_dir() and (target_root / fabric.lower()).is_dir():
        folder = target_root / fabric.lower()
    return folder


def read_port(member: str, target_root: Path, where: Path) -> model.TargetPort | None:
    """The port a ``members`` line names; None if its LUN or TPG is being removed."""
    m = _MEMBER.fullmatch(member)
    if m is None:
        raise AluaConfigError(f"{where} lists {_quote(member)}, not fabric/wwn/tpgt_N/lun_M")
    fabric, wwn, tag, lun_name = m.groups()
    tpg = _fabric_folder(target_root, fabric) / wwn / f"tpgt_{tag}"
    stats = tpg / "lun" / lun_name / "statistics"
    try:
        rtpi = _int(stats / "scsi_port" / "indx", 0xFFFF)
        protocol = _int(stats / "scsi_transport" / "proto_id", 0xF)
        enabled = _enabled(tpg)
        return model.TargetPort(rtpi, enabled, protocol, member)
    except _Vanished:
        return None
    except InvalidArgument as e:  # rtpi 0
        raise AluaConfigError(f"{where}: {member}: {e}") from None


def _enabled(tpg: Path) -> bool:
    try:
        return _int(tpg / "enable", 1) == 1
    except _Vanished:
        if tpg.is_dir():  # a fabric without the attribute: its TPGs always serve
            return True
        raise


def _members(text: str) -> list[str]:
    # Lines end in "\n" followed by NUL (target_tg_pt_gp_members_show).
    return [line for line in re.split(r"[\n\0]", text) if line]


# --- groups --------------------------------------------------------------------------------


def read_group(folder: Path, target_root: Path) -> model.PortGroup | None:
    """One group; None if it has no id yet or vanished while being read."""
    try:
        return _read_group(folder, target_root)
    except _Vanished:
        if folder.is_dir():  # the group is still there: an attribute is missing
            raise AluaConfigError(f"{folder} lacks an attribute the kernel creates") from None
        return None


def _read_group(folder: Path, target_root: Path) -> model.PortGroup | None:
    id_text = _read(folder / "tg_pt_gp_id")
    if not id_text:
        return None  # no id yet (target_tg_pt_gp_tg_pt_gp_id_show prints nothing)
    supported = 0
    for file, bit in SUPPORT_FILES.items():
        supported |= bit if _int(folder / file, 1) else 0
    members = _members(_read(folder / "members"))
    ports = [read_port(m, target_root, folder / "members") for m in members]
    try:
        return model.PortGroup(
            id=_parse_int(folder / "tg_pt_gp_id", id_text, 0xFFFF),
            state=_int(folder / "alua_access_state", 0xF),
            supported=supported,
            status=_name(folder / "alua_access_status", STATUS_NAMES),
            preferred=_int(folder / "preferred", 1) == 1,
            access_type=_name(folder / "alua_access_type", ACCESS_TYPES),
            implicit_trans_secs=_int(folder / "implicit_trans_secs", 0xFF),
            ports=tuple(sorted((p for p in ports if p is not None), key=lambda p: p.rtpi)),
            name=folder.name,
        )
    except InvalidArgument as e:
        raise AluaConfigError(f"{folder}: {e}") from None


def read_alua(device: Path, target_root: Path) -> model.AluaConfig:
    """The groups of the device whose configfs folder is ``device`` (``core/user_N/name``)."""
    try:
        names = sorted(os.listdir(device / "alua"))
    except FileNotFoundError:
        return model.NO_ALUA  # the device is being removed
    except OSError as e:
        raise AluaConfigError(f"cannot list {device / 'alua'}: {e.strerror or e}") from None
    if all(name == model.DEFAULT_GROUP for name in names):
        return model.NO_ALUA  # the usual single-gateway LUN: one listdir, nothing more
    groups = [read_group(device / "alua" / name, target_root) for name in names]
    found = sorted((g for g in groups if g is not None), key=lambda g: g.id)
    for a, b in itertools.pairwise(found):
        if a.id == b.id:
            raise AluaConfigError(f"{device}: groups {a.name} and {b.name} share id {a.id}")
    return model.AluaConfig(tuple(found))


# --- the provider --------------------------------------------------------------------------


class ConfigfsAlua:
    """:class:`~tcmu_handler.scsi.alua.AluaProvider` for one user backstore.

    ``snapshot(fresh=True)`` always reads configfs; ``fresh=False`` reuses a read younger
    than ``max_age`` seconds, so INQUIRY (which runs in the device loop) reads configfs
    at most once a ``max_age``. A read that fails is logged once (until the error changes
    or a read succeeds) and answered with the last good configuration, or no ALUA.
    """

    def __init__(
        self,
        configfs_root: Path,
        hba: int,
        name: str,
        *,
        clock: Clock | None = None,
        max_age: float = 1.0,
    ) -> None:
        self.device = configfs_root / "target" / "core" / f"user_{hba}" / name
        self.target_root = configfs_root / "target"
        self.clock = clock or MonotonicClock()
        self.max_age = max_age
        self._lock = threading.Lock()
        self._good: model.AluaConfig | None = None
        self._read_at = 0.0
        self._error: str | None = None

    def snapshot(self, *, fresh: bool) -> model.AluaConfig:
        now = self.clock.now()
        with self._lock:
            good = self._good
            if not fresh and good is not None and now - self._read_at < self.max_age:
                return good
        try:
            config = read_alua(self.device, self.target_root)
        except AluaConfigError as e:
            self._failed(str(e))
            return good or model.NO_ALUA
        with self._lock:
            self._good, self._read_at = config, now
            if self._error is not None:
                log.info("%s: ALUA groups readable again", self.device.name)
                self._error = None
        return config

    def _failed(self, message: str) -> None:
        with self._lock:
            repeated, self._error = self._error == message, message
        if not repeated:
            log.warning("%s: ALUA groups unreadable, keeping the last good view: %s",
                        self.device.name, message)  # fmt: skip


def attach(lun: LunState, configfs_root: Path, hba: int, name: str) -> None:
    """Give ``lun`` the ALUA groups of its device, unless the caller chose a provider."""
    if lun.alua is None:
        lun.alua = ConfigfsAlua(configfs_root, hba, name)
