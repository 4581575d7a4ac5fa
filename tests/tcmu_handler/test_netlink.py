"""The TCM-USER netlink codec against literal datagrams, and the socket edge over a
datagram socketpair standing in for the kernel."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.errors import InvalidArgument, ProtocolError
from tcmu_handler.netlink import (
    Ack,
    DeviceEvent,
    Done,
    FamilyInfo,
    NetlinkChannel,
    Other,
    TcmuCmd,
    TcmuCodec,
    encode_attr,
    parse_attrs,
)
from tests.fuzzing import fuzz_settings


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def relen(datagram: bytes) -> bytes:
    """Fix nlmsg_len after a test cut attributes out of a one-message datagram."""
    return len(datagram).to_bytes(4, "little") + datagram[4:]


GETFAMILY = h(
    "24000000 1000 0100 01000000 00000000"  # len 36, GENL_ID_CTRL, REQUEST, seq 1, pid 0
    "03 01 0000"  # CTRL_CMD_GETFAMILY, version 1
    "0d00 0200 54434d2d5553455200 000000"  # FAMILY_NAME "TCM-USER\0", padded to 4
)

# The controller's answer (ctrl_fill_info): name, id 0x1c, version 2, hdrsize, maxattr,
# an OPS nest, then MCAST_GROUPS = { 1: { NAME "config", ID 11 } }. The OPS nest
# carries NLA_F_NESTED (0x8000) to check that flag bits are masked off.
NEWFAMILY = h(
    "78000000 1000 0000 01000000 a1b2c3d4"  # len 120, GENL_ID_CTRL, seq 1, pid
    "01 02 0000"  # CTRL_CMD_NEWFAMILY
    "0d00 0200 54434d2d5553455200 000000"  # FAMILY_NAME
    "0600 0100 1c00 0000"  # FAMILY_ID u16 0x1c
    "0800 0300 02000000"  # VERSION 2
    "0800 0400 00000000"  # HDRSIZE 0
    "0800 0500 09000000"  # MAXATTR 9
    "1800 0680 1400 0100 0800 0100 07000000 0800 0200 0a000000"  # OPS (nested, flagged)
    "1c00 0700 1800 0100 0b00 0100 636f6e66696700 00 0800 0200 0b000000"  # MCAST_GROUPS
)

DEVICE = "tcm-user/1/disk0/targetvirt/vd1"
ADDED = h(
    "48000000 1c00 0000 00000000 00000000"  # len 72, family 0x1c, multicast seq 0
    "01 02 0000"  # ADDED_DEVICE, version 2
    "2400 0100" + DEVICE.encode().hex() + "00"  # DEVICE "...\0": 4 + 32 = 36
    "0800 0200 03000000"  # MINOR 3
    "0800 0800 07000000"  # DEVICE_ID 7
)

# RECONFIG(DEV_SIZE) as an arch needing 64-bit alignment sends it: a PAD attribute
# (type 3, empty) before the u64.
RECONFIG_SIZE = h(
    "58000000 1c00 0000 00000000 00000000"  # len 88
    "03 02 0000"  # RECONFIG_DEVICE
    "2400 0100" + DEVICE.encode().hex() + "00"
    "0800 0200 03000000"
    "0800 0800 07000000"
    "0400 0300"  # PAD
    "0c00 0500 0000004000000000"  # DEV_SIZE 1 GiB
)


def test_get_family_request_bytes() -> None:
    codec = TcmuCodec()
    assert codec.get_family() == (1, GETFAMILY)


def test_family_reply_gives_id_and_groups() -> None:
    (info,) = TcmuCodec().decode(NEWFAMILY)
    assert info == FamilyInfo("TCM-USER", 0x1C, 2, {"config": 11})


def test_added_event_and_its_done_reply() -> None:
    codec = TcmuCodec(family_id=0x1C)
    (event,) = codec.decode(ADDED)
    assert event == DeviceEvent(TcmuCmd.ADDED_DEVICE, DEVICE, 3, 7)
    codec.next_seq()  # seq 1 used elsewhere
    assert codec.reply(event, -2) == (
        2,
        h(
            "24000000 1c00 0100 02000000 00000000"  # len 36, family, REQUEST, seq 2
            "04 02 0000"  # ADDED_DEVICE_DONE, version 2
            "0800 0700 feffffff"  # CMD_STATUS -ENOENT (s32)
            "0800 0800 07000000"  # DEVICE_ID 7
        ),
    )


def test_done_command_always_matches_the_event() -> None:
    codec = TcmuCodec(family_id=0x1C)
    for cmd, done in [(2, 5), (3, 6)]:
        event = DeviceEvent(TcmuCmd(cmd), DEVICE, 3, 7, dev_cfg="x" if cmd == 3 else None)
        assert codec.reply(event, 0)[1][16] == done


def test_reconfig_with_pad_attribute() -> None:
    (event,) = TcmuCodec(family_id=0x1C).decode(RECONFIG_SIZE)
    assert event == DeviceEvent(TcmuCmd.RECONFIG_DEVICE, DEVICE, 3, 7, dev_size=1 << 30)


def test_reconfig_dev_cfg_and_writecache() -> None:
    body = h("0800 0200 03000000 0800 0800 07000000") + encode_attr(1, DEVICE.encode() + b"\0")
    codec = TcmuCodec(family_id=0x1C)
    for extra, expect in [
        (encode_attr(4, b"targetvirt/vd2\0"), {"dev_cfg": "targetvirt/vd2"}),
        (encode_attr(6, b"\x01"), {"writecache": True}),
    ]:
        payload = h("03 02 0000") + body + extra
        msg = relen(h("00000000 1c00 0000 00000000 00000000") + payload)
        (event,) = codec.decode(msg)
        assert event == DeviceEvent(TcmuCmd.RECONFIG_DEVICE, DEVICE, 3, 7, **expect)  # type: ignore[arg-type]


def test_set_features_bytes() -> None:
    assert TcmuCodec(family_id=0x1C).set_features(True) == (
        1,
        h("1c000000 1c00 0500 01000000 00000000 07 02 0000 0500 0900 01 000000"),
    )


def test_error_done_and_several_messages_in_one_datagram() -> None:
    err = h("24000000 0200 0001 05000000 39300000 feffffff") + GETFAMILY[:16]  # -ENOENT
    ack = h("24000000 0200 0001 06000000 39300000 00000000") + GETFAMILY[:16]
    done = h("14000000 0300 0200 07000000 39300000 00000000")
    noop = h("10000000 0100 0000 08000000 00000000")
    msgs = TcmuCodec(family_id=0x1C).decode(err + ack + ADDED + done + noop)
    assert msgs == [
        Ack(5, -2),
        Ack(6, 0),
        DeviceEvent(TcmuCmd.ADDED_DEVICE, DEVICE, 3, 7),
        Done(7),
        Other(1, 8),
    ]


def test_events_of_an_unresolved_or_other_family_are_not_taken() -> None:
    assert TcmuCodec().decode(ADDED) == [Other(0x1C, 0)]
    assert TcmuCodec(family_id=0x1D).decode(ADDED) == [Other(0x1C, 0)]


@pytest.mark.parametrize(
    ("datagram", "words"),
    [
        (ADDED[:10], "trailing bytes"),
        (h("08000000") + ADDED[4:], "bad length 8"),
        (h("ff000000") + ADDED[4:], "bad length 255"),
        (ADDED[:20] + h("0200 0100") + ADDED[24:], "bad length 2"),
        (ADDED[:20] + h("ff00 0100") + ADDED[24:], "bad length 255"),
        (h("14000000 1c00 0000 00000000 00000000 01020000"), "lacks the device name"),
        (ADDED[:-8] + h("0600 0800 0700 0000"), "device id attribute"),
        (relen(ADDED[:-8]), "device id attribute"),
        (h("10000000 1c00 0000 00000000 00000000"), "lacks its header"),
        (h("10000000 0200 0000 00000000 00000000"), "shorter than its error code"),
        (relen(RECONFIG_SIZE[:-16]), "exactly one"),
        (relen(NEWFAMILY[:20] + NEWFAMILY[36:]), "family name or id"),
    ],
)
def test_malformed_datagrams_raise_protocol_error(datagram: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        TcmuCodec(family_id=0x1C).decode(datagram)


def decodes_or_protocol_error(datagram: bytes) -> None:
    try:
        messages = TcmuCodec(family_id=0x1C).decode(datagram)
    except ProtocolError as e:
        assert str(e) and len(str(e).splitlines()) == 1
        return
    for msg in messages:
        assert isinstance(msg, (Ack, Done, FamilyInfo, DeviceEvent, Other))


@fuzz_settings(1000)
@given(st.binary(max_size=200))
def test_arbitrary_datagrams_only_raise_protocol_error(datagram: bytes) -> None:
    """Fuzz target: whatever arrives on the TCM-USER socket decodes or raises
    ProtocolError, nothing else."""
    decodes_or_protocol_error(datagram)


@fuzz_settings(1000)
@given(
    st.sampled_from([NEWFAMILY, ADDED, RECONFIG_SIZE, ADDED + RECONFIG_SIZE]),
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=4),
    st.one_of(st.just(0), st.integers(1, 64)),
)
def test_mutated_datagrams_only_raise_protocol_error(
    datagram: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    """Fuzz target: real datagrams with bytes changed and cut short."""
    raw = bytearray(datagram)
    for at, value in flips:
        raw[at % len(raw)] = value
    decodes_or_protocol_error(bytes(raw[: max(0, len(raw) - cut)]))


def test_names_from_the_kernel_are_quoted_in_errors() -> None:
    """A group name holding a line break still makes a one-line error (found by the
    fuzzer): the group's ID attribute retyped as a second NAME, "\\v\\0\\0\\0"."""
    bad = bytearray(NEWFAMILY)
    bad[114] = 1
    with pytest.raises(ProtocolError) as e:
        TcmuCodec().decode(bytes(bad))
    assert str(e.value) == "group '\\x0b' id attribute missing or shorter than 4 bytes"


