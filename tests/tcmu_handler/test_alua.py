"""The configfs reader of ALUA groups, against a fake configfs laid out as 6.1 lays it out.

Every file holds the bytes the kernel's show function prints (named beside each writer),
for the ceph-iscsi layout on gateway A of two: one target IQN, TPG 1 (gateway A, enabled
here) and TPG 2 (gateway B, disabled here), each mapping the vdisk as lun_0, each LUN in a
user-defined group ("ao" id 1, "ano1" id 2).
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.clock import FakeClock
from targetvirt.errors import AluaConfigError
from tcmu_handler import alua, netlink, service, uio
from tcmu_handler.scsi import LunState, RamBackend, handle
from tcmu_handler.scsi import alua as model
from tests.fuzzing import fuzz_settings, one_line

IQN = "iqn.2003-01.com.redhat.iscsi-gw:ceph-igw"
HBA, NAME = 3, "gw_disk"
ALL_STATES = {
    "transitioning": 1, "offline": 1, "lba_dependent": 0, "unavailable": 1,
    "standby": 1, "active_optimized": 1, "active_nonoptimized": 1,
}  # fmt: skip


def put(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


class Tree:
    """A fake ``/sys/kernel/config`` holding one user backstore and its iSCSI ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.device = root / "target" / "core" / f"user_{HBA}" / NAME
        self.group("default_tg_pt_gp", 0, members=[])  # made with the device

    def group(
        self,
        name: str,
        gid: int | None,
        *,
        state: int = 0,
        status: str = "None",
        access: str = "Implicit and Explicit",
        preferred: int = 0,
        trans_secs: int = 0,
        supported: dict[str, int] = ALL_STATES,
        members: list[str],
    ) -> Path:
        g = self.device / "alua" / name
        # target_tg_pt_gp_tg_pt_gp_id_show: "%hu\n", nothing while the id is not valid
        put(g / "tg_pt_gp_id", "" if gid is None else f"{gid}\n")
        put(g / "alua_access_state", f"{state}\n")  # ..._alua_access_state_show: "%d\n"
        put(g / "alua_access_status", f"{status}\n")  # core_alua_dump_status + "\n"
        put(g / "alua_access_type", f"{access}\n")  # core_alua_show_access_type
        for state_name, bit in supported.items():  # ALUA_SUPPORTED_STATE_ATTR: "%d\n"
            put(g / f"alua_support_{state_name}", f"{bit}\n")
        put(g / "alua_write_metadata", "0\n")
        put(g / "nonop_delay_msecs", "100\n")  # core_alua_show_nonop_delay_msecs
        put(g / "trans_delay_msecs", "0\n")
        put(g / "implicit_trans_secs", f"{trans_secs}\n")
        put(g / "preferred", f"{preferred}\n")  # core_alua_show_preferred_bit
        # target_tg_pt_gp_members_show: each line is copied with snprintf's NUL
        put(g / "members", b"".join(m.encode() + b"\n\0" for m in members))
        return g

    def port(self, tag: int, rtpi: int, *, enabled: int, fabric: str = "iscsi") -> str:
        tpg = self.root / "target" / fabric / IQN / f"tpgt_{tag}"
        put(tpg / "enable", f"{enabled}\n")  # target_fabric_tpg_base_enable_show: "%d\n"
        stats = tpg / "lun" / "lun_0" / "statistics"
        put(stats / "scsi_port" / "indx", f"{rtpi}\n")  # target_stat_port_indx_show: "%u\n"
        put(stats / "scsi_transport" / "proto_id", "5\n")  # ..._transport_proto_id_show
        return f"iSCSI/{IQN}/tpgt_{tag}/lun_0"  # the fabric ops name, not the folder's

    def two_gateways(self, *, local_state: int = 0) -> None:
        a = self.port(1, 1, enabled=1)
        b = self.port(2, 2, enabled=0)
        self.group("ao", 1, state=local_state, status="Altered by Implicit ALUA",
                   access="Implicit", preferred=1, members=[a])  # fmt: skip
        self.group("ano1", 2, state=1, status="Altered by Implicit ALUA", access="Implicit",
                   members=[b])  # fmt: skip

    def read(self) -> model.AluaConfig:
        return alua.read_alua(self.device, self.root / "target")


def group(config: model.AluaConfig, name: str = "ao") -> model.PortGroup:
    (found,) = (g for g in config.groups if g.name == name)
    return found


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# --- reading -------------------------------------------------------------------------------


