"""The TCM-USER generic netlink family (tcmu.md 2.3-2.6), without libnl.

:class:`TcmuCodec` is sans-I/O: it builds request datagrams and turns received
datagrams into message objects. :class:`NetlinkChannel` is the thin socket edge
(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC) around it.

What the kernel sends on the ``config`` multicast group: ADDED_DEVICE, REMOVED_DEVICE
and RECONFIG_DEVICE (with exactly one of DEV_CFG / DEV_SIZE / WRITECACHE). When reply
mode is on (SET_FEATURES with SUPP_KERN_CMD_REPLY=1 and the device's
``nl_reply_supported`` > 0) the configfs writer blocks, uninterruptibly, until the
matching ``*_DONE`` arrives: always answer with :meth:`TcmuCodec.reply`, which picks the
DONE command from the event so it cannot mismatch (a mismatch strands the waiter).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from targetvirt.errors import InvalidArgument, ProtocolError

# --- netlink and generic netlink constants (linux/netlink.h, linux/genetlink.h) ------

NETLINK_GENERIC: Final = 16
SOL_NETLINK: Final = 270  # not exported by Python 3.11's socket module
NETLINK_ADD_MEMBERSHIP: Final = 1

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4

NLA_F_NESTED: Final = 0x8000
NLA_F_NET_BYTEORDER: Final = 0x4000
NLA_TYPE_MASK: Final = 0x3FFF

GENL_ID_CTRL: Final = 0x10
CTRL_CMD_NEWFAMILY: Final = 1
CTRL_CMD_GETFAMILY: Final = 3
CTRL_VERSION: Final = 1  # what libnl sends; the controller does not check it
CTRL_ATTR_FAMILY_ID: Final = 1
CTRL_ATTR_FAMILY_NAME: Final = 2
CTRL_ATTR_VERSION: Final = 3
CTRL_ATTR_MCAST_GROUPS: Final = 7
CTRL_ATTR_MCAST_GRP_NAME: Final = 1
CTRL_ATTR_MCAST_GRP_ID: Final = 2

NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSGHDR_SIZE: Final = 16
GENLMSGHDR: Final = struct.Struct("=BBH")  # cmd, version, reserved
GENLMSGHDR_SIZE: Final = 4
NLATTR: Final = struct.Struct("=HH")  # len (header included), type
NLATTR_SIZE: Final = 4
_S32: Final = struct.Struct("=i")
_U32: Final = struct.Struct("=I")
_U16: Final = struct.Struct("=H")
_U64: Final = struct.Struct("=Q")

RECV_BUFSIZE: Final = 65536

# --- the TCM-USER family (include/uapi/linux/target_core_user.h) -----------------------

FAMILY_NAME: Final = "TCM-USER"
TCMU_GENL_VERSION: Final = 2
MCAST_GROUP: Final = "config"


class TcmuCmd(IntEnum):
    UNSPEC = 0
    ADDED_DEVICE = 1
    REMOVED_DEVICE = 2
    RECONFIG_DEVICE = 3
    ADDED_DEVICE_DONE = 4
    REMOVED_DEVICE_DONE = 5
    RECONFIG_DEVICE_DONE = 6
    SET_FEATURES = 7


class TcmuAttr(IntEnum):
    UNSPEC = 0
    DEVICE = 1
    MINOR = 2
    PAD = 3
    DEV_CFG = 4
    DEV_SIZE = 5
    WRITECACHE = 6
    CMD_STATUS = 7
    DEVICE_ID = 8
    SUPP_KERN_CMD_REPLY = 9


_DONE_FOR: Final = {
    TcmuCmd.ADDED_DEVICE: TcmuCmd.ADDED_DEVICE_DONE,
    TcmuCmd.REMOVED_DEVICE: TcmuCmd.REMOVED_DEVICE_DONE,
    TcmuCmd.RECONFIG_DEVICE: TcmuCmd.RECONFIG_DEVICE_DONE,
}

# --- decoded messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FamilyInfo:
    """The controller's answer to GETFAMILY: the family id (the ``nlmsg_type`` of all
    later TCM-USER messages) and its multicast groups by name."""

    name: str
    family_id: int
    version: int
    groups: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ack:
    """NLMSG_ERROR: ``error`` is 0 for a requested ACK, else a negative errno."""

    seq: int
    error: int


@dataclass(frozen=True, slots=True)
class Done:
    """NLMSG_DONE: end of a multipart answer."""

    seq: int


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """ADDED_DEVICE, REMOVED_DEVICE or RECONFIG_DEVICE from the kernel.

    ``device`` is the uio name ``tcm-user/<hba>/<dev>[/<dev_config>]``; ``minor`` makes
    the node ``/dev/uio<minor>``; ``device_id`` (``se_dev.dev_index``) must be echoed
    in the reply. A RECONFIG carries exactly one of the three new values.
    """

    cmd: TcmuCmd
    device: str
    minor: int
    device_id: int
    dev_cfg: str | None = None
    dev_size: int | None = None
    writecache: bool | None = None


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed message of no interest here (NOOP, other genl commands)."""

    nlmsg_type: int
    seq: int


