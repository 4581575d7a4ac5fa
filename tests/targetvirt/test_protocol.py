"""The controller <-> agent codec: exact round trips, and only ProtocolError on bad bytes
(the fuzz targets scale with TV_FUZZ_SCALE)."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt import errors
from targetvirt import protocol as p
from targetvirt import table as t
from tests.fuzzing import fuzz_settings, one_line

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
names = st.text(max_size=40)
seconds = st.floats(0, 1e9, allow_nan=False, allow_infinity=False)
entries = st.lists(u64, max_size=50).map(lambda xs: array("Q", xs))
states = st.sampled_from([t.NORMAL, t.NOWRITE, t.INVALID])
freezes = st.sampled_from([t.NOWRITE, t.INVALID])
containers = st.builds(
    p.ContainerInfo, st.integers(0, 2**16 - 1), names, names, names, names, u32, u64,
    st.booleans(),
)  # fmt: skip


def _update(seq: int, vdisk: str, pairs: list[tuple[int, int]]) -> p.Update:
    return p.Update(
        seq, vdisk, array("Q", [i for i, _ in pairs]), array("Q", [e for _, e in pairs])
    )


messages = st.one_of(
    st.builds(p.Register, names, names, st.lists(names, max_size=5).map(tuple)),
    st.builds(p.Attach, names, u64, names),
    st.builds(p.Describe, names, u64, names),
    st.builds(p.Detach, names, u64, names),
    st.builds(p.Fetch, names, u64, names, u64, st.integers(0, p.MAX_ENTRIES)),
    st.builds(p.Fault, names, u64, names, u64, st.booleans()),
    st.builds(p.Unmap, names, u64, names, u64, u32),
    st.builds(p.Flush, names, u64),
    st.builds(p.LeaseRenew, names, u64),
    st.builds(p.Hello, names, u64),
    st.builds(p.Ack, u64, st.booleans(), names),
    st.builds(p.ContainerFailure, names, u64, names, st.integers(0, 2**16 - 1), names),
    st.builds(p.Registered, u64, seconds),
    st.builds(
        p.VDiskInfo,
        names,
        st.integers(0, 2**40),
        st.sampled_from([4096, 1 << 16, 1 << 20]),
        st.booleans(),
        st.lists(containers, max_size=3).map(tuple),
        names,
    ),
    st.builds(p.TableRange, names, u64, entries),
    st.builds(p.FaultReply, names, u64, u64),
    st.builds(p.LeaseGrant, seconds),
    st.just(p.Done()),
    st.builds(p.Refused, st.integers(0, 2**16 - 1), names),
    st.builds(p.SetState, u64, names, u64, u64, states),
    st.builds(p.Block, u64, names),
    st.builds(p.Unblock, u64, names),
    st.builds(_update, u64, names, st.lists(st.tuples(u64, u64), max_size=20)),
    st.builds(p.MarkShared, u64, names),
    st.builds(p.Delay, u64, names, seconds),
    st.builds(p.CancelDelay, u64, names),
    st.builds(p.DropVDisk, u64, names),
    st.builds(p.Resize, u64, names, u64),
    st.builds(p.SoftThreshold, u64, names),
    st.builds(p.Exclusive, names, u64, names, u64, st.integers(1, p.MAX_ENTRIES)),
    st.builds(p.EndExclusive, names, u64, names),
    st.builds(p.Solo, u64, names, st.booleans()),
    st.builds(p.FreezeShared, u64, names, freezes),
)


@given(messages)
def test_every_message_round_trips_exactly(msg: p.Message) -> None:
    raw = p.encode(msg)
    assert raw[0] == p.VERSION and raw[1] == msg.TYPE
    assert p.decode(raw) == msg


def decodes_or_refuses(data: bytes) -> None:
    """Only ProtocolError (one line), or a message that is exactly what it encodes to."""
    try:
        msg = p.decode(data)
    except errors.ProtocolError as e:
        assert one_line(str(e)), str(e)
        return
    assert p.encode(msg) == data  # what decodes is a well-formed message, byte for byte


@fuzz_settings(2000)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@fuzz_settings(2000)
@given(st.sampled_from(sorted(p._TYPES)), st.binary(max_size=300))
def test_a_known_header_over_arbitrary_bytes_only_raises_protocol_error(
    code: int, body: bytes
) -> None:
    """Past the header: every message type's field decoders meet random bytes."""
    decodes_or_refuses(bytes([p.VERSION, code]) + body)


mutation = st.tuples(
    st.sampled_from(["flip", "set", "cut", "extend", "insert", "delete"]),
    st.integers(0, 2**16),
    st.binary(min_size=1, max_size=9),
)


