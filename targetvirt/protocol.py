"""Controller <-> agent messages and their binary encoding (sans-I/O).

Every message is a frozen dataclass.  On the wire it is::

    u8 version | u8 type | fields, in declaration order, little-endian

with strings as ``u16 length + UTF-8``, lists of strings as ``u16 count + strings``,
table entries as ``u32 count + packed u64`` (the agents' ``array('Q')`` layout, so a
table range costs one memcpy each way) and seconds as finite, non-negative ``f64``.
:func:`decode` accepts exactly what :func:`encode` produces: anything else -- a short or
long buffer, an unknown version or type, bad UTF-8, an out-of-range value -- raises
:class:`~targetvirt.errors.ProtocolError` and nothing else.

Three families of messages:

* requests, agent -> controller (unary): :class:`Register` then, with the session it
  returns, :class:`Attach`, :class:`Describe`, :class:`Fetch`, :class:`Fault`,
  :class:`Unmap`, :class:`Flush`, :class:`LeaseRenew`, :class:`ContainerFailure`,
  :class:`Exclusive`, :class:`EndExclusive`; on the command stream
  :class:`Hello` then :class:`Ack` for each command;
* replies, controller -> agent: one per request, or :class:`Refused` carrying an error;
* commands, controller -> agent, pushed down the stream, each with a sequence number
  that its :class:`Ack` repeats.

Entries sent to an agent are *annotated*: the controller sets SHARED on entries whose
segment another table maps, and the state bits (NOWRITE while a freeze or a migration
holds the entry), so an agent installs them as they are.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NoReturn, TypeVar

from targetvirt import errors
from targetvirt import table as t
from targetvirt.errors import ProtocolError, TargetvirtError

# 2: VDiskInfo.uuid, Describe; Exclusive, EndExclusive, Solo (CAW across agents)
# 3: FreezeShared (a live copy's freeze and MarkShared in one command)
VERSION = 3
MAX_ENTRIES = 1 << 21  # one message carries at most 16 MiB of entries (2 TiB of 1 MiB segments)
MAX_STR = 4096
MAX_LIST = 4096

_HEAD = struct.Struct("<BB")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


class _Reader:
    """Bounds-checked consumption of one message's bytes."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError(f"message truncated in {what} (needs {end} bytes)")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, st: struct.Struct, what: str) -> int:
        value: int = st.unpack(self.take(st.size, what))[0]
        return value


# --- field codecs ----------------------------------------------------------------------


class Codec:
    """How one field is written and read."""

    def put(self, out: bytearray, value: Any, what: str) -> None:
        raise NotImplementedError

    def get(self, r: _Reader, what: str) -> Any:
        raise NotImplementedError


class _Int(Codec):
    def __init__(self, st: struct.Struct, bits: int) -> None:
        self.st = st
        self.limit = 1 << bits

    def put(self, out: bytearray, value: Any, what: str) -> None:
        if type(value) is not int or not 0 <= value < self.limit:
            raise ProtocolError(f"{what} must be an integer in [0, {self.limit}), got {value!r}")
        out += self.st.pack(value)

    def get(self, r: _Reader, what: str) -> int:
        return r.unpack(self.st, what)


class _Bool(Codec):
    def put(self, out: bytearray, value: Any, what: str) -> None:
        if type(value) is not bool:
            raise ProtocolError(f"{what} must be a bool, got {value!r}")
        out += _U8.pack(value)

    def get(self, r: _Reader, what: str) -> bool:
        v = r.unpack(_U8, what)
        if v > 1:
            raise ProtocolError(f"{what} is not a boolean ({v})")
        return v == 1


class _Seconds(Codec):
    def put(self, out: bytearray, value: Any, what: str) -> None:
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"{what} must be finite seconds >= 0, got {value!r}")
        out += _F64.pack(float(value))

    def get(self, r: _Reader, what: str) -> float:
        v: float = _F64.unpack(r.take(_F64.size, what))[0]
        if not math.isfinite(v) or v < 0:
            raise ProtocolError(f"{what} is not finite seconds >= 0 ({v})")
        return v


