"""A byte-exact stand-in for the kernel side of a TCMU ring (target_core_user.c, 6.1).

It lays out the mailbox, queues CMD and TMR entries exactly as ``queue_cmd_ring`` and
``queue_tmr_ring`` do (entry sizing, PAD at the ring end, CDB placement and absolute
``cdb_off``, data blocks and merged iovecs, stale bytes in reused blocks), and on a
uio write it runs ``tcmu_handle_completions``: walk from ``cmdr_last_cleaned`` to
``cmd_tail``, look up each CMD slot's ``cmd_id``, complete it (sense, READ_LEN, Data-In
gather from the command's own blocks) and mark the ring broken on an unknown id, just
as the kernel does.

Independent of ``tcmu_handler``: it packs its own bytes with literal offsets, so a
layout mistake in ``tcmu_handler.abi`` cannot hide behind a shared constant.

Things a handler could do that would hang or corrupt a real kernel (tail moved into
the middle of an entry, or past the published head) raise :class:`KernelViolation`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

MAILBOX_SIZE = 128
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP, UFLAG_READ_LEN, UFLAG_KEEP_BUF = 1, 2, 4
SAM_STAT_CHECK_CONDITION = 0x02
SAM_STAT_BUSY = 0x08
ALL_CAPS = 0x0F  # OOOC | READ_LEN | TMR | KEEP_BUF, as tcmu_configure_device sets
CMD_ENTRY_SIZE = 112
TMR_ENTRY_SIZE = 32
# scsi_command_size_tbl, indexed by the opcode's group code (include/scsi/scsi_common.h)
CDB_SIZE_BY_GROUP = (6, 10, 10, 12, 16, 12, 10, 10)
VARIABLE_LENGTH_CMD = 0x7F


class KernelViolation(AssertionError):
    """The handler did something the real kernel would not survive."""


def scsi_command_size(cdb: bytes) -> int:
    """The kernel's CDB length for ``cdb`` (``scsi_command_size``)."""
    if cdb[0] == VARIABLE_LENGTH_CMD:
        return cdb[7] + 8
    return CDB_SIZE_BY_GROUP[(cdb[0] >> 5) & 7]


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def base_command_size(iov_cnt: int) -> int:
    return max(48 + 16 * iov_cnt, CMD_ENTRY_SIZE)


@dataclass
class KernelCommand:
    """A command the emulated kernel queued (``struct tcmu_cmd``)."""

    tag: int  # unique per submission, unlike cmd_id which the kernel reuses
    cmd_id: int
    cdb: bytes
    data_out: bytes
    data_in_len: int  # Data-In length of a READ, or the bidi Data-In of a BIDI command
    bidi: bool
    dbis: list[int]  # data blocks: Data-Out (or Data-In) first, then bidi Data-In
    ring_offset: int
    entry_len: int
    iovs: list[tuple[int, int]]


@dataclass
class KernelCompletion:
    """What the kernel handed to LIO for one command (``target_complete_cmd``)."""

    tag: int
    cmd_id: int
    status: int
    sense: bytes | None  # 96 bytes, copied only for CHECK CONDITION
    data_in: bytes | None  # bytes gathered from the data area, None if not Data-In
    read_len: int | None  # length reported with target_complete_cmd_with_length
    unknown_op: bool = False


