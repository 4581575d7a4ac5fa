"""Layouts against literal byte vectors written from tcmu.md section 1 (not from abi)."""

from tcmu_handler import abi
from tests.tcmu_handler.kernel_emulator import KernelEmulator, scsi_command_size


def test_mailbox_layout_matches_the_6_1_header() -> None:
    raw = bytearray(128)
    raw[0:16] = bytes.fromhex("0200 0f00 80000000 80ff7f00 10020000")
    raw[64:68] = bytes.fromhex("08010000")
    assert abi.MAILBOX.unpack_from(raw, abi.MAILBOX_OFF) == (2, 0x0F, 128, 8_388_480, 0x210)
    assert abi.CMD_HEAD.unpack_from(raw, abi.CMD_HEAD_OFF) == (0x210,)
    assert abi.CMD_TAIL.unpack_from(raw, abi.CMD_TAIL_OFF) == (0x108,)
    assert abi.MAILBOX_SIZE == 128 and abi.CMD_TAIL_OFF == abi.ALIGN_SIZE


def test_entry_header_packs_length_and_opcode_in_len_op() -> None:
    raw = bytes.fromhex("81000000 3412 00 02")
    len_op, cmd_id, kflags, uflags = abi.ENTRY_HDR.unpack_from(raw)
    assert (abi.hdr_len(len_op), abi.hdr_op(len_op)) == (0x80, abi.OP_CMD)
    assert (cmd_id, kflags, uflags) == (0x1234, 0, abi.UFLAG_READ_LEN)
    assert abi.ENTRY_HDR.size == abi.ENTRY_HDR_SIZE == 8


# A READ(10) of 4 KiB as the kernel queues it first on a fresh device with the default
# 8 MiB ring: one iovec at data_off 0x800000, base 112, CDB at +112, cdb_off absolute.
READ10_ENTRY = bytes.fromhex(
    "81000000 0100 00 00"  # len 128 | OP_CMD, cmd_id 1, kflags, uflags
    "01000000 00000000 00000000"  # iov_cnt 1, iov_bidi_cnt 0, iov_dif_cnt 0
    "00000000"  # alignment hole
    "f000000000000000"  # cdb_off = 128 (cmdr_off) + 0 (entry) + 112 (base)
    "0000000000000000 0000000000000000"  # __pad1, __pad2
    "0000800000000000 0010000000000000"  # iov[0]: base 0x800000, len 4096
    + "00" * 48  # up to 112: unused iov room (the entry is at least 112 bytes)
    + "28000000001000000800 000000000000"  # CDB (10 bytes) rounded up to 16
)


def test_request_view_offsets() -> None:
    assert len(READ10_ENTRY) == 128
    assert abi.REQ.unpack_from(READ10_ENTRY, abi.REQ_OFF) == (1, 0, 0, 0xF0)
    assert abi.REQ_COUNTS.unpack_from(READ10_ENTRY, abi.REQ_COUNTS_OFF) == (1, 0, 0)
    assert abi.REQ_CDB_OFF.unpack_from(READ10_ENTRY, abi.REQ_CDB_OFF_OFF) == (0xF0,)
    assert abi.IOV.unpack_from(READ10_ENTRY, abi.IOV_ARRAY_OFF) == (0x800000, 4096)
    assert abi.cmd_base_size(1) == 112 and abi.cmd_entry_size(1, 10) == 128


def test_emulator_queues_the_literal_entry_byte_for_byte() -> None:
    emu = KernelEmulator(cmdr_size=8 * 1024 * 1024 - 128, data_blocks=1)
    emu.submit(bytes.fromhex("28000000001000000800"), data_in=4096)
    assert emu.buf[128 : 128 + 128] == READ10_ENTRY
    assert emu.cmd_head == 128


def test_response_view_overlays_the_request() -> None:
    slot = bytearray(READ10_ENTRY)
    abi.HDR_CMD_ID.pack_into(slot, abi.HDR_CMD_ID_OFF, 7)
    abi.RSP_UFLAGS_STATUS_READ_LEN.pack_into(
        slot, abi.RSP_UFLAGS_STATUS_READ_LEN_OFF, abi.UFLAG_READ_LEN, 0x02, 36
    )
    slot[abi.RSP_SENSE_OFF : abi.RSP_SENSE_OFF + 3] = b"\x70\x00\x05"
    assert slot[:24] == bytes.fromhex(
        "81000000 0700 00 02"  # cmd_id rewritten, uflags READ_LEN
        "02 000000 24000000"  # scsi_status CHECK CONDITION, pads, read_len 36
        "700005 0000000000"  # sense starts at +16, over cdb_off
    )
    assert abi.RSP_STATUS.unpack_from(slot, abi.RSP_STATUS_OFF) == (0x02,)
    assert abi.RSP_READ_LEN.unpack_from(slot, abi.RSP_READ_LEN_OFF) == (36,)
    assert abi.RSP_SENSE_OFF + abi.SENSE_BUFFERSIZE == abi.CMD_ENTRY_SIZE


def test_tmr_entry_layout() -> None:
    raw = bytes.fromhex(
        "2a000000 0000 00 00"  # len 40 | OP_TMR
        "01 000000 03000000"  # ABORT_TASK, pads, cmd_cnt 3
        "0000000000000000 0000000000000000"
        "0500 0900 0100 0000"  # ids 5, 9, 1 + padding to 8
    )
    len_op, *_ = abi.ENTRY_HDR.unpack_from(raw)
    assert (abi.hdr_len(len_op), abi.hdr_op(len_op)) == (40, abi.OP_TMR)
    assert abi.TMR.unpack_from(raw, abi.TMR_OFF) == (abi.TMR_ABORT_TASK, 3)
    ids = [abi.TMR_CMD_ID.unpack_from(raw, abi.TMR_CMD_IDS_OFF + 2 * i)[0] for i in range(3)]
    assert ids == [5, 9, 1]
    assert abi.tmr_entry_size(3) == 40 and abi.tmr_entry_size(0) == 32


def test_entry_sizing_follows_the_kernel() -> None:
    assert abi.cmd_entry_size(0, 6) == 120  # TEST UNIT READY: 112 + 8
    assert abi.cmd_entry_size(4, 16) == 128  # 48 + 64 = 112, + 16
    assert abi.cmd_entry_size(5, 16) == 128 + 16  # iovs push the CDB past 112
    assert abi.cmd_entry_size(1, 32) == 144  # variable-length CDB


def test_kernel_cdb_length_table() -> None:
    # group code (opcode >> 5): 6, 10, 10, 12, 16, 12, 10, 10; 0x7F: byte 7 + 8
    expected = {0x00: 6, 0x28: 10, 0x5A: 10, 0xA8: 12, 0x88: 16, 0xB7: 12, 0xC0: 10, 0xE0: 10}
    for opcode, length in expected.items():
        assert scsi_command_size(bytes([opcode]) + bytes(31)) == length
    assert scsi_command_size(bytes([0x7F]) + bytes(6) + bytes([0x18]) + bytes(24)) == 32