class _Str(Codec):
    def put(self, out: bytearray, value: Any, what: str) -> None:
        if not isinstance(value, str):
            raise ProtocolError(f"{what} must be a string, got {type(value).__name__}")
        raw = value.encode()
        if len(raw) > MAX_STR:
            raise ProtocolError(f"{what} is longer than {MAX_STR} bytes")
        out += _U16.pack(len(raw)) + raw

    def get(self, r: _Reader, what: str) -> str:
        n = r.unpack(_U16, what)
        if n > MAX_STR:
            raise ProtocolError(f"{what} is longer than {MAX_STR} bytes ({n})")
        try:
            return str(r.take(n, what), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not valid UTF-8") from None


class _List(Codec):
    def __init__(self, item: Codec) -> None:
        self.item = item

    def put(self, out: bytearray, value: Any, what: str) -> None:
        if not isinstance(value, tuple) or len(value) > MAX_LIST:
            raise ProtocolError(f"{what} must be a tuple of at most {MAX_LIST} items")
        out += _U16.pack(len(value))
        for v in value:
            self.item.put(out, v, what)

    def get(self, r: _Reader, what: str) -> tuple[Any, ...]:
        n = r.unpack(_U16, what)
        if n > MAX_LIST:
            raise ProtocolError(f"{what} has more than {MAX_LIST} items ({n})")
        return tuple(self.item.get(r, what) for _ in range(n))


class _Entries(Codec):
    """Packed u64 entries: one memcpy from and into an ``array('Q')``."""

    def put(self, out: bytearray, value: Any, what: str) -> None:
        if not isinstance(value, array) or value.typecode != "Q" or len(value) > MAX_ENTRIES:
            raise ProtocolError(f"{what} must be an array('Q') of at most {MAX_ENTRIES} entries")
        out += _U32.pack(len(value))
        out += memoryview(value).cast("B")

    def get(self, r: _Reader, what: str) -> array[int]:
        n = r.unpack(_U32, what)
        if n > MAX_ENTRIES:
            raise ProtocolError(f"{what} has more than {MAX_ENTRIES} entries ({n})")
        entries = array("Q")
        entries.frombytes(r.take(8 * n, what))
        return entries


class _State(Codec):
    STATES = (t.NORMAL, t.NOWRITE, t.INVALID)

    def put(self, out: bytearray, value: Any, what: str) -> None:
        if value not in self.STATES:
            raise ProtocolError(f"{what} must be NORMAL, NOWRITE or INVALID, got {value!r}")
        out += _U8.pack(value)

    def get(self, r: _Reader, what: str) -> int:
        v = r.unpack(_U8, what)
        if v not in self.STATES:
            raise ProtocolError(f"{what} is not an entry state ({v})")
        return v


class _Struct(Codec):
    """A nested record (a dataclass with ``CODECS``)."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls

    def put(self, out: bytearray, value: Any, what: str) -> None:
        if not isinstance(value, self.cls):
            raise ProtocolError(f"{what} must be a {self.cls.__name__}")
        _put_fields(out, value)

    def get(self, r: _Reader, what: str) -> Any:
        return _get_fields(self.cls, r)


U8 = _Int(_U8, 8)
U16 = _Int(_U16, 16)
U32 = _Int(_U32, 32)
U64 = _Int(_U64, 64)
BOOL = _Bool()
SECONDS = _Seconds()
STR = _Str()
STRS = _List(STR)
ENTRIES = _Entries()
STATE = _State()


def _put_fields(out: bytearray, obj: Any) -> None:
    for name, codec in zip(obj.FIELD_NAMES, obj.CODECS, strict=True):
        codec.put(out, getattr(obj, name), f"{type(obj).__name__}.{name}")


def _get_fields(cls: type[Any], r: _Reader) -> Any:
    values = [
        codec.get(r, f"{cls.__name__}.{name}")
        for name, codec in zip(cls.FIELD_NAMES, cls.CODECS, strict=True)
    ]
    obj = cls(*values)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


# --- messages --------------------------------------------------------------------------

M = TypeVar("M", bound="Message")
_TYPES: dict[int, type[Message]] = {}


class Message:
    """Base of every message; subclasses set ``TYPE`` and ``CODECS`` (one per field)."""

    TYPE: ClassVar[int]
    CODECS: ClassVar[tuple[Codec, ...]]
    FIELD_NAMES: ClassVar[tuple[str, ...]]


def message(type_code: int, *codecs: Codec) -> Callable[[type[M]], type[M]]:
    """Register a message dataclass under ``type_code`` with one codec per field."""

    def register(cls: type[M]) -> type[M]:
        names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        if len(names) != len(codecs) or type_code in _TYPES:
            raise TypeError(f"bad message declaration {cls.__name__}")
        cls.TYPE, cls.CODECS, cls.FIELD_NAMES = type_code, codecs, names
        _TYPES[type_code] = cls
        return cls

    return register


R = TypeVar("R")


def _record(*codecs: Codec) -> Callable[[type[R]], type[R]]:
    def register(cls: type[R]) -> type[R]:
        cls.CODECS = codecs  # type: ignore[attr-defined]
        cls.FIELD_NAMES = tuple(f.name for f in fields(cls))  # type: ignore[arg-type, attr-defined]
        return cls

    return register


class Request(Message):
    """Agent -> controller."""


class Reply(Message):
    """Controller -> agent, answering a request."""


@dataclass(frozen=True, slots=True)
class Command(Message):
    """Controller -> agent, pushed on the command stream; ``seq`` comes back in the ack."""

    seq: int
    vdisk: str


# requests


@message(1, STR, STR, STRS)
@dataclass(frozen=True, slots=True)
class Register(Request):
    """An agent (re)joins: it has quiesced every vdisk it served and will reload them."""

    agent_id: str
    host: str
    vdisks: tuple[str, ...]


@message(2, STR, U64, STR)
@dataclass(frozen=True, slots=True)
class Attach(Request):
    """Serve one more vdisk (or refresh its description); answered by :class:`VDiskInfo`."""

    agent_id: str
    session: int
    vdisk: str


@message(3, STR, U64, STR)
@dataclass(frozen=True, slots=True)
class Detach(Request):
    agent_id: str
    session: int
    vdisk: str


@message(4, STR, U64, STR, U64, U32)
@dataclass(frozen=True, slots=True)
class Fetch(Request):
    """Entries ``[start, start + count)``: answered by :class:`TableRange`."""

    agent_id: str
    session: int
    vdisk: str
    start: int
    count: int

    def check(self) -> None:
        if self.count > MAX_ENTRIES:
            raise ProtocolError(f"Fetch of {self.count} entries exceeds {MAX_ENTRIES}")


@message(5, STR, U64, STR, U64, BOOL)
@dataclass(frozen=True, slots=True)
class Fault(Request):
    """Make entry ``index`` privately writable (allocate or copy-on-write).

    ``covered``: the write overwrites the whole segment, so old data need not be copied.
    """

    agent_id: str
    session: int
    vdisk: str
    index: int
    covered: bool


@message(6, STR, U64, STR, U64, U32)
@dataclass(frozen=True, slots=True)
class Unmap(Request):
    """Deallocate whole entries; answered by the resulting :class:`TableRange`."""

    agent_id: str
    session: int
    vdisk: str
    start: int
    count: int


@message(7, STR, U64)
@dataclass(frozen=True, slots=True)
class Flush(Request):
    """Commit metadata (the agent has synced its containers first)."""

    agent_id: str
    session: int


@message(8, STR, U64)
@dataclass(frozen=True, slots=True)
class LeaseRenew(Request):
    agent_id: str
    session: int


@message(9, STR, U64)
@dataclass(frozen=True, slots=True)
class Hello(Request):
    """First message an agent sends on its command stream."""

    agent_id: str
    session: int


@message(10, U64, BOOL, STR)
@dataclass(frozen=True, slots=True)
class Ack(Request):
    """The command ``seq`` is applied (and what it required drained); or why not."""

    seq: int
    ok: bool = True
    error: str = ""


@message(11, STR, U64, STR, U16, STR)
@dataclass(frozen=True, slots=True)
class ContainerFailure(Request):
    """The agent met a medium error on a container: the pool must place no new segments
    there (answered by :class:`Done`; best effort, nothing waits for it)."""

    agent_id: str
    session: int
    pool_uuid: str
    cid: int
    error: str


@message(12, STR, U64, STR)
@dataclass(frozen=True, slots=True)
class Describe(Request):
    """Whether a vdisk exists and what it is, without serving it (a handler checking a LUN
    configuration); answered by :class:`VDiskInfo`."""

    agent_id: str
    session: int
    vdisk: str


# COMPARE AND WRITE across gateways (protocol version 2).  An old controller refuses
# them as unknown types, and an old agent never sends them (it never hears Solo either).


@message(13, STR, U64, STR, U64, U32)
@dataclass(frozen=True, slots=True)
class Exclusive(Request):
    """Hold every *other* agent's writes to entries ``[start, start + count)`` (NOWRITE,
    drained) for one COMPARE AND WRITE; answered by :class:`LeaseGrant`: the hold lasts
    at most ``seconds`` from when the request was sent (the controller drops it a margin
    later), or until :class:`EndExclusive`."""

    agent_id: str
    session: int
    vdisk: str
    start: int
    count: int

    def check(self) -> None:
        if not 0 < self.count <= MAX_ENTRIES:
            raise ProtocolError(f"Exclusive of {self.count} entries is out of range")


@message(14, STR, U64, STR)
@dataclass(frozen=True, slots=True)
class EndExclusive(Request):
    """The COMPARE AND WRITE is over: lift the hold on the others; answered by :class:`Done`."""

    agent_id: str
    session: int
    vdisk: str


# replies


@message(32, U64, SECONDS)
@dataclass(frozen=True, slots=True)
class Registered(Reply):
    session: int
    lease_seconds: float


@_record(U16, STR, STR, STR, STR, U32, U64, BOOL)
@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """Where a container is and what its label must say (the agent opens it itself)."""

    FIELD_NAMES: ClassVar[tuple[str, ...]]
    CODECS: ClassVar[tuple[Codec, ...]]

    cid: int
    path: str
    kind: str
    pool_uuid: str
    uuid: str
    segment_size: int
    nsegments: int
    preallocated: bool


@message(33, STR, U64, U32, BOOL, _List(_Struct(ContainerInfo)), STR)
@dataclass(frozen=True, slots=True)
class VDiskInfo(Reply):
    vdisk: str
    size: int
    segment_size: int
    readonly: bool
    containers: tuple[ContainerInfo, ...]
    uuid: str = ""  # the vdisk's identity (a LUN's NAA designator is made of it)

    def check(self) -> None:
        s = self.segment_size
        if s < 4096 or s & (s - 1):
            raise ProtocolError(f"VDiskInfo.segment_size {s} is not a power of two >= 4096")
        if -(-self.size // s) > t.MAX_SEGMENTS:
            raise ProtocolError(f"VDiskInfo.size {self.size} is out of range")


@message(34, STR, U64, ENTRIES)
@dataclass(frozen=True, slots=True)
class TableRange(Reply):
    vdisk: str
    start: int
    entries: array[int]


@message(35, STR, U64, U64)
@dataclass(frozen=True, slots=True)
class FaultReply(Reply):
    vdisk: str
    index: int
    entry: int


@message(36, SECONDS)
@dataclass(frozen=True, slots=True)
class LeaseGrant(Reply):
    seconds: float


@message(37)
@dataclass(frozen=True, slots=True)
class Done(Reply):
    pass


@message(38, U16, STR)
@dataclass(frozen=True, slots=True)
class Refused(Reply):
    """The request failed with an error of class ``ERRORS[code]``."""

    code: int
    message: str


# commands


@message(64, U64, STR, U64, U64, STATE)
@dataclass(frozen=True, slots=True)
class SetState(Command):
    """NOWRITE / INVALID on ``[start, start + count)`` (drains what used the old state);
    NORMAL lifts NOWRITE only: an invalid entry becomes usable through a fetch or update.
    """

    start: int
    count: int
    state: int


@message(65, U64, STR)
@dataclass(frozen=True, slots=True)
class Block(Command):
    """Queue new I/O to the vdisk and drain what is in flight, then ack."""


@message(66, U64, STR)
@dataclass(frozen=True, slots=True)
class Unblock(Command):
    pass


@message(67, U64, STR, ENTRIES, ENTRIES)
@dataclass(frozen=True, slots=True)
class Update(Command):
    """Install annotated ``entries`` at ``indexes`` (drains I/O that used the old ones)."""

    indexes: array[int]
    entries: array[int]

    def check(self) -> None:
        if len(self.indexes) != len(self.entries):
            raise ProtocolError("Update has different numbers of indexes and entries")


@message(68, U64, STR)
@dataclass(frozen=True, slots=True)
class MarkShared(Command):
    """Set SHARED on every mapped entry (the table was just copied)."""


@message(69, U64, STR, SECONDS)
@dataclass(frozen=True, slots=True)
class Delay(Command):
    """Hold all I/O to the vdisk for ``seconds`` from receipt, then release it.

    Relative, not an absolute deadline: agents on other hosts share no clock epoch with
    the controller.  The agent turns it into a deadline on its own clock on receipt.
    """

    seconds: float


@message(70, U64, STR)
@dataclass(frozen=True, slots=True)
class CancelDelay(Command):
    pass


@message(71, U64, STR)
@dataclass(frozen=True, slots=True)
class DropVDisk(Command):
    """Stop serving the vdisk (deleted): drain, then fail its I/O with NotFound."""


@message(72, U64, STR, U64)
@dataclass(frozen=True, slots=True)
class Resize(Command):
    """New size in bytes; entries past the old end arrive invalid (fetched on use)."""

    size: int


@message(73, U64, STR)
@dataclass(frozen=True, slots=True)
class SoftThreshold(Command):
    """The vdisk's pool reached its soft threshold: the LUNs of the vdisk report the
    thin-provisioning unit attention (nothing to drain)."""


@message(74, U64, STR, BOOL)
@dataclass(frozen=True, slots=True)
class Solo(Command):
    """``alone``: this agent is the only one that may write the vdisk, so its COMPARE AND
    WRITE needs no :class:`Exclusive` round trip.  ``alone=False`` is acknowledged only
    once a COMPARE AND WRITE in flight has finished (a drain).  Agents start not alone."""

    alone: bool


@message(75, U64, STR, STATE)
@dataclass(frozen=True, slots=True)
class FreezeShared(Command):
    """``SetState(state)`` over the whole table then :class:`MarkShared`, with one drain
    and one ack: a live copy's freeze.  One message instead of two keeps the agent's and
    the controller's threads (and the transport's) out of the freeze window's way."""

    state: int

    def check(self) -> None:
        if self.state == t.NORMAL:
            raise ProtocolError("FreezeShared must freeze: NOWRITE or INVALID, not NORMAL")


