"""ALUA in the SCSI emulation: INQUIRY TPGS, VPD 83h port designators, REPORT TARGET PORT
GROUPS, REPORT SUPPORTED OPERATION CODES, SET TARGET PORT GROUPS (refused).

The groups are the layout ceph-iscsi builds on gateway A of two: the LUN in TPG 1 (group
"ao", id 1, enabled here) and in TPG 2 (group "ano1", id 2, gateway B's, disabled here).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.errors import InvalidArgument
from tcmu_handler.scsi import Kind, classify
from tcmu_handler.scsi import alua as model
from tcmu_handler.scsi import opcodes as op
from tests.fuzzing import fuzz_settings

from .helpers import INVALID_FIELD_IN_CDB, INVALID_OPCODE, Device, cdb10

IQN = "iqn.2003-01.com.redhat.iscsi-gw:ceph-igw"


class StaticAlua:
    """An AluaProvider with a fixed answer; counts the fresh reads asked for."""

    def __init__(self, config: model.AluaConfig) -> None:
        self.config = config
        self.fresh_reads = 0

    def snapshot(self, *, fresh: bool) -> model.AluaConfig:
        self.fresh_reads += fresh
        return self.config


def port(rtpi: int, enabled: bool, tag: int) -> model.TargetPort:
    return model.TargetPort(rtpi, enabled, model.PROTOCOL_ISCSI, f"iSCSI/{IQN}/tpgt_{tag}/lun_0")


def two_gateways(
    local_state: int = model.ACTIVE_OPTIMIZED, implicit_trans_secs: int = 0
) -> model.AluaConfig:
    ao = model.PortGroup(
        1,
        local_state,
        status=model.STATUS_ALTERED_BY_IMPLICIT_ALUA,
        preferred=True,
        access_type=model.TPGS_IMPLICIT,
        implicit_trans_secs=implicit_trans_secs,
        ports=(port(1, True, 1),),
        name="ao",
    )
    ano = model.PortGroup(
        2,
        model.ACTIVE_NON_OPTIMIZED,
        status=model.STATUS_ALTERED_BY_IMPLICIT_ALUA,
        access_type=model.TPGS_IMPLICIT,
        ports=(port(2, False, 2),),
        name="ano1",
    )
    return model.AluaConfig((ao, ano))


@pytest.fixture
def plain() -> Device:
    return Device(num_blocks=4096)


@pytest.fixture
def gw() -> Device:
    dev = Device(num_blocks=4096)
    dev.lun.alua = StaticAlua(two_gateways())
    return dev


def rtpg(alloc: int, extended: bool = False) -> bytes:
    return struct.pack(">BB4xIBB", 0xA3, 0x2A if extended else 0x0A, alloc, 0, 0)


# The two groups: PREF|AO, supported T/O/U/S/AN/AO (CFh), id 1, status 02h (altered by
# implicit ALUA), one port (rtpi 1); then ANO, id 2, one port (rtpi 2).
GROUPS = bytes.fromhex("80cf0001000200010000000101cf00020002000100000002")
LENGTH_ONLY = bytes.fromhex("00000018") + GROUPS
EXTENDED = bytes.fromhex("0000001c10000000") + GROUPS


# --- INQUIRY -------------------------------------------------------------------------------


def test_standard_inquiry_reports_implicit_tpgs(gw: Device, plain: Device) -> None:
    cdb = bytes.fromhex("120000006000")
    assert gw.run(cdb, in_len=96).data[5] == 0x18  # 3PC | TPGS=01b
    assert plain.run(cdb, in_len=96).data[5] == 0x08  # unchanged without ALUA
    assert gw.run(cdb, in_len=96).data[:5] + gw.run(cdb, in_len=96).data[6:] == (
        plain.run(cdb, in_len=96).data[:5] + plain.run(cdb, in_len=96).data[6:]
    )


def test_explicit_access_type_still_reports_implicit_only(gw: Device) -> None:
    config = two_gateways()
    both = model.TPGS_IMPLICIT | model.TPGS_EXPLICIT
    groups = tuple(
        model.PortGroup(g.id, g.state, access_type=both, ports=g.ports, name=g.name)
        for g in config.groups
    )
    gw.lun.alua = StaticAlua(model.AluaConfig(groups))
    assert gw.run(bytes.fromhex("120000006000"), in_len=96).data[5] == 0x18


def test_vpd_83_adds_the_local_port_designators(gw: Device, plain: Device) -> None:
    cdb = bytes.fromhex("120183010000")
    lu = plain.run(cdb, in_len=256).data
    r = gw.run(cdb, in_len=256)
    ports = bytes.fromhex("5194000400000001" + "5195000400000001")  # rtpi 1, group 1
    assert r.data == lu[:2] + struct.pack(">H", len(lu) - 4 + 16) + lu[4:] + ports


def test_vpd_83_uses_the_enabled_port_whatever_its_group() -> None:
    # Seen from gateway B: its own TPG 2 (group 2, standby) is the enabled one.
    a = model.PortGroup(1, ports=(port(1, False, 1),), name="ao")
    b = model.PortGroup(2, model.STANDBY, ports=(port(2, True, 2),), name="standby1")
    dev = Device()
    dev.lun.alua = StaticAlua(model.AluaConfig((a, b)))
    data = dev.run(bytes.fromhex("120183010000"), in_len=256).data
    assert data.endswith(bytes.fromhex("5194000400000002" + "5195000400000002"))


# --- REPORT TARGET PORT GROUPS -------------------------------------------------------------


def test_rtpg_length_only_exact_bytes(gw: Device) -> None:
    r = gw.run(bytes.fromhex("a30a00000000000001000000"), in_len=256)
    assert r.good and r.data == LENGTH_ONLY


def test_rtpg_extended_header_exact_bytes(gw: Device) -> None:
    r = gw.run(bytes.fromhex("a32a00000000000001000000"), in_len=256)
    assert r.good and r.data == EXTENDED


def test_rtpg_extended_header_carries_the_local_implicit_transition_time(gw: Device) -> None:
    gw.lun.alua = StaticAlua(two_gateways(implicit_trans_secs=30))
    assert gw.run(rtpg(256, extended=True), in_len=256).data[4:6] == bytes((0x10, 30))


@pytest.mark.parametrize("alloc", [0, 1, 4, 10, 19, 27, 31, 32])
@pytest.mark.parametrize("extended", [False, True])
def test_rtpg_allocation_length_cuts_the_data(gw: Device, alloc: int, extended: bool) -> None:
    whole = EXTENDED if extended else LENGTH_ONLY
    r = gw.run(rtpg(alloc, extended), in_len=64)
    assert r.status == 0 and r.completion.sense == b""
    assert r.completion.read_len == min(alloc, len(whole))
    assert r.data == whole[:alloc]  # RETURN DATA LENGTH is not changed by the cut
    assert r.raw[len(r.data) :] == bytes([0xA5]) * (64 - len(r.data))


def test_rtpg_reports_every_state_port_and_leaves_out_empty_groups(gw: Device) -> None:
    groups = (
        model.PortGroup(0, ports=(), name=model.DEFAULT_GROUP),  # empty: left out
        model.PortGroup(
            7, model.TRANSITIONING, supported=model.T_SUP | model.AO_SUP, name="x",
            ports=(port(3, True, 3), port(9, True, 4), port(0xFFFF, False, 5)),
        ),
        model.PortGroup(0x1234, model.UNAVAILABLE, model.U_SUP, ports=(port(4, False, 6),),
                        name="y"),
    )  # fmt: skip
    gw.lun.alua = StaticAlua(model.AluaConfig(groups))
    r = gw.run(rtpg(512), in_len=512)
    assert r.data == bytes.fromhex(
        "00000020"
        "0f81000700000003" "00000003" "00000009" "0000ffff"
        "0308123400000001" "00000004"
    )  # fmt: skip


def test_rtpg_reads_fresh_and_runs_in_a_worker(gw: Device) -> None:
    provider = StaticAlua(two_gateways())
    gw.lun.alua = provider
    assert classify(rtpg(256)) is Kind.IO
    assert classify(rtpg(256, extended=True)) is Kind.IO
    gw.run(rtpg(256), in_len=256)
    gw.run(bytes.fromhex("120000006000"), in_len=96)
    assert provider.fresh_reads == 1  # INQUIRY may use a slightly older read


def test_rtpg_reserved_parameter_data_format(gw: Device) -> None:
    r = gw.run(bytes.fromhex("a34a00000000000001000000"), in_len=256)
    assert r.sense.triple == INVALID_FIELD_IN_CDB
    assert r.sense.sks == bytes((0xCF, 0, 1))  # CDB byte 1, bit 7


def test_rtpg_without_alua_is_not_supported_as_before(plain: Device) -> None:
    for cdb in (rtpg(256), rtpg(256, extended=True)):
        r = plain.run(cdb, in_len=256)
        assert r.sense.triple == INVALID_FIELD_IN_CDB
        assert r.sense.sks == bytes((0xCC, 0, 1))  # the SERVICE ACTION: not implemented


def test_user_groups_without_an_enabled_port_are_no_alua() -> None:
    dev = Device()
    config = model.AluaConfig((model.PortGroup(1, ports=(port(1, False, 1),), name="ao"),))
    dev.lun.alua = StaticAlua(config)
    assert not config.active
    assert dev.run(bytes.fromhex("120000006000"), in_len=96).data[5] == 0x08
    assert dev.run(rtpg(256), in_len=256).sense.triple == INVALID_FIELD_IN_CDB


def test_only_the_default_group_is_no_alua() -> None:
    config = model.AluaConfig(
        (model.PortGroup(0, ports=(port(1, True, 1),), name="default_tg_pt_gp"),)
    )
    assert config.local is None and config.tpgs == 0


def test_standby_is_fenced_by_the_kernel_not_here(gw: Device) -> None:
    """With alua_support=1 LIO answers NOT READY 04h/0Bh itself for a standby port
    (target_alua_state_check), so a command that reaches the handler was let through:
    the emulation serves it and RTPG reports the state."""
    gw.lun.alua = StaticAlua(two_gateways(local_state=model.STANDBY))
    gw.write(0, b"\x11" * 512)
    assert gw.read(0, 1) == b"\x11" * 512
    assert gw.run(rtpg(256), in_len=256).data[4] == 0x80 | model.STANDBY


# --- REPORT SUPPORTED OPERATION CODES and SET TARGET PORT GROUPS ---------------------------


def rsoc(option: int, opcode: int = 0, sa: int = 0, alloc: int = 4096) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, option, opcode, sa, alloc, 0, 0)


def test_rsoc_lists_rtpg_only_with_alua(gw: Device, plain: Device) -> None:
    descriptor = bytes.fromhex("a300000a0001000c")  # opcode, SA 0Ah, SERVACTV, CDB 12 bytes
    with_alua = gw.run(rsoc(0), in_len=4096).data
    without = plain.run(rsoc(0), in_len=4096).data
    assert struct.unpack(">I", with_alua[:4])[0] == 8 * (len(op.SUPPORTED) + 1)
    listed = [with_alua[i : i + 8] for i in range(4, len(with_alua), 8)]
    assert descriptor in listed
    assert descriptor not in [without[i : i + 8] for i in range(4, len(without), 8)]
    assert [d for d in listed if d != descriptor] == [
        without[i : i + 8] for i in range(4, len(without), 8)
    ]


def test_rsoc_one_command_rtpg(gw: Device, plain: Device) -> None:
    r = gw.run(rsoc(2, 0xA3, 0x0A), in_len=64)
    assert r.data == bytes.fromhex("0003000c" "a3ff00000000ffffffff0000")  # fmt: skip
    assert plain.run(rsoc(2, 0xA3, 0x0A), in_len=64).data == bytes((0, 1, 0, 0))


def test_set_target_port_groups_is_refused(gw: Device) -> None:
    stpg = bytes.fromhex("a40a00000000000000080000")
    body = bytes.fromhex("00000000" "00000001")  # fmt: skip  # make group 1 AO
    r = gw.run(stpg, body)
    assert r.sense.triple == INVALID_OPCODE
    assert gw.run(rsoc(1, 0xA4), in_len=64).data == bytes((0, 1, 0, 0))


# --- the model -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"id": 0x10000}, {"id": 1, "state": 5}, {"id": 1, "implicit_trans_secs": 256},
     {"id": 1, "ports": tuple(port(i, False, 1) for i in range(1, 257))}],
)  # fmt: skip
def test_port_group_refuses_values_rtpg_cannot_carry(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        model.PortGroup(**kw)  # type: ignore[arg-type]


def test_target_port_refuses_rtpi_zero() -> None:
    with pytest.raises(InvalidArgument):
        model.TargetPort(0)


# --- properties ----------------------------------------------------------------------------


@dataclass
class Decoded:
    extended: bool
    trans_secs: int
    groups: list[tuple[bool, int, int, int, int, tuple[int, ...]]]


def decode_rtpg(data: bytes) -> Decoded:
    """An independent reader of RTPG data, the way sg_rtpg walks it."""
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    extended = (data[4] >> 4) == 1 if len(data) > 4 else False
    pos, groups = (8 if extended else 4), []
    while pos < len(data):
        b0, supported, gid, status, count = struct.unpack_from(">BBHxBxB", data, pos)
        rtpis = tuple(struct.unpack_from(">2xH", data, pos + 8 + 4 * i)[0] for i in range(count))
        groups.append((bool(b0 & 0x80), b0 & 0x0F, supported, gid, status, rtpis))
        pos += 8 + 4 * count
    assert pos == len(data)
    return Decoded(extended, data[5] if extended else 0, groups)


ports_st = st.lists(
    st.builds(model.TargetPort, st.integers(1, 0xFFFF), st.booleans()), max_size=6
).map(tuple)
groups_st = st.lists(
    st.builds(
        model.PortGroup,
        id=st.integers(0, 0xFFFF),
        state=st.sampled_from(sorted(model.STATES)),
        supported=st.integers(0, 0xFF),
        status=st.sampled_from([0, 1, 2]),
        preferred=st.booleans(),
        implicit_trans_secs=st.integers(0, 255),
        ports=ports_st,
        name=st.sampled_from(["ao", "ano1", "standby2", model.DEFAULT_GROUP]),
    ),
    max_size=5,
    unique_by=lambda g: g.id,
).map(lambda gs: model.AluaConfig(tuple(sorted(gs, key=lambda g: g.id))))


@fuzz_settings(300)
@given(groups_st, st.booleans())
def test_rtpg_round_trips(config: model.AluaConfig, extended: bool) -> None:
    decoded = decode_rtpg(model.encode_rtpg(config, extended=extended))
    expected = [
        (g.preferred, g.state, g.supported, g.id, g.status, tuple(p.rtpi for p in g.ports))
        for g in config.groups
        if g.ports
    ]
    assert decoded.groups == expected and decoded.extended == extended
    local = config.local
    assert decoded.trans_secs == (local[0].implicit_trans_secs if extended and local else 0)


@fuzz_settings(300)
@given(groups_st, st.integers(0, 300), st.booleans(), st.integers(0, 3))
def test_rtpg_never_overruns_the_allocation_length(
    config: model.AluaConfig, alloc: int, extended: bool, split: int
) -> None:
    dev = Device(num_blocks=8)
    dev.lun.alua = StaticAlua(config)
    in_len = 128
    r = dev.run(rtpg(alloc, extended), in_len=in_len, split=split * 7)
    if not config.active:
        assert r.sense.triple == INVALID_FIELD_IN_CDB
        return
    whole = model.encode_rtpg(config, extended=extended)
    sent = min(alloc, len(whole), in_len)
    assert r.status == 0
    assert r.data == whole[:sent]
    assert r.raw[sent:] == bytes([0xA5]) * (in_len - sent)


def test_read_is_still_the_fast_path(gw: Device) -> None:
    assert classify(cdb10(0x28, 0, 1)) is Kind.IO
    assert gw.run(cdb10(0x28, 0, 1), in_len=512).good
