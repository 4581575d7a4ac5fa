"""Asymmetric logical unit access (SPC-4 5.16) as the SCSI emulation reports it (sans-I/O).

Several gateways export one vdisk, each through its own LIO user backstore with the same
NAA identifier. On every gateway the LUN is mapped into one iSCSI TPG per gateway (the
remote ones disabled locally), each TPG's LUN in its own user-defined ALUA target port
group under the device's configfs ``alua/`` folder (the layout ceph-iscsi builds for
tcmu-runner). :class:`AluaConfig` is a snapshot of those groups; the I/O edge that reads
it from configfs is ``tcmu_handler/alua.py``.

What the kernel does and what is left to us (tcmu.md 3.1, checked against 6.1):

- With ``alua_support=1`` LIO itself applies the access state of the port a command came
  through (``target_alua_state_check``: NOT READY 04h/0Ah, 0Bh, 0Ch, 12h for
  transitioning, standby, unavailable, offline; a delay for active/non-optimized), and it
  queues ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h) when a state is written in configfs.
  None of that is repeated here: a command that reaches the handler was admitted by the
  kernel for the port it came through.
- INQUIRY (TPGS), VPD page 83h and REPORT TARGET PORT GROUPS go to userspace: built here.

Decisions:

- ALUA is reported only when a user-defined group exists *and* one of the groups holds an
  enabled port (as tcmu-runner does): without a user group there is nothing asymmetric to
  report, so TPGS stays 00b and REPORT TARGET PORT GROUPS is INVALID COMMAND OPERATION
  CODE, which SPC-4 asks of a LUN whose TPGS is 00b and LIO answers when its ALUA is off.
  Reporting the default group instead would switch every single-gateway LUN to ALUA
  (scsi_dh_alua attaches, multipath's alua prioritizer engages) for no information.
- TPGS is 01b (implicit) whatever the groups' ``alua_access_type``: states change when
  the admin or the controller writes configfs, which is implicit ALUA to the initiator,
  and SET TARGET PORT GROUPS is refused (it would need the controller to move the active
  gateway). Reporting explicit would invite Linux's scsi_dh_alua to send STPG when it
  activates a standby path, and fail the activation on our refusal.
- TCMU tells the handler nothing about the I_T nexus, so VPD page 83h reports the port of
  the one enabled target port group (the local gateway's TPG; the others are disabled
  here): commands can only arrive through enabled TPGs. With several enabled ports the
  first one (groups by id, ports by relative port id) is used, as tcmu-runner does.
- REPORT TARGET PORT GROUPS lists every group that has ports (an empty group describes
  no path; LIO's own emulation skips them too), by group id, each port by relative target
  port identifier. RETURN DATA LENGTH counts everything after it as SPC-4 defines it (LIO
  and tcmu-runner leave out bytes 4-7 of the extended header). Any allocation length is
  accepted and cuts the data (SPC-4 4.2.5.6), where LIO refuses one shorter than the
  header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from targetvirt.errors import InvalidArgument

# Primary target port asymmetric access states (SPC-4 table 207); configfs
# ``alua_access_state`` prints these numbers.
ACTIVE_OPTIMIZED = 0x0
ACTIVE_NON_OPTIMIZED = 0x1
STANDBY = 0x2
UNAVAILABLE = 0x3
LBA_DEPENDENT = 0x4
OFFLINE = 0xE
TRANSITIONING = 0xF
STATES = {
    ACTIVE_OPTIMIZED: "active/optimized",
    ACTIVE_NON_OPTIMIZED: "active/non-optimized",
    STANDBY: "standby",
    UNAVAILABLE: "unavailable",
    LBA_DEPENDENT: "LBA dependent",
    OFFLINE: "offline",
    TRANSITIONING: "transitioning",
}

# Supported-state bits, byte 1 of a target port group descriptor (the kernel's ALUA_*_SUP).
T_SUP = 0x80
O_SUP = 0x40
LBD_SUP = 0x10
U_SUP = 0x08
S_SUP = 0x04
AN_SUP = 0x02
AO_SUP = 0x01
# What the kernel gives a new group (core_alua_allocate_tg_pt_gp): all but LBA dependent.
DEFAULT_SUPPORTED = T_SUP | O_SUP | U_SUP | S_SUP | AN_SUP | AO_SUP

# STATUS CODE of a descriptor (configfs ``alua_access_status``).
STATUS_NONE = 0x00
STATUS_ALTERED_BY_EXPLICIT_STPG = 0x01
STATUS_ALTERED_BY_IMPLICIT_ALUA = 0x02

# TPGS bits as in standard INQUIRY byte 5 (and the kernel's TPGS_*_ALUA).
TPGS_IMPLICIT = 0x10
TPGS_EXPLICIT = 0x20

PROTOCOL_ISCSI = 0x5  # SPC-4 table 362; the kernel's SCSI_PROTOCOL_ISCSI
DEFAULT_GROUP = "default_tg_pt_gp"  # created by the kernel with every device, id 0

RTPG_LENGTH_ONLY = 0x0  # PARAMETER DATA FORMAT (REPORT TARGET PORT GROUPS byte 1, bits 7-5)
RTPG_EXTENDED = 0x1


@dataclass(frozen=True, slots=True)
class TargetPort:
    """One port of a target port group: a TPG's LUN that maps this device."""

    rtpi: int  # RELATIVE TARGET PORT IDENTIFIER (1..65535)
    enabled: bool = True  # its TPG is enabled on this gateway
    protocol: int = PROTOCOL_ISCSI
    name: str = ""  # "<fabric>/<wwn>/tpgt_<n>/lun_<m>", as configfs ``members`` lists it

    def __post_init__(self) -> None:
        if not 1 <= self.rtpi <= 0xFFFF:
            raise InvalidArgument(f"relative target port identifier {self.rtpi} is not 1..65535")
        if not 0 <= self.protocol <= 0xF:
            raise InvalidArgument(f"protocol identifier {self.protocol} is not 0..15")