COMMANDS = (
    SetState, Block, Unblock, Update, MarkShared, Delay, CancelDelay, DropVDisk, Resize,
    SoftThreshold, Solo, FreezeShared,
)  # fmt: skip


# --- encoding --------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    out = bytearray(_HEAD.pack(VERSION, msg.TYPE))
    _put_fields(out, msg)
    check = getattr(msg, "check", None)
    if check is not None:
        check()
    return bytes(out)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in ``data``; raises ProtocolError (only) when it is not one."""
    buf = memoryview(data).cast("B")
    if len(buf) < _HEAD.size:
        raise ProtocolError(f"message of {len(buf)} bytes is shorter than its header")
    version, code = _HEAD.unpack_from(buf)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this is {VERSION})")
    cls = _TYPES.get(code)
    if cls is None:
        raise ProtocolError(f"unknown message type {code}")
    r = _Reader(buf[_HEAD.size :])
    msg: Message = _get_fields(cls, r)
    if r.pos != len(r.buf):
        raise ProtocolError(f"{cls.__name__} has {len(r.buf) - r.pos} trailing bytes")
    return msg


def decode_as(data: bytes | bytearray | memoryview, *kinds: type[M]) -> M:
    """Decode and require one of ``kinds``."""
    msg = decode(data)
    if not isinstance(msg, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise ProtocolError(f"expected {names}, got {type(msg).__name__}")
    return msg


# --- errors across the wire ------------------------------------------------------------

# Order is part of the protocol: append only.
ERRORS: tuple[type[TargetvirtError], ...] = (
    TargetvirtError,
    errors.InvalidArgument,
    errors.NotFound,
    errors.AlreadyExists,
    errors.InUse,
    errors.Cancelled,
    errors.PoolFull,
    errors.ContainerIOError,
    errors.ContainerWriteError,
    errors.ReadOnly,
    errors.StoreError,
    errors.ProtocolError,
    errors.AgentTimeout,
    errors.LeaseExpired,
    errors.FrozenTimeout,
    errors.SessionLost,
    errors.ControllerUnreachable,
    errors.StoreCorrupt,
)


def refusal(error: TargetvirtError) -> Refused:
    """The reply that carries ``error`` (its most specific class the protocol knows)."""
    for cls in type(error).__mro__:
        if cls in ERRORS:
            return Refused(ERRORS.index(cls), str(error)[:MAX_STR])
    return Refused(0, str(error)[:MAX_STR])  # pragma: no cover - every error is a TargetvirtError


def raise_refused(reply: Refused) -> NoReturn:
    """Raise the error a :class:`Refused` carries (unknown codes: the base class)."""
    cls = ERRORS[reply.code] if reply.code < len(ERRORS) else TargetvirtError
    raise cls(reply.message)