def test_two_gateways(tree: Tree) -> None:
    tree.two_gateways()
    config = tree.read()
    default, ao, ano = config.groups
    assert (default.id, default.ports, default.user_defined) == (0, (), False)
    assert ao == model.PortGroup(
        1, model.ACTIVE_OPTIMIZED, model.DEFAULT_SUPPORTED,
        model.STATUS_ALTERED_BY_IMPLICIT_ALUA, True, model.TPGS_IMPLICIT, 0,
        (model.TargetPort(1, True, 5, f"iSCSI/{IQN}/tpgt_1/lun_0"),), "ao",
    )  # fmt: skip
    assert (ano.id, ano.state, ano.preferred, ano.name) == (2, 1, False, "ano1")
    assert ano.ports == (model.TargetPort(2, False, 5, f"iSCSI/{IQN}/tpgt_2/lun_0"),)
    assert config.local == (ao, ao.ports[0]) and config.tpgs == model.TPGS_IMPLICIT


def test_a_new_device_has_no_alua(tree: Tree) -> None:
    assert tree.read() == model.NO_ALUA  # only default_tg_pt_gp


def test_a_single_gateway_lun_costs_one_listdir(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reads(path: Path) -> str:
        raise AssertionError(f"{path} read for a LUN with only the default group")

    monkeypatch.setattr(alua, "_read", no_reads)
    assert tree.read() == model.NO_ALUA


def test_no_alua_folder_is_no_alua(tmp_path: Path) -> None:
    assert alua.read_alua(tmp_path / "gone", tmp_path) == model.NO_ALUA


def test_the_default_group_is_reported_with_its_ports(tree: Tree) -> None:
    tree.two_gateways()
    stray = tree.port(3, 3, enabled=0)
    tree.group("default_tg_pt_gp", 0, members=[stray])
    assert [g.id for g in tree.read().groups] == [0, 1, 2]


@pytest.mark.parametrize(
    ("access", "bits"),
    [("None", 0), ("Implicit", 0x10), ("Explicit", 0x20), ("Implicit and Explicit", 0x30)],
)
def test_access_types(tree: Tree, access: str, bits: int) -> None:
    tree.group("ao", 1, access=access, members=[tree.port(1, 1, enabled=1)])
    assert group(tree.read()).access_type == bits


@pytest.mark.parametrize(
    ("status", "code"),
    [("None", 0), ("Altered by Explicit STPG", 1), ("Altered by Implicit ALUA", 2)],
)
def test_statuses(tree: Tree, status: str, code: int) -> None:
    tree.group("ao", 1, status=status, members=[tree.port(1, 1, enabled=1)])
    assert group(tree.read()).status == code


@pytest.mark.parametrize("state", sorted(model.STATES))
def test_every_state_the_kernel_writes(tree: Tree, state: int) -> None:
    tree.group("ao", 1, state=state, members=[tree.port(1, 1, enabled=1)])
    assert group(tree.read()).state == state


def test_supported_state_bits(tree: Tree) -> None:
    only = dict.fromkeys(ALL_STATES, 0) | {"standby": 1, "active_optimized": 1}
    tree.group("ao", 1, supported=only, members=[tree.port(1, 1, enabled=1)])
    assert group(tree.read()).supported == model.S_SUP | model.AO_SUP


def test_ports_in_rtpi_order_and_the_enable_file(tree: Tree) -> None:
    members = [tree.port(4, 9, enabled=0), tree.port(5, 3, enabled=1)]
    tree.group("ao", 1, members=members)
    ports = group(tree.read()).ports
    assert [(p.rtpi, p.enabled) for p in ports] == [(3, True), (9, False)]


def test_a_fabric_without_enable_attribute_is_enabled(tree: Tree) -> None:
    member = tree.port(1, 1, enabled=0, fabric="loopback").replace("iSCSI", "loopback")
    (tree.root / "target" / "loopback" / IQN / "tpgt_1" / "enable").unlink()
    tree.group("ao", 1, members=[member])
    assert group(tree.read()).ports[0].enabled


def test_group_without_id_yet_is_left_out(tree: Tree) -> None:
    tree.two_gateways()
    tree.group("being_made", None, members=[])
    assert [g.name for g in tree.read().groups] == ["default_tg_pt_gp", "ao", "ano1"]


def test_port_whose_lun_is_being_removed_is_left_out(tree: Tree) -> None:
    tree.two_gateways()
    stats = tree.root / "target" / "iscsi" / IQN / "tpgt_2" / "lun" / "lun_0" / "statistics"
    (stats / "scsi_port" / "indx").unlink()
    assert group(tree.read(), "ano1").ports == ()


def test_group_removed_while_read_is_left_out(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.two_gateways()
    real = alua._read

    def vanish(path: Path) -> str:  # rmdir of ano1 lands between listdir and the reads
        if path.parent.name == "ano1":
            for f in path.parent.iterdir():
                f.unlink()
            path.parent.rmdir()
        return real(path)

    monkeypatch.setattr(alua, "_read", vanish)
    assert [g.name for g in tree.read().groups] == ["default_tg_pt_gp", "ao"]


# --- damaged contents ------------------------------------------------------------------------


def damage(tree: Tree, file: str, data: bytes) -> None:
    put(tree.device / "alua" / "ao" / file, data)


@pytest.mark.parametrize(
    ("file", "data"),
    [
        ("alua_access_state", b"5\n"),  # not a state
        ("alua_access_state", b"abc\n"),
        ("alua_access_state", b"\n"),
        ("alua_access_status", b"Unknown\n"),
        ("alua_access_type", b"Sometimes\n"),
        ("alua_support_standby", b"2\n"),
        ("preferred", b"-1\n"),
        ("implicit_trans_secs", b"256\n"),
        ("tg_pt_gp_id", b"65536\n"),
        ("members", b"iSCSI/only-two-parts\n\0"),
        ("members", b"iSCSI/" + IQN.encode() + b"/tpgt_x/lun_0\n\0"),
        ("alua_access_type", b"\xff\xfe\n"),
    ],
)
def test_damage_is_a_one_line_error(tree: Tree, file: str, data: bytes) -> None:
    tree.two_gateways()
    damage(tree, file, data)
    with pytest.raises(AluaConfigError) as e:
        tree.read()
    assert one_line(str(e.value)) and "ao" in str(e.value)


def test_a_missing_attribute_of_a_present_group_is_an_error(tree: Tree) -> None:
    tree.two_gateways()
    (tree.device / "alua" / "ao" / "preferred").unlink()
    with pytest.raises(AluaConfigError, match="lacks an attribute"):
        tree.read()


def test_rtpi_zero_is_an_error(tree: Tree) -> None:
    tree.two_gateways()
    stats = tree.root / "target" / "iscsi" / IQN / "tpgt_1" / "lun" / "lun_0" / "statistics"
    put(stats / "scsi_port" / "indx", "0\n")
    with pytest.raises(AluaConfigError, match="relative target port"):
        tree.read()


def test_duplicate_ids_are_an_error(tree: Tree) -> None:
    tree.two_gateways()
    tree.group("copy", 2, members=[])
    with pytest.raises(AluaConfigError, match="share id 2"):
        tree.read()


def test_unreadable_alua_folder_is_an_error(tree: Tree) -> None:
    if os.geteuid() == 0:
        # root reads through mode bits: make the folder a file instead (ENOTDIR)
        alua_dir = tree.device / "alua"
        for g in alua_dir.iterdir():
            for f in g.iterdir():
                f.unlink()
            g.rmdir()
        alua_dir.rmdir()
        alua_dir.write_text("")
    else:
        (tree.device / "alua").chmod(0)
    with pytest.raises(AluaConfigError, match="cannot list"):
        tree.read()


@fuzz_settings(200)
@given(
    st.sampled_from(["alua_access_state", "alua_access_status", "alua_access_type",
                     "tg_pt_gp_id", "preferred", "members", "alua_support_offline",
                     "implicit_trans_secs"]),
    st.binary(max_size=64),
)  # fmt: skip
def test_hostile_contents_never_raise_anything_else(file: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        tree = Tree(Path(d))
        tree.two_gateways()
        damage(tree, file, data)
        try:
            config = tree.read()
        except AluaConfigError as e:
            assert one_line(str(e))
        else:
            assert isinstance(config, model.AluaConfig)


# --- the provider ----------------------------------------------------------------------------


def provider(tree: Tree, clock: FakeClock) -> alua.ConfigfsAlua:
    return alua.ConfigfsAlua(tree.root, HBA, NAME, clock=clock, max_age=1.0)


def set_state(tree: Tree, state: int) -> None:
    put(tree.device / "alua" / "ao" / "alua_access_state", f"{state}\n")


def test_fresh_reads_always_stale_ones_after_max_age(tree: Tree) -> None:
    tree.two_gateways()
    clock = FakeClock()
    p = provider(tree, clock)
    assert group(p.snapshot(fresh=False)).state == model.ACTIVE_OPTIMIZED
    set_state(tree, model.STANDBY)  # the controller flips the local group
    assert group(p.snapshot(fresh=False)).state == model.ACTIVE_OPTIMIZED  # cached
    assert group(p.snapshot(fresh=True)).state == model.STANDBY
    set_state(tree, model.TRANSITIONING)
    clock.advance(1.0)
    assert group(p.snapshot(fresh=False)).state == model.TRANSITIONING


def test_damage_keeps_the_last_good_view_and_logs_once(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    tree.two_gateways()
    p = provider(tree, FakeClock())
    good = p.snapshot(fresh=True)
    damage(tree, "alua_access_state", b"garbage\n")
    with caplog.at_level(logging.INFO, logger="tcmu_handler.alua"):
        assert p.snapshot(fresh=True) == good
        assert p.snapshot(fresh=True) == good
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "garbage" in warnings[0].getMessage()
        assert all(r.exc_info is None for r in caplog.records)  # no traceback
        set_state(tree, model.STANDBY)
        assert group(p.snapshot(fresh=True)).state == model.STANDBY
        assert "readable again" in caplog.records[-1].getMessage()


def test_damage_before_any_good_read_is_no_alua(tree: Tree) -> None:
    tree.two_gateways()
    damage(tree, "members", b"nonsense\n\0")
    assert provider(tree, FakeClock()).snapshot(fresh=True) == model.NO_ALUA


def test_attach_keeps_a_provider_the_caller_chose(tree: Tree) -> None:
    lun = LunState(num_blocks=8)
    alua.attach(lun, tree.root, HBA, NAME)
    assert isinstance(lun.alua, alua.ConfigfsAlua) and lun.alua.device == tree.device
    chosen = lun.alua = alua.ConfigfsAlua(tree.root, 9, "other")
    alua.attach(lun, tree.root, HBA, NAME)
    assert lun.alua is chosen


# --- end to end: configfs to RTPG bytes ------------------------------------------------------


def run(lun: LunState, cdb: str, in_len: int = 256) -> bytes:
    buf = bytearray(in_len)
    done = handle(lun, bytes.fromhex(cdb), [], [memoryview(buf)], RamBackend(8 * 512, 512))
    assert done.status == 0, done
    return bytes(buf[: in_len if done.read_len is None else done.read_len])


def test_configfs_to_the_wire(tree: Tree) -> None:
    tree.two_gateways()
    lun = LunState(num_blocks=8)
    alua.attach(lun, tree.root, HBA, NAME)
    assert run(lun, "120000006000", 96)[5] == 0x18
    assert run(lun, "a30a00000000000001000000") == bytes.fromhex(
        "00000018" "80cf000100020001" "00000001" "01cf000200020001" "00000002"
    )  # fmt: skip
    assert run(lun, "120183010000").endswith(bytes.fromhex("51940004000000015195000400000001"))
    # the controller makes gateway B preferred: RTPG shows it at once
    set_state(tree, model.ACTIVE_NON_OPTIMIZED)
    put(tree.device / "alua" / "ano1" / "alua_access_state", "0\n")
    data = run(lun, "a30a00000000000001000000")
    assert (data[4], data[16]) == (0x80 | model.ACTIVE_NON_OPTIMIZED, model.ACTIVE_OPTIMIZED)
    assert struct.unpack(">H", data[18:20])[0] == 2


# --- wiring: every LUN the service serves reads its own device's groups ---------------------


def test_the_service_gives_each_lun_its_devices_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysfs, configfs = tmp_path / "sys", tmp_path / "cfg"
    put(sysfs / "uio0" / "name", f"tcm-user/{HBA}/{NAME}/targetvirt/db\n")
    put(sysfs / "uio0" / "maps" / "map0" / "size", "0x0000000040800000\n")
    Tree(configfs).two_gateways()
    info = (
        "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 128\n"
        "        Config: targetvirt/db Size: 4096 MaxDataAreaMB: 1024 DataPagesPerBlk: 1\n"
    )
    put(configfs / "target" / "core" / f"user_{HBA}" / NAME / "info", info)
    opened: list[LunState] = []

    def open_lun(cfg: object, info: object) -> tuple[RamBackend, LunState]:
        opened.append(LunState(num_blocks=8))
        return RamBackend(4096, 512), opened[-1]

    def no_ring(*args: object, **kw: object) -> None:
        raise OSError(5, "stop before the ring: the LUN is what is looked at")

    monkeypatch.setattr(uio, "attach", no_ring)
    tcmu = service.TcmuService(open_lun, sysfs_root=sysfs, configfs_root=configfs)  # type: ignore[arg-type]
    added = netlink.DeviceEvent(
        netlink.TcmuCmd.ADDED_DEVICE, f"tcm-user/{HBA}/{NAME}/targetvirt/db", 0, 7
    )
    tcmu._answer(added)
    (lun,) = opened
    assert isinstance(lun.alua, alua.ConfigfsAlua)
    assert lun.alua_config(fresh=True).tpgs == model.TPGS_IMPLICIT