def test_attributes_mask_flags_and_keep_last_duplicate() -> None:
    attrs = parse_attrs(h("0800 0180 01000000 0800 0100 02000000 0500 0240 07 000000"))
    assert {k: bytes(v) for k, v in attrs.items()} == {1: h("02000000"), 2: b"\x07"}


def test_requests_need_a_resolved_family_and_valid_status() -> None:
    with pytest.raises(ProtocolError, match="not resolved"):
        TcmuCodec().set_features(True)
    event = DeviceEvent(TcmuCmd.ADDED_DEVICE, DEVICE, 3, 7)
    with pytest.raises(InvalidArgument):
        TcmuCodec(family_id=0x1C).reply(event, 1)


# --- socket edge over a socketpair ----------------------------------------------------


def test_channel_resolves_replies_and_receives() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel, NetlinkChannel(ours) as channel:
        kernel.send(NEWFAMILY)  # queued answer to the seq-1 request
        info = channel.resolve(timeout=5)
        assert kernel.recv(4096) == GETFAMILY
        assert info.groups == {"config": 11} and channel.codec.family_id == 0x1C
        kernel.send(ADDED)
        (event,) = channel.receive()
        assert isinstance(event, DeviceEvent)
        seq = channel.reply(event)
        reply = kernel.recv(4096)
        assert reply[4:6] == h("1c00") and reply[16] == TcmuCmd.ADDED_DEVICE_DONE
        assert int.from_bytes(reply[8:12], "little") == seq
        ours.setblocking(False)
        assert channel.receive() == []


def test_channel_reports_a_missing_family() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, kernel:
        channel = NetlinkChannel(ours)

        def answer() -> None:
            request = kernel.recv(4096)
            kernel.send(h("24000000 0200 0000 01000000 00000000 feffffff") + request[:16])

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(FileNotFoundError, match="target_core_user"):
            channel.resolve(timeout=5)
        t.join()