Message = FamilyInfo | Ack | Done | DeviceEvent | Other

# --- attribute codec ----------------------------------------------------------------------


def _align4(n: int) -> int:
    return (n + 3) & ~3


def encode_attr(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (the length field excludes the pad)."""
    length = NLATTR_SIZE + len(payload)
    if length > 0xFFFF:
        raise InvalidArgument(f"netlink attribute {attr_type} of {len(payload)} bytes is too big")
    return NLATTR.pack(length, attr_type) + payload + bytes(_align4(length) - length)


def encode_string(attr_type: int, value: str) -> bytes:
    return encode_attr(attr_type, value.encode("utf-8", "surrogateescape") + b"\0")


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without NESTED/BYTEORDER flags, payload) for each attribute in ``data``."""
    mv = memoryview(data)
    pos = 0
    end = len(mv)
    while end - pos >= NLATTR_SIZE:
        length, attr_type = NLATTR.unpack_from(mv, pos)
        if length < NLATTR_SIZE or pos + length > end:
            raise ProtocolError(f"netlink attribute at byte {pos} has bad length {length}")
        yield attr_type & NLA_TYPE_MASK, mv[pos + NLATTR_SIZE : pos + length]
        pos += _align4(length)


def parse_attrs(data: bytes | memoryview) -> dict[int, memoryview]:
    """Attributes by type; a repeated type keeps its last value, as nla_parse does."""
    return dict(iter_attrs(data))


def _u32(attrs: dict[int, memoryview], attr_type: int, what: str) -> int:
    raw = attrs.get(attr_type)
    if raw is None or len(raw) < 4:
        raise ProtocolError(f"{what} attribute missing or shorter than 4 bytes")
    return int(_U32.unpack_from(raw)[0])


def _string(raw: memoryview) -> str:
    """An NLA_STRING: NUL-terminated (but tolerate a missing NUL)."""
    text = bytes(raw).split(b"\0", 1)[0]
    return text.decode("utf-8", "surrogateescape")


# --- the codec ---------------------------------------------------------------------------


class TcmuCodec:
    """Builds and parses TCM-USER datagrams. Holds only the sequence counter and the
    family id once it is known."""

    def __init__(self, family_id: int | None = None) -> None:
        self.family_id = family_id
        self._seq = 0

    def next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    def _message(
        self, nlmsg_type: int, flags: int, cmd: int, version: int, attrs: bytes
    ) -> tuple[int, bytes]:
        seq = self.next_seq()
        length = NLMSGHDR_SIZE + GENLMSGHDR_SIZE + len(attrs)
        hdr = NLMSGHDR.pack(length, nlmsg_type, flags, seq, 0)
        return seq, hdr + GENLMSGHDR.pack(cmd, version, 0) + attrs

    def _family(self) -> int:
        if self.family_id is None:
            raise ProtocolError("the TCM-USER family id is not resolved yet")
        return self.family_id

    # --- requests ------------------------------------------------------------------

    def get_family(self, name: str = FAMILY_NAME) -> tuple[int, bytes]:
        """CTRL_CMD_GETFAMILY for ``name``: returns (seq, datagram)."""
        attrs = encode_string(CTRL_ATTR_FAMILY_NAME, name)
        return self._message(GENL_ID_CTRL, NLM_F_REQUEST, CTRL_CMD_GETFAMILY, CTRL_VERSION, attrs)

    def set_features(self, kern_cmd_reply: bool, *, ack: bool = True) -> tuple[int, bytes]:
        """SET_FEATURES: whether this daemon answers events. Note the kernel keeps the
        setting after the daemon exits (tcmu.md 2.4)."""
        attrs = encode_attr(TcmuAttr.SUPP_KERN_CMD_REPLY, bytes([int(kern_cmd_reply)]))
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        return self._message(self._family(), flags, TcmuCmd.SET_FEATURES, TCMU_GENL_VERSION, attrs)

    def reply(self, event: DeviceEvent, status: int, *, ack: bool = False) -> tuple[int, bytes]:
        """The ``*_DONE`` matching ``event``: ``status`` 0 or a negative errno, which
        becomes the result of the configfs write that caused the event."""
        if not -4095 <= status <= 0:
            raise InvalidArgument(f"reply status {status} is not 0 or a negative errno")
        attrs = encode_attr(TcmuAttr.CMD_STATUS, _S32.pack(status)) + encode_attr(
            TcmuAttr.DEVICE_ID, _U32.pack(event.device_id)
        )
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        done = _DONE_FOR[event.cmd]
        return self._message(self._family(), flags, done, TCMU_GENL_VERSION, attrs)

    # --- decoding ------------------------------------------------------------------

    def decode(self, data: bytes | memoryview) -> list[Message]:
        """Every message in one received datagram. Raises ProtocolError for a datagram
        that does not parse (framing, missing mandatory attributes)."""
        out: list[Message] = []
        for nlmsg_type, flags, seq, payload in iter_messages(data):
            msg = self._decode_one(nlmsg_type, flags, seq, payload)
            if msg is not None:
                out.append(msg)
        return out

    def _decode_one(
        self, nlmsg_type: int, flags: int, seq: int, payload: memoryview
    ) -> Message | None:
        if nlmsg_type == NLMSG_ERROR:
            if len(payload) < 4:
                raise ProtocolError("NLMSG_ERROR shorter than its error code")
            return Ack(seq, int(_S32.unpack_from(payload)[0]))
        if nlmsg_type == NLMSG_DONE:
            return Done(seq)
        if nlmsg_type in (NLMSG_NOOP, NLMSG_OVERRUN) or nlmsg_type < GENL_ID_CTRL:
            return Other(nlmsg_type, seq)
        if len(payload) < GENLMSGHDR_SIZE:
            raise ProtocolError(f"generic netlink message type {nlmsg_type} lacks its header")
        cmd, _version, _ = GENLMSGHDR.unpack_from(payload)
        attrs = parse_attrs(payload[GENLMSGHDR_SIZE:])
        if nlmsg_type == GENL_ID_CTRL and cmd == CTRL_CMD_NEWFAMILY:
            return _family_info(attrs)
        if nlmsg_type == self.family_id and cmd in _DONE_FOR:
            return _device_event(TcmuCmd(cmd), attrs)
        return Other(nlmsg_type, seq)


def iter_messages(data: bytes | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, payload) of each netlink message in a datagram."""
    mv = memoryview(data)
    pos = 0
    end = len(mv)
    while pos < end:
        if end - pos < NLMSGHDR_SIZE:
            raise ProtocolError(f"{end - pos} trailing bytes after the last netlink message")
        length, nlmsg_type, flags, seq, _pid = NLMSGHDR.unpack_from(mv, pos)
        if length < NLMSGHDR_SIZE or pos + length > end:
            raise ProtocolError(f"netlink message at byte {pos} has bad length {length}")
        yield nlmsg_type, flags, seq, mv[pos + NLMSGHDR_SIZE : pos + length]
        pos += _align4(length)


def _family_info(attrs: dict[int, memoryview]) -> FamilyInfo:
    raw_id = attrs.get(CTRL_ATTR_FAMILY_ID)
    raw_name = attrs.get(CTRL_ATTR_FAMILY_NAME)
    if raw_id is None or len(raw_id) < 2 or raw_name is None:
        raise ProtocolError("controller reply lacks the family name or id")
    version = 0
    if (raw_version := attrs.get(CTRL_ATTR_VERSION)) is not None and len(raw_version) >= 4:
        version = int(_U32.unpack_from(raw_version)[0])
    groups: dict[str, int] = {}
    if (raw_groups := attrs.get(CTRL_ATTR_MCAST_GROUPS)) is not None:
        for _index, entry in iter_attrs(raw_groups):
            group = parse_attrs(entry)
            if CTRL_ATTR_MCAST_GRP_NAME in group:
                name = _string(group[CTRL_ATTR_MCAST_GRP_NAME])
                groups[name] = _u32(group, CTRL_ATTR_MCAST_GRP_ID, f"group {name!r} id")
    family_id = int(_U16.unpack_from(raw_id)[0])
    return FamilyInfo(_string(raw_name), family_id, version, groups)


def _device_event(cmd: TcmuCmd, attrs: dict[int, memoryview]) -> DeviceEvent:
    raw_device = attrs.get(TcmuAttr.DEVICE)
    if raw_device is None:
        raise ProtocolError(f"{cmd.name} event lacks the device name")
    device = _string(raw_device)
    minor = _u32(attrs, TcmuAttr.MINOR, f"{cmd.name} minor")
    device_id = _u32(attrs, TcmuAttr.DEVICE_ID, f"{cmd.name} device id")
    if cmd is not TcmuCmd.RECONFIG_DEVICE:
        return DeviceEvent(cmd, device, minor, device_id)
    dev_cfg = dev_size = writecache = None
    if (raw := attrs.get(TcmuAttr.DEV_CFG)) is not None:
        dev_cfg = _string(raw)
    if (raw := attrs.get(TcmuAttr.DEV_SIZE)) is not None:
        if len(raw) < 8:
            raise ProtocolError("RECONFIG dev_size attribute shorter than 8 bytes")
        dev_size = int(_U64.unpack_from(raw)[0])
    if (raw := attrs.get(TcmuAttr.WRITECACHE)) is not None:
        if len(raw) < 1:
            raise ProtocolError("RECONFIG writecache attribute is empty")
        writecache = bool(raw[0])
    if sum(v is not None for v in (dev_cfg, dev_size, writecache)) != 1:
        raise ProtocolError(
            "RECONFIG event must carry exactly one of dev_cfg, dev_size, writecache"
        )
    return DeviceEvent(cmd, device, minor, device_id, dev_cfg, dev_size, writecache)


# --- the socket edge -----------------------------------------------------------------------


class NetlinkChannel:
    """One generic netlink socket talking TCM-USER. Needs CAP_NET_ADMIN for replies.

    Typical use: ``ch = NetlinkChannel.open(); info = ch.resolve(); ch.subscribe(info)``,
    then poll :meth:`fileno` and call :meth:`receive`. An ``ENOBUFS`` from
    :meth:`receive` means multicast events were dropped: rescan sysfs for devices.
    """

    def __init__(self, sock: socket.socket, codec: TcmuCodec | None = None) -> None:
        self._sock = sock
        self.codec = codec or TcmuCodec()

    @classmethod
    def open(cls, rcvbuf: int = 1 << 20) -> NetlinkChannel:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, 0))  # the kernel assigns our port id
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, datagram: bytes) -> None:
        # An unconnected netlink socket sends to the kernel (port 0) by default; a
        # datagram is all or nothing.
        sent = self._sock.send(datagram)
        if sent != len(datagram):
            raise OSError(errno.EMSGSIZE, f"netlink send wrote {sent} of {len(datagram)} bytes")

    def resolve(self, timeout: float = 5.0) -> FamilyInfo:
        """Ask the controller for TCM-USER; sets ``codec.family_id``. Raises
        FileNotFoundError when the family is absent (target_core_user not loaded)."""
        seq, request = self.codec.get_family()
        previous = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            self._send(request)
            while True:
                for msg in self.codec.decode(self._sock.recv(RECV_BUFSIZE)):
                    if isinstance(msg, FamilyInfo) and msg.name == FAMILY_NAME:
                        self.codec.family_id = msg.family_id
                        return msg
                    if isinstance(msg, Ack) and msg.seq == seq and msg.error:
                        raise _family_error(-msg.error)
        finally:
            self._sock.settimeout(previous)

    def subscribe(self, info: FamilyInfo, group: str = MCAST_GROUP) -> None:
        """Join the multicast group the kernel sends device events to."""
        if group not in info.groups:
            raise ProtocolError(f"family {info.name!r} has no multicast group {group!r}")
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, info.groups[group])

    def set_features(self, kern_cmd_reply: bool) -> int:
        seq, datagram = self.codec.set_features(kern_cmd_reply)
        self._send(datagram)
        return seq

    def reply(self, event: DeviceEvent, status: int = 0) -> int:
        """Answer ``event``; a failure comes back later as an :class:`Ack` with the
        returned seq (netlink reports errors even without NLM_F_ACK)."""
        seq, datagram = self.codec.reply(event, status)
        self._send(datagram)
        return seq

    def receive(self) -> list[Message]:
        """Messages of one datagram; [] if the socket is non-blocking and empty."""
        try:
            data = self._sock.recv(RECV_BUFSIZE)
        except BlockingIOError:
            return []
        return self.codec.decode(data)


def _family_error(err: int) -> OSError:
    if err == errno.ENOENT:
        return FileNotFoundError(
            err, f"generic netlink family {FAMILY_NAME} is not registered; load target_core_user"
        )
    return OSError(err, f"resolving generic netlink family {FAMILY_NAME} failed")