@fuzz_settings(1500)
@given(messages, st.lists(mutation, min_size=1, max_size=4))
def test_damaged_messages_only_ever_raise_protocol_error(
    msg: p.Message, damage: list[tuple[str, int, bytes]]
) -> None:
    raw = bytearray(p.encode(msg))
    for how, where, data in damage:
        i = where % max(1, len(raw))
        if how == "flip" and raw:
            raw[i] ^= data[0] or 1
        elif how == "set" and raw:
            raw[i : i + len(data)] = data[: len(raw) - i]  # e.g. a length field made huge
        elif how == "cut":
            del raw[i:]
        elif how == "extend":
            raw += data
        elif how == "insert":
            raw[i:i] = data
        elif how == "delete":
            del raw[i : i + len(data)]
    decodes_or_refuses(bytes(raw))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter than its header"),
        (bytes([9, 1]), "version 9"),
        (bytes([p.VERSION, 200]), "unknown message type 200"),
        (p.encode(p.Done()) + b"x", "trailing"),
        (p.encode(p.Flush("a", 1))[:-1], "truncated"),
        (bytes([p.VERSION, p.Hello.TYPE, 2, 0]) + b"\xff\xfe" + bytes(8), "UTF-8"),
        (bytes([p.VERSION, p.SetState.TYPE]) + bytes(8) + b"\0\0" + bytes(16) + b"\x07", "state"),
        (bytes([p.VERSION, p.Ack.TYPE]) + bytes(8) + b"\x02\0\0", "not a boolean"),
        (bytes([p.VERSION, p.LeaseGrant.TYPE]) + b"\0\0\0\0\0\0\xf8\x7f", "finite"),
        (bytes([p.VERSION, p.TableRange.TYPE]) + bytes(10) + b"\xff\xff\xff\xff", "entries"),
    ],
)
def test_malformed_messages_say_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(errors.ProtocolError, match=why):
        p.decode(data)


def test_update_lengths_must_agree_both_ways() -> None:
    bad = p.Update(1, "v", array("Q", [1, 2]), array("Q", [3]))
    with pytest.raises(errors.ProtocolError, match="numbers of indexes"):
        p.encode(bad)
    raw = bytes([p.VERSION, p.Update.TYPE]) + bytes(8) + b"\x01\0v"
    raw += (2).to_bytes(4, "little") + bytes(16) + (1).to_bytes(4, "little") + bytes(8)
    with pytest.raises(errors.ProtocolError, match="numbers of indexes"):
        p.decode(raw)


def test_an_exclusive_hold_covers_at_least_one_entry_both_ways() -> None:
    with pytest.raises(errors.ProtocolError, match="Exclusive of 0 entries"):
        p.encode(p.Exclusive("a", 1, "v", 0, 0))
    raw = bytes([p.VERSION, p.Exclusive.TYPE]) + b"\x01\0a" + bytes(8) + b"\x01\0v" + bytes(12)
    with pytest.raises(errors.ProtocolError, match="Exclusive of 0 entries"):
        p.decode(raw)
    assert p.decode(raw[:-4] + (5).to_bytes(4, "little")) == p.Exclusive("a", 0, "v", 0, 5)


def test_a_live_copy_freeze_freezes_both_ways() -> None:
    with pytest.raises(errors.ProtocolError, match="not NORMAL"):
        p.encode(p.FreezeShared(1, "v", t.NORMAL))
    raw = bytes([p.VERSION, p.FreezeShared.TYPE]) + bytes(8) + b"\x01\0v" + bytes([t.NORMAL])
    with pytest.raises(errors.ProtocolError, match="not NORMAL"):
        p.decode(raw)
    assert p.decode(raw[:-1] + bytes([t.INVALID])) == p.FreezeShared(0, "v", t.INVALID)


def test_encode_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(errors.ProtocolError, match="integer"):
        p.encode(p.Fault("a", -1, "v", 0, False))
    with pytest.raises(errors.ProtocolError, match="seconds"):
        p.encode(p.Delay(1, "v", float("nan")))
    with pytest.raises(errors.ProtocolError, match="longer"):
        p.encode(p.Hello("x" * 5000, 1))


def test_decode_as_names_what_it_expected() -> None:
    with pytest.raises(errors.ProtocolError, match="expected Ack"):
        p.decode_as(p.encode(p.Done()), p.Ack)


def test_errors_cross_the_wire_as_their_own_class() -> None:
    for cls in (errors.PoolFull, errors.SessionLost, errors.ControllerUnreachable, errors.NotFound):
        reply = p.decode_as(p.encode(p.refusal(cls("why not"))), p.Refused)
        with pytest.raises(cls, match="why not"):
            p.raise_refused(reply)
    with pytest.raises(errors.TargetvirtError, match="future"):
        p.raise_refused(p.Refused(999, "future error"))


def test_table_ranges_are_packed_entries() -> None:
    values = array("Q", [t.pack(1, 5) | t.SHARED, 0, t.INVALID_BIT])
    raw = p.encode(p.TableRange("v", 7, values))
    assert raw.endswith(values.tobytes())
