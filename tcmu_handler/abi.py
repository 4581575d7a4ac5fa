"""The TCMU shared-memory ABI (``include/uapi/linux/target_core_user.h``, kernel 6.1).

Constants and byte layouts only, no behaviour. Every layout is a precompiled
:class:`struct.Struct` with the ``=`` prefix (host order, no implicit padding) and an
explicit offset, because the C structs mix ``__packed`` with an ``__aligned__(64)``
member and naturally aligned anonymous inner structs: ``@`` formats would guess wrong.
The offsets come from /work/shared/reference/tcmu.md section 1 (checked with GCC
against the 6.1 header).

The mmap is ``[mailbox 128 B][command ring: cmdr_size][data area]``; every offset the
kernel stores (``cdb_off``, ``iov_base``) counts from the start of the mmap.
"""

from __future__ import annotations

import struct
from typing import Final

# --- versions and capabilities (tcmu.md 1.1) ---------------------------------------

TCMU_VERSION: Final = "2.0"
TCMU_MAILBOX_VERSION: Final = 2
ALIGN_SIZE: Final = 64  # alignment of mailbox.cmd_tail

CAP_OOOC: Final = 1 << 0  # out-of-order completion
CAP_READ_LEN: Final = 1 << 1  # rsp.read_len honoured
CAP_TMR: Final = 1 << 2  # TMR entries may appear in the ring
CAP_KEEP_BUF: Final = 1 << 3  # TCMU_UFLAG_KEEP_BUF honoured

# --- entry opcodes and flags (tcmu.md 1.1, 1.3) -------------------------------------

OP_PAD: Final = 0
OP_CMD: Final = 1
OP_TMR: Final = 2
OP_MASK: Final = 0x7

UFLAG_UNKNOWN_OP: Final = 0x1
UFLAG_READ_LEN: Final = 0x2
UFLAG_KEEP_BUF: Final = 0x4

SENSE_BUFFERSIZE: Final = 96
OP_ALIGN_SIZE: Final = 8  # every entry length is a multiple of sizeof(__u64)

# Command ids are allocated by the kernel in 1..0xFFFF (XA_LIMIT(1, 0xffff)); PAD and
# TMR entries carry 0.
CMD_ID_MIN: Final = 1
CMD_ID_MAX: Final = 0xFFFF

# --- TMR types (struct tcmu_tmr_entry.tmr_type) --------------------------------------

TMR_UNKNOWN: Final = 0
TMR_ABORT_TASK: Final = 1
TMR_ABORT_TASK_SET: Final = 2
TMR_CLEAR_ACA: Final = 3
TMR_CLEAR_TASK_SET: Final = 4
TMR_LUN_RESET: Final = 5
TMR_TARGET_WARM_RESET: Final = 6
TMR_TARGET_COLD_RESET: Final = 7
TMR_LUN_RESET_PRO: Final = 128  # pseudo reset caused by PR OUT

# --- SAM status bytes written to rsp.scsi_status --------------------------------------

SAM_STAT_GOOD: Final = 0x00
SAM_STAT_CHECK_CONDITION: Final = 0x02
SAM_STAT_BUSY: Final = 0x08
SAM_STAT_RESERVATION_CONFLICT: Final = 0x18
SAM_STAT_TASK_SET_FULL: Final = 0x28
SAM_STAT_TASK_ABORTED: Final = 0x40

# --- struct tcmu_mailbox: offset 0 of the mmap, sizeof 128 (tcmu.md 1.2) -------------

MAILBOX_SIZE: Final = 128
# version u16, flags u16, cmdr_off u32, cmdr_size u32, cmd_head u32
MAILBOX: Final = struct.Struct("=HHIII")
MAILBOX_OFF: Final = 0
CMD_HEAD: Final = struct.Struct("=I")
CMD_HEAD_OFF: Final = 12
CMD_TAIL: Final = struct.Struct("=I")
CMD_TAIL_OFF: Final = 64  # on its own cache line; the only mailbox field userspace writes