@dataclass
class KernelEmulator:
    cmdr_size: int = 4096 - MAILBOX_SIZE
    data_blocks: int = 32
    blk_size: int = 4096
    flags: int = ALL_CAPS
    never_allocated_fill: int = 0xEE  # marks data bytes no command ever owned
    buf: bytearray = field(init=False)
    last_cleaned: int = field(init=False, default=0)
    commands: dict[int, KernelCommand] = field(init=False, default_factory=dict)
    completions: list[KernelCompletion] = field(init=False, default_factory=list)
    broken: str | None = field(init=False, default=None)
    events: int = field(init=False, default=0)
    _bitmap: bytearray = field(init=False)
    _ever_allocated: bytearray = field(init=False)
    _next_tag: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self.data_off = MAILBOX_SIZE + self.cmdr_size
        self.buf = bytearray(self.data_off + self.data_blocks * self.blk_size)
        self.buf[self.data_off :] = bytes([self.never_allocated_fill]) * (
            self.data_blocks * self.blk_size
        )
        struct.pack_into("<HHIII", self.buf, 0, 2, self.flags, MAILBOX_SIZE, self.cmdr_size, 0)
        struct.pack_into("<I", self.buf, 64, 0)
        self._bitmap = bytearray(self.data_blocks)
        self._ever_allocated = bytearray(self.data_blocks)

    # --- mailbox ---------------------------------------------------------------------

    @property
    def cmd_head(self) -> int:
        return int(struct.unpack_from("<I", self.buf, 12)[0])

    @cmd_head.setter
    def cmd_head(self, value: int) -> None:
        struct.pack_into("<I", self.buf, 12, value)

    @property
    def cmd_tail(self) -> int:
        return int(struct.unpack_from("<I", self.buf, 64)[0])

    def ring_used(self) -> int:
        return (self.cmd_head - self.last_cleaned) % self.cmdr_size

    def _space_for(self, size: int) -> bool:
        """``is_ring_space_avail``: room for the entry plus a PAD if it must wrap."""
        head = self.cmd_head
        to_end = self.cmdr_size - head
        needed = size if to_end >= size else size + to_end
        free = self.cmdr_size - self.ring_used() - 1  # one byte tells full from empty
        return free >= needed

    def _insert_padding(self, size: int) -> int:
        """``ring_insert_padding``: a PAD to the ring end when the entry does not fit."""
        head = self.cmd_head
        to_end = self.cmdr_size - head
        if to_end < size:
            self._write_hdr(head, to_end | OP_PAD, 0)
            self.cmd_head = (head + to_end) % self.cmdr_size
            head = self.cmd_head
            assert head == 0
        return head

    def _write_hdr(self, ring_off: int, len_op: int, cmd_id: int) -> None:
        struct.pack_into("<IHBB", self.buf, MAILBOX_SIZE + ring_off, len_op, cmd_id, 0, 0)

    # --- data area -------------------------------------------------------------------

    def _alloc_blocks(self, count: int) -> list[int] | None:
        """Lowest free blocks first (``find_first_zero_bit``); a block is zeroed only
        the first time it is ever allocated, reused blocks keep stale bytes."""
        free = [i for i, used in enumerate(self._bitmap) if not used][:count]
        if len(free) < count:
            return None
        for dbi in free:
            self._bitmap[dbi] = 1
            if not self._ever_allocated[dbi]:
                self._ever_allocated[dbi] = 1
                start = self.data_off + dbi * self.blk_size
                self.buf[start : start + self.blk_size] = bytes(self.blk_size)
        return free

    def _free_blocks(self, dbis: list[int]) -> None:
        for dbi in dbis:
            self._bitmap[dbi] = 0

    def _iovs_for(self, dbis: list[int], length: int) -> list[tuple[int, int]]:
        """``new_block_to_iov``: adjacent blocks merge into one iovec."""
        iovs: list[list[int]] = []
        prev = -2
        for dbi in dbis:
            chunk = min(length, self.blk_size)
            if dbi != prev + 1:
                iovs.append([self.data_off + dbi * self.blk_size, 0])
            iovs[-1][1] += chunk
            length -= chunk
            prev = dbi
        return [(base, ln) for base, ln in iovs]

    def blocks_in_use(self) -> int:
        return sum(self._bitmap)

    # --- queueing --------------------------------------------------------------------

    def submit(
        self, cdb: bytes, *, data_out: bytes = b"", data_in: int = 0
    ) -> KernelCommand | None:
        """Queue one SCSI command (``queue_cmd_ring``). ``data_out`` alone is a WRITE,
        ``data_in`` alone a READ, both a bidirectional command. Returns None when the
        kernel could not queue it now (ring or data area full, or ring broken)."""
        if self.broken is not None:
            return None
        cdb_len = scsi_command_size(cdb)
        cdb = cdb[:cdb_len].ljust(cdb_len, b"\0")
        bidi = bool(data_out) and data_in > 0
        out_blocks = -(-len(data_out) // self.blk_size)
        in_blocks = -(-data_in // self.blk_size)
        dbis = self._alloc_blocks(out_blocks + in_blocks)
        if dbis is None:
            return None
        first_len = len(data_out) if data_out else data_in
        iovs = self._iovs_for(dbis[: out_blocks or in_blocks], first_len)
        bidi_iovs = self._iovs_for(dbis[out_blocks:], data_in) if bidi else []
        base = base_command_size(len(iovs) + len(bidi_iovs))
        size = base + round_up(cdb_len, 8)
        if size > self.cmdr_size // 2 or not self._space_for(size):
            self._free_blocks(dbis)
            return None
        cmd_id = next((i for i in range(1, 0x10000) if i not in self.commands), None)
        if cmd_id is None:
            self._free_blocks(dbis)
            return None
        head = self._insert_padding(size)
        ent = MAILBOX_SIZE + head
        self.buf[ent : ent + size] = bytes(size)  # memset(entry, 0, command_size)
        self._write_hdr(head, size | OP_CMD, cmd_id)
        struct.pack_into("<III", self.buf, ent + 8, len(iovs), len(bidi_iovs), 0)
        for i, (iov_base, iov_len) in enumerate(iovs + bidi_iovs):
            struct.pack_into("<QQ", self.buf, ent + 48 + 16 * i, iov_base, iov_len)
        self._scatter(dbis, data_out)
        cdb_off = MAILBOX_SIZE + head + base  # absolute, from the start of the mmap
        self.buf[cdb_off : cdb_off + cdb_len] = cdb
        struct.pack_into("<Q", self.buf, ent + 24, cdb_off)
        cmd = KernelCommand(
            tag=self._next_tag,
            cmd_id=cmd_id,
            cdb=cdb,
            data_out=data_out,
            data_in_len=data_in,
            bidi=bidi,
            dbis=dbis,
            ring_offset=head,
            entry_len=size,
            iovs=iovs + bidi_iovs,
        )
        self._next_tag += 1
        self.commands[cmd_id] = cmd
        self.cmd_head = (head + size) % self.cmdr_size
        self.events += 1
        return cmd

    def _scatter(self, dbis: list[int], data: bytes) -> None:
        for i in range(0, len(data), self.blk_size):
            start = self.data_off + dbis[i // self.blk_size] * self.blk_size
            chunk = data[i : i + self.blk_size]
            self.buf[start : start + len(chunk)] = chunk

    def _gather(self, dbis: list[int], length: int) -> bytes:
        out = bytearray()
        for dbi in dbis:
            if len(out) >= length:
                break
            start = self.data_off + dbi * self.blk_size
            out += self.buf[start : start + min(self.blk_size, length - len(out))]
        return bytes(out)

    def submit_tmr(self, tmr_type: int, cmd_ids: list[int]) -> bool:
        """Queue a TMR notification (``queue_tmr_ring``); False if no ring space."""
        if self.broken is not None:
            return False
        size = round_up(TMR_ENTRY_SIZE + 2 * len(cmd_ids), 8)
        if not self._space_for(size):
            return False
        head = self._insert_padding(size)
        ent = MAILBOX_SIZE + head
        self.buf[ent : ent + size] = bytes(size)
        self._write_hdr(head, size | OP_TMR, 0)
        struct.pack_into("<BxxxI", self.buf, ent + 8, tmr_type, len(cmd_ids))
        struct.pack_into(f"<{len(cmd_ids)}H", self.buf, ent + 32, *cmd_ids)
        self.cmd_head = (head + size) % self.cmdr_size
        self.events += 1
        return True

    def inject(self, size: int, build: Callable[[int], bytes]) -> int:
        """Queue a hand-made entry of ``size`` bytes (PAD-wrapped like any other).
        ``build`` gets the entry's absolute offset and returns its bytes; only
        ``len(result)`` bytes are written but the head moves by ``size``. Returns the
        entry's ring offset."""
        if not self._space_for(size):
            raise KernelViolation("test injected more than the ring can hold")
        head = self._insert_padding(size)
        ent = MAILBOX_SIZE + head
        raw = build(ent)
        self.buf[ent : ent + len(raw)] = raw
        self.cmd_head = (head + size) % self.cmdr_size
        self.events += 1
        return head

    # --- completion (uio write → tcmu_irqcontrol) --------------------------------------

    def notify(self) -> list[KernelCompletion]:
        """``tcmu_handle_completions``: process every slot up to ``cmd_tail``."""
        if self.broken is not None:
            return []
        done: list[KernelCompletion] = []
        tail = self.cmd_tail
        published = (self.cmd_head - self.last_cleaned) % self.cmdr_size
        if (tail - self.last_cleaned) % self.cmdr_size > published:
            raise KernelViolation(f"cmd_tail {tail} is beyond the published cmd_head")
        while self.last_cleaned != tail:
            ent = MAILBOX_SIZE + self.last_cleaned
            len_op, cmd_id, _kflags, uflags = struct.unpack_from("<IHBB", self.buf, ent)
            length = len_op & ~7
            step = (tail - self.last_cleaned) % self.cmdr_size
            if length == 0 or length > step:
                raise KernelViolation(f"cmd_tail {tail} is not on an entry boundary")
            if len_op & 7 in (OP_PAD, OP_TMR):
                self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
                continue
            if uflags & UFLAG_KEEP_BUF:
                raise KernelViolation("KEEP_BUF is not modelled")
            cmd = self.commands.pop(cmd_id, None)
            if cmd is None:
                self.broken = f"cmd_id {cmd_id} not found, ring is broken"
                return done
            done.append(self._complete(cmd, ent, uflags))
            self._free_blocks(cmd.dbis)
            self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
        self.completions += done
        return done

    def _complete(self, cmd: KernelCommand, ent: int, uflags: int) -> KernelCompletion:
        """``tcmu_handle_completion`` for one CMD slot."""
        status, rsp_read_len = struct.unpack_from("<BxxxI", self.buf, ent + 8)
        if uflags & UFLAG_UNKNOWN_OP:
            return KernelCompletion(
                cmd.tag, cmd.cmd_id, SAM_STAT_CHECK_CONDITION, None, None, None, True
            )
        data_in = cmd.data_in_len > 0
        read_len = cmd.data_in_len
        read_len_valid = False
        # READ_LEN only counts for a Data-In command (not BIDI, not WRITE).
        if data_in and not cmd.bidi and uflags & UFLAG_READ_LEN and rsp_read_len:
            read_len_valid = True
            read_len = min(read_len, rsp_read_len)
        sense = None
        if status == SAM_STAT_CHECK_CONDITION:
            sense = bytes(self.buf[ent + 16 : ent + 112])
            if not read_len_valid:
                return KernelCompletion(cmd.tag, cmd.cmd_id, status, sense, None, None)
        gathered = None
        if cmd.bidi:
            # gather_data_area(bidi=true) skips the Data-Out blocks and copies
            # se_cmd->data_length (the Data-Out length) bytes, bounded by the bidi list.
            out_blocks = -(-len(cmd.data_out) // self.blk_size)
            length = min(len(cmd.data_out), cmd.data_in_len)
            gathered = self._gather(cmd.dbis[out_blocks:], length)
        elif data_in:
            gathered = self._gather(cmd.dbis, read_len)
        return KernelCompletion(
            cmd.tag,
            cmd.cmd_id,
            status,
            sense,
            gathered,
            read_len if read_len_valid else None,
        )

    # --- recovery --------------------------------------------------------------------

    def reset_ring(self, err_level: int = 1) -> list[int]:
        """``action/reset_ring``: finish every in-flight command (BUSY for level 1,
        CHECK CONDITION for 2), zero head, tail and last_cleaned, clear BROKEN.
        Returns the tags of the commands it finished."""
        status = SAM_STAT_BUSY if err_level == 1 else SAM_STAT_CHECK_CONDITION
        tags = []
        for cmd in self.commands.values():
            self._free_blocks(cmd.dbis)
            self.completions.append(KernelCompletion(cmd.tag, cmd.cmd_id, status, None, None, None))
            tags.append(cmd.tag)
        self.commands.clear()
        self.last_cleaned = 0
        self.cmd_head = 0
        struct.pack_into("<I", self.buf, 64, 0)
        self.broken = None
        return tags
