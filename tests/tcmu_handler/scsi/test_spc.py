import struct

import pytest

from tcmu_handler.scsi import naa_from_uuid
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import sense as sn

from .helpers import (
    INVALID_FIELD_IN_CDB,
    INVALID_OPCODE,
    UUID,
    Device,
    parse_sense,
)

SERIAL = UUID.replace("-", "")


@pytest.fixture
def dev() -> Device:
    return Device(num_blocks=4096)


# --- INQUIRY -------------------------------------------------------------------------------


def test_standard_inquiry_exact_bytes(dev: Device) -> None:
    r = dev.run([0x12, 0, 0, 0x01, 0x04, 0], in_len=260)
    assert r.completion.read_len == 96  # the rest of the 260 bytes is not sent
    expected = (
        bytes((0x00, 0x00, 0x06, 0x12, 91, 0x08, 0x00, 0x02))  # 3PC
        + b"TGTVIRT "
        + b"targetvirt      "
        + b"0001"
        + bytes(22)
        + bytes.fromhex("00a0046004c0")
        + bytes(32)
    )
    assert r.data == expected


@pytest.mark.parametrize("alloc", [0, 5, 36, 95, 96, 255, 511, 512])
def test_inquiry_allocation_length_truncates_and_reports_exactly(dev: Device, alloc: int) -> None:
    r = dev.run([0x12, 0, 0, alloc >> 8, alloc & 0xFF, 0], in_len=600)
    assert r.good
    assert r.completion.read_len == min(alloc, 96)
    assert r.raw[min(alloc, 96) :] == bytes([0xA5]) * (600 - min(alloc, 96))  # untouched


def test_inquiry_into_a_buffer_smaller_than_the_allocation_length(dev: Device) -> None:
    r = dev.run([0x12, 0, 0, 0, 255, 0], in_len=40)
    assert r.completion.read_len is None and len(r.data) == 40


def test_inquiry_page_code_without_evpd(dev: Device) -> None:
    r = dev.run([0x12, 0, 0x80, 0, 255, 0], in_len=255)
    assert r.status == 2 and r.completion.read_len == 0
    assert r.sense.triple == INVALID_FIELD_IN_CDB
    assert r.sense.sks == bytes((0xCF, 0, 2))  # CDB byte 2, bit 7


def test_inquiry_cmddt_is_refused(dev: Device) -> None:
    assert dev.run([0x12, 0x02, 0, 0, 255, 0], in_len=255).sense.triple == INVALID_FIELD_IN_CDB


def test_unsupported_vpd_page(dev: Device) -> None:
    r = dev.run([0x12, 1, 0x86, 0, 255, 0], in_len=255)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 2


def vpd(dev: Device, page: int) -> bytes:
    r = dev.run([0x12, 1, page, 0, 255, 0], in_len=255)
    assert r.good
    assert len(r.data) == struct.unpack(">H", r.data[2:4])[0] + 4
    assert r.data[:2] == bytes((0, page))
    return r.data


def test_vpd_supported_pages_ascending(dev: Device) -> None:
    assert vpd(dev, 0x00) == bytes.fromhex("000000070080838fb0b1b2")


def test_vpd_unit_serial(dev: Device) -> None:
    assert vpd(dev, 0x80) == bytes((0, 0x80, 0, 32)) + SERIAL.encode()


def test_vpd_device_identification(dev: Device) -> None:
    naa = naa_from_uuid(UUID)
    t10 = b"TGTVIRT " + SERIAL.encode()
    assert vpd(dev, 0x83) == (
        bytes((0, 0x83, 0, 20 + 4 + len(t10)))
        + bytes((0x01, 0x03, 0x00, 0x10))
        + naa
        + bytes((0x02, 0x01, 0x00, len(t10)))
        + t10
    )


def test_vpd_block_limits(dev: Device) -> None:
    page = vpd(dev, 0xB0)
    assert len(page) == 64 and page[3] == 0x3C
    wsnz, max_caw = page[4] & 1, page[5]
    gran, max_xfer, opt_xfer, _prefetch, max_unmap, max_desc, opt_unmap, uga = struct.unpack(
        ">HIIIIIII", page[6:36]
    )
    (max_ws,) = struct.unpack(">Q", page[36:44])
    assert (wsnz, max_caw, gran) == (0, 255, 1)
    assert (max_xfer, opt_xfer) == (16384, 2048)
    assert max_unmap == 1 << 20 and max_desc == 256
    assert (opt_unmap, uga) == (2048, 0x80000000)
    assert max_ws == (1 << 30) // 512
    assert page[44:64] == bytes(20)  # no atomic writes