# --- struct tcmu_cmd_entry_hdr: 8 bytes at the start of every entry (tcmu.md 1.3) ----

# len_op u32 (length | opcode in bits 0-2), cmd_id u16, kflags u8, uflags u8
ENTRY_HDR: Final = struct.Struct("=IHBB")
ENTRY_HDR_SIZE: Final = 8
HDR_CMD_ID: Final = struct.Struct("=H")
HDR_CMD_ID_OFF: Final = 4
HDR_UFLAGS: Final = struct.Struct("=B")
HDR_UFLAGS_OFF: Final = 7

# --- struct tcmu_cmd_entry, request view (tcmu.md 1.4) -------------------------------

# iov_cnt u32, iov_bidi_cnt u32, iov_dif_cnt u32 at +8; 4-byte hole at +20 (the inner
# struct is not packed, so the u64 cdb_off is aligned to 24); cdb_off u64 at +24.
REQ: Final = struct.Struct("=III4xQ")
REQ_OFF: Final = 8
REQ_COUNTS: Final = struct.Struct("=III")
REQ_COUNTS_OFF: Final = 8
REQ_CDB_OFF: Final = struct.Struct("=Q")
REQ_CDB_OFF_OFF: Final = 24
IOV_ARRAY_OFF: Final = 48
IOV: Final = struct.Struct("=QQ")  # iov_base (offset from mmap start), iov_len
IOV_SIZE: Final = 16
CMD_ENTRY_SIZE: Final = 112  # sizeof(struct tcmu_cmd_entry): room for a full response

# --- struct tcmu_cmd_entry, response view overlaid on the same slot (tcmu.md 1.5) ----

RSP_STATUS: Final = struct.Struct("=B")
RSP_STATUS_OFF: Final = 8
RSP_READ_LEN: Final = struct.Struct("=I")
RSP_READ_LEN_OFF: Final = 12
RSP_SENSE_OFF: Final = 16  # 96 bytes: 16..111
# uflags (+7), scsi_status (+8), 3 pad bytes (+9), read_len (+12): one store for all
RSP_UFLAGS_STATUS_READ_LEN: Final = struct.Struct("=BB3xI")
RSP_UFLAGS_STATUS_READ_LEN_OFF: Final = 7

# --- struct tcmu_tmr_entry (tcmu.md 1.6) ---------------------------------------------

TMR: Final = struct.Struct("=B3xI")  # tmr_type u8 at +8, pad, cmd_cnt u32 at +12
TMR_OFF: Final = 8
TMR_CMD_IDS_OFF: Final = 32
TMR_CMD_ID: Final = struct.Struct("=H")
TMR_ENTRY_SIZE: Final = 32  # sizeof(struct tcmu_tmr_entry)


def hdr_len(len_op: int) -> int:
    """Entry length in bytes from a header's ``len_op``."""
    return len_op & ~OP_MASK


def hdr_op(len_op: int) -> int:
    """Entry opcode from a header's ``len_op``."""
    return len_op & OP_MASK


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def cmd_base_size(iov_cnt: int) -> int:
    """Bytes before the CDB in a CMD entry with ``iov_cnt`` iovecs (kernel
    ``tcmu_cmd_get_base_cmd_size``): never less than a full response."""
    return max(IOV_ARRAY_OFF + IOV_SIZE * iov_cnt, CMD_ENTRY_SIZE)


def cmd_entry_size(iov_cnt: int, cdb_len: int) -> int:
    """Length of a CMD entry (kernel ``tcmu_cmd_get_cmd_size``)."""
    return cmd_base_size(iov_cnt) + round_up(cdb_len, OP_ALIGN_SIZE)


def tmr_entry_size(cmd_cnt: int) -> int:
    """Length of a TMR entry listing ``cmd_cnt`` aborted command ids."""
    return round_up(TMR_ENTRY_SIZE + 2 * cmd_cnt, OP_ALIGN_SIZE)
