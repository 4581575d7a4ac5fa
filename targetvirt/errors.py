"""The one exception hierarchy of targetvirt.

Every error a user can see is a :class:`TargetvirtError` whose ``str()`` is a one-line,
complete explanation (what was refused and why). Front ends print that line and never a
traceback.

Errors that the data path can meet also carry the SCSI sense they map to, as plain data
(``sense``: sense key, ASC, ASCQ).  The core never builds sense bytes itself; the TCMU
handler turns any error with a ``sense`` into CHECK CONDITION, and anything else into
HARDWARE ERROR / INTERNAL TARGET FAILURE.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple


class Sense(NamedTuple):
    """A SCSI sense triple (SPC-4 4.5): key, additional sense code and qualifier."""

    key: int
    asc: int
    ascq: int


# Sense keys (SPC-4 table 51), named where the product uses them.
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
COPY_ABORTED = 0xA
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE


class TargetvirtError(Exception):
    """Base of every error targetvirt raises on purpose."""

    sense: ClassVar[Sense | None] = None


# --- user input and naming -------------------------------------------------------


class InvalidArgument(TargetvirtError):
    """A value given by a user or a caller is malformed or out of range."""


class ConfigStringError(InvalidArgument):
    """A TCMU config string (``targetvirt/<vdisk>;k=v``) is malformed."""


class NotFound(TargetvirtError):
    """A named object (pool, container, vdisk, snapshot, export) does not exist."""


class AlreadyExists(TargetvirtError):
    """A name is already taken."""


class InUse(TargetvirtError):
    """The object is in a state that forbids the operation (exported, frozen, has clones...)."""


class Cancelled(TargetvirtError):
    """A long operation was interrupted; what it did so far is consistent."""


# --- storage ---------------------------------------------------------------------


class PoolFull(TargetvirtError):
    """No free physical segment is left for a write that needs one."""

    # SBC-4: SPACE ALLOCATION FAILED WRITE PROTECT
    sense = Sense(DATA_PROTECT, 0x27, 0x07)


class ContainerIOError(TargetvirtError):
    """A container failed an I/O (EIO and friends); only the affected command fails."""

    sense = Sense(MEDIUM_ERROR, 0x11, 0x00)  # UNRECOVERED READ ERROR


class ContainerWriteError(ContainerIOError):
    sense = Sense(MEDIUM_ERROR, 0x0C, 0x00)  # WRITE ERROR


class ReadOnly(TargetvirtError):
    """A write reached something that is read-only (a snapshot, a read-only store)."""

    sense = Sense(DATA_PROTECT, 0x27, 0x00)  # WRITE PROTECTED


# --- metadata --------------------------------------------------------------------


class StoreError(TargetvirtError):
    """The metadata store cannot be used."""


class StoreCorrupt(StoreError):
    """The metadata fails a checksum or a structural check; it is never used silently."""


class StoreLocked(StoreError):
    """Another process already has the store open for writing."""


# --- controller / agent ----------------------------------------------------------


class ProtocolError(TargetvirtError):
    """A controller/agent message is malformed or of an unknown version."""


class AgentTimeout(TargetvirtError):
    """An agent did not acknowledge a command in time (it is fenced)."""


class LeaseExpired(TargetvirtError):
    """The agent lost its controller lease and admits no writes."""

    sense = Sense(NOT_READY, 0x04, 0x0A)  # ASYMMETRIC ACCESS STATE TRANSITION


class FrozenTimeout(TargetvirtError):
    """A write waited for a frozen (no-write) vdisk longer than allowed."""

    sense = Sense(DATA_PROTECT, 0x27, 0x00)


class SessionLost(TargetvirtError):
    """The controller no longer knows this agent session (fenced or restarted): re-register."""


class ControllerUnreachable(LeaseExpired):
    """An I/O needs the controller and the agent cannot reach it (same sense: try another path)."""


# --- LIO configuration -----------------------------------------------------------


class AluaConfigError(TargetvirtError):
    """A device's ALUA groups in configfs cannot be read or hold values the kernel never
    writes (the TCMU handler then keeps its last good view, or reports no ALUA)."""


# --- SCSI ------------------------------------------------------------------------


class ScsiError(TargetvirtError):
    """A SCSI command fails with CHECK CONDITION and this sense.

    ``field_pointer`` (byte index into the CDB or parameter list) and ``bit`` fill the
    SENSE-KEY SPECIFIC bytes for ILLEGAL REQUEST; ``information`` fills INFORMATION
    (e.g. the offset of the first miscompare).
    """

    def __init__(
        self,
        message: str,
        sense: Sense,
        *,
        field_pointer: int | None = None,
        bit: int | None = None,
        in_cdb: bool = True,
        information: int | None = None,
    ) -> None:
        super().__init__(message)
        self.scsi_sense = sense
        self.field_pointer = field_pointer
        self.bit = bit
        self.in_cdb = in_cdb
        self.information = information

    @property
    def sense_triple(self) -> Sense:
        return self.scsi_sense


def invalid_opcode(opcode: int) -> ScsiError:
    return ScsiError(
        f"invalid command operation code {opcode:#04x}",
        Sense(ILLEGAL_REQUEST, 0x20, 0x00),
        field_pointer=0,
    )


def invalid_field_in_cdb(byte: int, bit: int | None = None, why: str = "") -> ScsiError:
    return ScsiError(
        f"invalid field in CDB byte {byte}" + (f": {why}" if why else ""),
        Sense(ILLEGAL_REQUEST, 0x24, 0x00),
        field_pointer=byte,
        bit=bit,
    )


def invalid_field_in_parameter_list(byte: int, bit: int | None = None, why: str = "") -> ScsiError:
    return ScsiError(
        f"invalid field in parameter list byte {byte}" + (f": {why}" if why else ""),
        Sense(ILLEGAL_REQUEST, 0x26, 0x00),
        field_pointer=byte,
        bit=bit,
        in_cdb=False,
    )


def parameter_list_length_error(why: str = "") -> ScsiError:
    return ScsiError(
        "parameter list length error" + (f": {why}" if why else ""),
        Sense(ILLEGAL_REQUEST, 0x1A, 0x00),
    )


def lba_out_of_range(lba: int, blocks: int) -> ScsiError:
    return ScsiError(
        f"LBA {lba} + {blocks} blocks is out of range", Sense(ILLEGAL_REQUEST, 0x21, 0x00)
    )


def miscompare(offset: int) -> ScsiError:
    return ScsiError(
        f"miscompare at byte offset {offset}",
        Sense(MISCOMPARE, 0x1D, 0x00),
        information=offset,
    )


def sense_of(error: BaseException) -> Sense | None:
    """The sense an error maps to, or None when it is not a SCSI-visible error."""
    if isinstance(error, ScsiError):
        return error.scsi_sense
    if isinstance(error, TargetvirtError):
        return error.sense
    return None


def invalid_field_in_information_unit(why: str = "") -> ScsiError:
    """The Data-Out Buffer is shorter than the CDB asks for (LIO's own reply to this)."""
    return ScsiError(
        "invalid field in information unit" + (f": {why}" if why else ""),
        Sense(ILLEGAL_REQUEST, 0x0E, 0x03),
    )


def write_protected(*, software: bool = False) -> ScsiError:
    """A write-type command reached a write-protected LUN (read-only export or SWP)."""
    return ScsiError(
        "the logical unit is " + ("software " if software else "") + "write protected",
        Sense(DATA_PROTECT, 0x27, 0x02 if software else 0x00),
    )


def saving_parameters_not_supported(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(
        "saving parameters is not supported",
        Sense(ILLEGAL_REQUEST, 0x39, 0x00),
        field_pointer=byte,
        bit=bit,
    )