def test_vpd_block_limits_without_unmap_reports_no_unmap_limits(dev: Device) -> None:
    dev.lun.lbpu = False
    page = vpd(dev, 0xB0)
    assert page[20:28] == bytes(8)


def test_vpd_block_device_characteristics(dev: Device) -> None:
    page = vpd(dev, 0xB1)
    assert page[:9] == bytes((0, 0xB1, 0, 0x3C, 0, 1, 0, 0x50, 0x01))
    assert len(page) == 64


def test_vpd_logical_block_provisioning(dev: Device) -> None:
    assert vpd(dev, 0xB2) == bytes((0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0))
    dev.lun.lbpws10 = False
    dev.lun.threshold_exponent = 12
    assert vpd(dev, 0xB2)[4:6] == bytes((12, 0xC4))


# --- TEST UNIT READY, REQUEST SENSE, unit attentions -----------------------------------------


def test_test_unit_ready(dev: Device) -> None:
    assert dev.run([0, 0, 0, 0, 0, 0]).good


def test_unit_attention_is_reported_once_before_other_commands(dev: Device) -> None:
    dev.lun.resize(8192)
    r = dev.run([0, 0, 0, 0, 0, 0])
    assert r.status == 2 and r.sense.triple == (0x06, 0x2A, 0x09)
    assert dev.run([0, 0, 0, 0, 0, 0]).good


def test_inquiry_does_not_consume_a_unit_attention(dev: Device) -> None:
    dev.lun.resize(8192)
    assert dev.run([0x12, 0, 0, 0, 96, 0], in_len=96).good
    assert dev.run([0x25] + [0] * 9, in_len=8).sense.triple == (0x06, 0x2A, 0x09)


def test_request_sense_reports_and_clears_a_unit_attention(dev: Device) -> None:
    dev.lun.report_soft_threshold()
    r = dev.run([0x03, 0, 0, 0, 252, 0], in_len=252)
    assert r.good and r.completion.read_len == 18
    assert r.data == sn.build(sn.SOFT_THRESHOLD_REACHED)
    assert dev.lun.pending_unit_attentions == ()


def test_request_sense_without_anything_pending(dev: Device) -> None:
    r = dev.run([0x03, 0, 0, 0, 18, 0], in_len=18)
    assert r.data == bytes.fromhex("700000000000000a00000000000000000000")


def test_request_sense_in_descriptor_format(dev: Device) -> None:
    r = dev.run([0x03, 1, 0, 0, 252, 0], in_len=252)
    assert r.data == bytes.fromhex("7200000000000000")


def test_request_sense_reports_progress_of_a_long_operation(dev: Device) -> None:
    dev.lun.begin_operation(sn.FORMAT_IN_PROGRESS)
    dev.lun.set_progress(1, 2)
    r = dev.run([0x03, 0, 0, 0, 18, 0], in_len=18)
    assert r.good
    pending = parse_sense(r.data)
    assert pending.triple == (0x02, 0x04, 0x04) and pending.sks == bytes((0x80, 0x80, 0x00))


# --- small commands ----------------------------------------------------------------------------


def test_prevent_allow_medium_removal(dev: Device) -> None:
    assert dev.run([0x1E, 0, 0, 0, 0, 0]).good
    for prevent in (1, 2, 3):
        r = dev.run([0x1E, 0, 0, 0, prevent, 0])
        assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 4


def test_send_diagnostic_default_self_test(dev: Device) -> None:
    assert dev.run([0x1D, 0x04, 0, 0, 0, 0]).good
    assert dev.run([0x1D, 0x20, 0, 0, 0, 0]).sense.triple == INVALID_FIELD_IN_CDB
    assert dev.run([0x1D, 0x10, 0, 0, 8, 0]).sense.triple == INVALID_FIELD_IN_CDB


@pytest.mark.parametrize("opcode", [0x9C, 0x7F, 0x4D, 0x3B, 0xC0])
def test_not_emulated_opcodes_are_invalid_operation_codes(dev: Device, opcode: int) -> None:
    r = dev.run(bytes([opcode]) + bytes(31 if opcode == 0x7F else 15))
    assert r.sense.triple == INVALID_OPCODE
    assert r.sense.sks == bytes((0xC0, 0, 0))


