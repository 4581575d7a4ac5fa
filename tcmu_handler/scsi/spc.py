"""SPC-4 commands every LUN answers: INQUIRY and its VPD pages, REQUEST SENSE,
REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS (with ALUA: scsi/alua.py),
TEST UNIT READY and a few small ones.

Replies are built whole and cut to the allocation length by ``respond``, which also
reports the exact length sent, so no byte of the data-in buffer is left stale.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from targetvirt.errors import ScsiError, invalid_field_in_cdb
from tcmu_handler.scsi import alua, xcopy
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.backend import BlockBackend
from tcmu_handler.scsi.common import COMPLETED, Completion, respond
from tcmu_handler.scsi.lun import LunState

Buffers = Sequence[memoryview]

# Version descriptors (SPC-4 table 144): SAM-5, SPC-4, SBC-3. SBC-3 (04C0h) is the one
# libiscsi looks for before it holds a LUN to SBC-3 rules (Block Limits page of 3Ch).
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)
STANDARD_INQUIRY_LEN = 96
SUPPORTED_VPD = (0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2)


def _pad(text: str, width: int) -> bytes:
    return text.encode("ascii").ljust(width, b" ")


def standard_inquiry(lun: LunState) -> bytes:
    data = bytearray(STANDARD_INQUIRY_LEN)
    data[0] = 0x00  # peripheral qualifier 0, direct-access block device
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = STANDARD_INQUIRY_LEN - 5
    data[5] = 0x08  # 3PC: EXTENDED COPY is supported (VMware looks here for "full copy")
    data[5] |= lun.alua_config().tpgs  # TPGS: 01b while the LUN reports ALUA
    data[7] = 0x02  # CMDQUE
    data[8:16] = _pad(lun.vendor, 8)
    data[16:32] = _pad(lun.product, 16)
    data[32:36] = _pad(lun.revision, 4)
    for i, descriptor in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * i, descriptor)
    return bytes(data)


def _vpd(page: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, page, len(body)) + body


def vpd_supported(lun: LunState) -> bytes:
    return _vpd(0x00, bytes(SUPPORTED_VPD))


def vpd_serial(lun: LunState) -> bytes:
    return _vpd(0x80, lun.serial.encode("ascii"))


def vpd_device_identification(lun: LunState) -> bytes:
    # With ALUA, the local target port's designators follow the logical unit's: Linux's
    # scsi_dh_alua and multipath's alua prioritizer find the path's group here.
    ports = alua.port_designators(lun.alua_config())
    return _vpd(0x83, b"".join(lun.designators()) + ports)


def vpd_block_limits(lun: LunState) -> bytes:
    body = bytearray(0x3C)
    body[0] = 0x00  # WSNZ=0: WRITE SAME with 0 blocks writes up to the end of the LUN
    body[1] = min(lun.max_compare_and_write_length, 0xFF)
    struct.pack_into(">H", body, 2, 1 << lun.physical_block_exponent)
    struct.pack_into(">I", body, 4, lun.max_transfer_length)
    struct.pack_into(">I", body, 8, lun.optimal_transfer_length)
    if lun.lbpu:
        struct.pack_into(">I", body, 16, lun.max_unmap_lba_count)
        struct.pack_into(">I", body, 20, lun.max_unmap_descriptors)
    struct.pack_into(">I", body, 24, lun.unmap_granularity)
    struct.pack_into(">I", body, 28, 0x80000000 | lun.unmap_granularity_alignment)  # UGAVALID
    struct.pack_into(">Q", body, 32, lun.max_write_same_length)
    return _vpd(0xB0, bytes(body))


def vpd_block_characteristics(lun: LunState) -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, lun.rotation_rate)
    # WABEREQ=01b, WACEREQ=01b: reads after a SANITIZE erase succeed (and read zeros).
    body[3] = 0x50
    body[4] = 0x01  # VBULS: VERIFY with BYTCHK compares unmapped LBAs (as zeros)
    return _vpd(0xB1, bytes(body))


def vpd_provisioning(lun: LunState) -> bytes:
    flags = (
        (0x80 if lun.lbpu else 0)
        | (0x40 if lun.lbpws else 0)
        | (0x20 if lun.lbpws10 else 0)
        | (0x04 if lun.lbprz else 0)
    )
    return _vpd(0xB2, bytes((lun.threshold_exponent, flags, lun.provisioning_type & 0x07, 0)))


VPD_PAGES: dict[int, Callable[[LunState], bytes]] = {
    0x00: vpd_supported,
    0x80: vpd_serial,
    0x83: vpd_device_identification,
    0x8F: xcopy.vpd_third_party_copy,
    0xB0: vpd_block_limits,
    0xB1: vpd_block_characteristics,
    0xB2: vpd_provisioning,
}


def inquiry(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    if cdb[1] & 0x02:
        raise invalid_field_in_cdb(1, 1, "CMDDT is obsolete")
    page, alloc = cdb[2], (cdb[3] << 8) | cdb[4]
    if not cdb[1] & 0x01:
        if page:
            raise invalid_field_in_cdb(2, 7, "a page code needs EVPD")
        return respond(standard_inquiry(lun), alloc, data_in)
    build = VPD_PAGES.get(page)
    if build is None:
        raise invalid_field_in_cdb(2, 7, f"VPD page {page:#04x} is not supported")
    return respond(build(lun), alloc, data_in)


def test_unit_ready(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    return COMPLETED


def request_sense(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    """The pending sense: a unit attention (which this clears), a long operation's
    progress, or NO SENSE. DESC asks for descriptor format."""
    descriptor = bool(cdb[1] & 0x01)
    ua = lun.take_unit_attention()
    current = lun.operation
    if ua is not None:
        data = sn.build(ua, descriptor=descriptor)
    elif current is not None:
        data = sn.build(current[0], sks=sn.progress_sks(current[1]), descriptor=descriptor)
    else:
        data = sn.build(sn.NO_ADDITIONAL_SENSE, descriptor=descriptor)
    return respond(data, cdb[4], data_in)


def prevent_allow(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    # SPC-4 6.16: a LUN that cannot lock its medium only accepts PREVENT=00b.
    if cdb[4] & 0x03:
        raise invalid_field_in_cdb(4, 1, "the medium is not removable")
    return COMPLETED


def send_diagnostic(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    """The default self-test (SELFTEST=1) passes; there are no diagnostic pages."""
    if cdb[1] & 0xE0:
        raise invalid_field_in_cdb(1, 7, "only the default self-test is supported")
    if cdb[3] or cdb[4]:
        raise invalid_field_in_cdb(3, 7, "there are no diagnostic pages")
    return COMPLETED


# --- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------


def _timeouts(info: op.CommandInfo) -> bytes:
    # Command timeouts descriptor: length 0Ah, nominal 0 (unspecified), recommended.
    return struct.pack(">HBBII", 0x0A, 0, 0, 0, info.timeout)


def _all_commands(commands: tuple[op.CommandInfo, ...], rctd: bool) -> bytes:
    body = bytearray()
    for info in commands:
        servactv = info.service_action is not None
        flags = (0x02 if rctd else 0) | (0x01 if servactv else 0)
        body += struct.pack(
            ">BxHxBH", info.opcode, info.service_action or 0, flags, len(info.usage)
        )
        if rctd:
            body += _timeouts(info)
    return struct.pack(">I", len(body)) + bytes(body)


def _one_command(
    commands: tuple[op.CommandInfo, ...], option: int, opcode: int, sa: int, rctd: bool
) -> bytes:
    has_sa = opcode in op.WITH_SERVICE_ACTION
    if option == 1 and has_sa:
        raise invalid_field_in_cdb(2, 2, f"operation code {opcode:#04x} has service actions")
    if option == 2 and not has_sa and op.lookup(opcode, None, commands) is not None:
        raise invalid_field_in_cdb(2, 2, f"operation code {opcode:#04x} has no service actions")
    info = op.lookup(opcode, sa if has_sa else None, commands)
    if info is None:
        return bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    head = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(info.usage))
    return head + info.usage + (_timeouts(info) if rctd else b"")


def report_supported_opcodes(lun: LunState, cdb: bytes, data_in: Buffers) -> Completion:
    rctd, option = bool(cdb[2] & 0x80), cdb[2] & 0x07
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    commands = op.supported(lun.alua_config().active)
    if option == 0:
        data = _all_commands(commands, rctd)
    elif option <= 3:
        sa = struct.unpack_from(">H", cdb, 4)[0]
        data = _one_command(commands, option, cdb[3], sa, rctd)
    else:
        raise invalid_field_in_cdb(2, 2, "reserved REPORTING OPTIONS")
    return respond(data, alloc, data_in)


def report_target_port_groups(lun: LunState, cdb: bytes, data_in: Buffers) -> Completion:
    """SPC-4 6.36, from a fresh read of the groups (this runs in a worker: see classify)."""
    config = lun.alua_config(fresh=True)
    if not config.active:
        raise _service_action_not_supported()
    data_format = cdb[1] >> 5
    if data_format not in (alua.RTPG_LENGTH_ONLY, alua.RTPG_EXTENDED):
        raise invalid_field_in_cdb(1, 7, f"reserved PARAMETER DATA FORMAT {data_format}")
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    data = alua.encode_rtpg(config, extended=data_format == alua.RTPG_EXTENDED)
    return respond(data, alloc, data_in)


def _service_action_not_supported() -> ScsiError:
    # libiscsi (and SPC-4) read this pointer at the SERVICE ACTION as "not implemented";
    # so do sg3_utils and scsi_dh_alua for REPORT TARGET PORT GROUPS (without ALUA).
    return invalid_field_in_cdb(1, 4, "service action not supported")


def maintenance_in(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, _b: BlockBackend
) -> Completion:
    action = cdb[1] & 0x1F
    if action == op.MI_REPORT_SUPPORTED_OPCODES:
        return report_supported_opcodes(lun, cdb, data_in)
    if action == op.MI_REPORT_TARGET_PGS:
        return report_target_port_groups(lun, cdb, data_in)
    raise _service_action_not_supported()