@dataclass(frozen=True, slots=True)
class PortGroup:
    """One ALUA target port group of the device (configfs ``alua/<name>/``)."""

    id: int
    state: int = ACTIVE_OPTIMIZED
    supported: int = DEFAULT_SUPPORTED
    status: int = STATUS_NONE
    preferred: bool = False
    access_type: int = TPGS_IMPLICIT | TPGS_EXPLICIT
    implicit_trans_secs: int = 0
    ports: tuple[TargetPort, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        checks = (
            ("target port group id", self.id, 0xFFFF),
            ("supported states", self.supported, 0xFF),
            ("status code", self.status, 0xFF),
            ("implicit transition time", self.implicit_trans_secs, 0xFF),
            ("number of target ports", len(self.ports), 0xFF),
        )
        for what, value, top in checks:
            if not 0 <= value <= top:
                raise InvalidArgument(f"ALUA group {self.name!r}: {what} {value} is not 0..{top}")
        if self.state not in STATES:
            raise InvalidArgument(f"ALUA group {self.name!r}: access state {self.state} is unknown")

    @property
    def user_defined(self) -> bool:
        return self.name != DEFAULT_GROUP


@dataclass(frozen=True, slots=True)
class AluaConfig:
    """The device's target port groups at one moment (sorted by id)."""

    groups: tuple[PortGroup, ...] = ()

    @property
    def local(self) -> tuple[PortGroup, TargetPort] | None:
        """The group and port commands arrive through, or None when ALUA is off."""
        if not any(g.user_defined for g in self.groups):
            return None
        for group in self.groups:
            for port in group.ports:
                if port.enabled:
                    return group, port
        return None

    @property
    def active(self) -> bool:
        return self.local is not None

    @property
    def tpgs(self) -> int:
        """Standard INQUIRY byte 5 TPGS bits (see module doc: implicit only)."""
        return TPGS_IMPLICIT if self.active else 0


NO_ALUA = AluaConfig()


class AluaProvider(Protocol):
    """Where a LUN's ALUA configuration comes from (``tcmu_handler.alua.ConfigfsAlua``).

    ``snapshot(fresh=True)`` reads the current state (REPORT TARGET PORT GROUPS, run in a
    worker); ``fresh=False`` may return a copy a little older (INQUIRY, VPD, the opcode
    list). Never raises: a damaged configuration is the provider's to log and replace.
    """

    def snapshot(self, *, fresh: bool) -> AluaConfig: ...


def encode_rtpg(config: AluaConfig, *, extended: bool) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36), whole (not cut)."""
    body = bytearray()
    for group in config.groups:
        if not group.ports:
            continue
        body += struct.pack(
            ">BBHxBxB",
            (0x80 if group.preferred else 0) | group.state,
            group.supported,
            group.id,
            group.status,
            len(group.ports),
        )
        for port in group.ports:
            body += struct.pack(">xxH", port.rtpi)
    if extended:
        local = config.local
        secs = local[0].implicit_trans_secs if local is not None else 0
        body[:0] = bytes((RTPG_EXTENDED << 4, secs, 0, 0))
    return struct.pack(">I", len(body)) + bytes(body)


def port_designators(config: AluaConfig) -> bytes:
    """VPD page 83h designators of the local port: relative target port, target port group.

    Association 01b (target port), code set binary, PIV=1 with the port's protocol, as
    LIO's own spc_emulate_evpd_83 and tcmu-runner write them. Empty when ALUA is off.
    """
    local = config.local
    if local is None:
        return b""
    group, port = local
    head = (port.protocol << 4) | 0x1
    relative = struct.pack(">BBxBxxH", head, 0x80 | 0x10 | 0x4, 4, port.rtpi)
    port_group = struct.pack(">BBxBxxH", head, 0x80 | 0x10 | 0x5, 4, group.id)
    return relative + port_group