# --- REPORT SUPPORTED OPERATION CODES --------------------------------------------------------


def rsoc(rctd: int, option: int, opcode: int = 0, sa: int = 0, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, rctd << 7 | option, opcode, sa, alloc, 0, 0)


def test_rsoc_all_commands(dev: Device) -> None:
    r = dev.run(rsoc(0, 0), in_len=65535)
    assert r.good
    (length,) = struct.unpack(">I", r.data[:4])
    assert length == 8 * len(op.SUPPORTED) == len(r.data) - 4
    descriptors = [r.data[4 + 8 * i : 12 + 8 * i] for i in range(len(op.SUPPORTED))]
    assert descriptors[op.SUPPORTED.index(op.lookup(0x28, None))] == bytes.fromhex(
        "280000000000000a"
    )
    gls = op.SUPPORTED.index(op.lookup(0x9E, 0x12))
    assert descriptors[gls] == bytes.fromhex("9e00001200010010")


def test_rsoc_all_commands_with_timeouts(dev: Device) -> None:
    r = dev.run(rsoc(1, 0), in_len=65535)
    assert struct.unpack(">I", r.data[:4])[0] == 20 * len(op.SUPPORTED)
    first = r.data[4:24]
    assert first == bytes.fromhex("0000000000020006000a0000000000000000001e")


def test_rsoc_one_command_read10_shows_dpo_fua(dev: Device) -> None:
    r = dev.run(rsoc(0, 1, 0x28), in_len=512)
    assert r.data == bytes.fromhex("0003000a2818ffffffff1fffff00")


def test_rsoc_one_command_with_timeouts(dev: Device) -> None:
    r = dev.run(rsoc(1, 1, 0x00), in_len=512)
    assert r.data == bytes.fromhex("00830006000000000000000a0000000000000000001e")


def test_rsoc_one_command_with_service_action(dev: Device) -> None:
    r = dev.run(rsoc(0, 2, 0x9E, 0x10), in_len=512)
    assert r.data[:4] == bytes.fromhex("00030010") and r.data[4] == 0x9E


def test_rsoc_option_1_for_an_opcode_with_service_actions(dev: Device) -> None:
    r = dev.run(rsoc(0, 1, 0x9E), in_len=512)
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == 2


def test_rsoc_option_2_for_an_opcode_without_service_actions(dev: Device) -> None:
    assert dev.run(rsoc(0, 2, 0x28), in_len=512).sense.triple == INVALID_FIELD_IN_CDB


def test_rsoc_option_3_takes_either(dev: Device) -> None:
    assert dev.run(rsoc(0, 3, 0x28, 0x55), in_len=512).data[:2] == b"\x00\x03"
    assert dev.run(rsoc(0, 3, 0x48, 0x02), in_len=512).data[:2] == b"\x00\x03"


def test_rsoc_unsupported_command(dev: Device) -> None:
    assert dev.run(rsoc(0, 1, 0x9C), in_len=512).data == bytes((0, 1, 0, 0))
    assert dev.run(rsoc(0, 2, 0x9E, 0x11), in_len=512).data == bytes((0, 1, 0, 0))


def test_rsoc_reserved_reporting_option(dev: Device) -> None:
    assert dev.run(rsoc(0, 4), in_len=512).sense.triple == INVALID_FIELD_IN_CDB


def test_rsoc_allocation_length(dev: Device) -> None:
    r = dev.run(rsoc(0, 0, alloc=10), in_len=4096)
    assert r.completion.read_len == 10


def test_other_maintenance_in_actions_point_at_the_service_action(dev: Device) -> None:
    r = dev.run(struct.pack(">BB8xBB", 0xA3, 0x0A, 0, 0), in_len=512)
    assert r.sense.triple == INVALID_FIELD_IN_CDB
    assert r.sense.sks == bytes((0xCC, 0, 1))  # CDB byte 1, bit 4: "not implemented"


def test_every_supported_command_has_a_consistent_usage_map() -> None:
    for info in op.SUPPORTED:
        assert info.usage[0] == info.opcode
        assert len(info.usage) in (6, 10, 12, 16)
