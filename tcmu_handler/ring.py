"""The TCMU command ring over any writable buffer: sans-I/O, no syscalls inside.

The kernel appends entries between ``cmd_tail`` and ``cmd_head``; :meth:`Ring.fetch`
copies every new command out of the ring (id, CDB, iovec list) and remembers its
slot. :meth:`Ring.complete` implements out-of-order completion (tcmu.md 1.9): the
response goes into whichever fetched CMD slot sits at the tail, with that slot's
``cmd_id`` overwritten by the id being completed, and the tail moves past it. The
caller then tells the kernel once (``uio`` write) for any number of completions.

Safety rules this module keeps, because the buffer is normally the TCMU mmap:

* Nothing the kernel wrote is trusted. A malformed entry makes :meth:`Ring.fetch`
  report the ring as *broken* (the device is then failed and the ring reset) instead
  of raising or reading outside the entry; no read or write ever leaves the buffer.
* Data-area pages that the kernel has not allocated SIGBUS when touched. Only the
  iovecs of a fetched command are ever viewed, and only the ring area (always mapped)
  is read otherwise. A PAD entry can be 8 bytes long at the ring end, so only its
  header is read.
* A response overlays the request, so responses are only written into slots that
  were already copied out, and never for an id the kernel does not expect (that
  breaks the ring in the kernel).
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Sequence
from enum import IntEnum
from typing import Final, NamedTuple

from targetvirt.errors import InvalidArgument, ProtocolError
from tcmu_handler import abi

RingBuffer = bytearray | memoryview | mmap.mmap

Iovec = tuple[int, int]  # (offset from the start of the mmap, length)

_NO_IOVS: Final[tuple[Iovec, ...]] = ()
_ZEROS: Final = bytes(abi.SENSE_BUFFERSIZE)
_U32_MAX: Final = 0xFFFFFFFF


class RingError(ProtocolError):
    """The ring cannot be used (bad mailbox) or was asked to do something that would
    break it in the kernel (completing an id that is not outstanding)."""


class _Malformed(Exception):
    """Internal: an entry breaks the ABI; never escapes :meth:`Ring.fetch`."""


class Command:
    """One fetched SCSI command: everything copied out of its ring entry.

    ``iovs`` is the Data-Out (WRITE) or Data-In (READ) buffer list; ``bidi_iovs`` the
    Data-In list of a bidirectional command. The ring does not know the direction: the
    CDB does. Views are created on demand and cover exactly these iovecs.
    """

    __slots__ = ("_mv", "bidi_iovs", "cdb", "cmd_id", "iovs")

    def __init__(
        self,
        cmd_id: int,
        cdb: bytes,
        iovs: tuple[Iovec, ...],
        bidi_iovs: tuple[Iovec, ...],
        mv: memoryview,
    ) -> None:
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iovs = iovs
        self.bidi_iovs = bidi_iovs
        self._mv = mv

    @property
    def data_length(self) -> int:
        """Bytes in ``iovs``: the fabric's expected transfer length, not the CDB's."""
        return sum(length for _, length in self.iovs)

    def views(self) -> list[memoryview]:
        """Zero-copy views of ``iovs``, e.g. for ``os.preadv``/``os.pwritev``."""
        mv = self._mv
        return [mv[off : off + length] for off, length in self.iovs]

    def view(self, offset: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes at ``offset`` of the ring's buffer (one of
        this command's iovecs)."""
        return self._mv[offset : offset + length]

    def bidi_views(self) -> list[memoryview]:
        """Zero-copy views of ``bidi_iovs`` (Data-In of a bidirectional command)."""
        mv = self._mv
        return [mv[off : off + length] for off, length in self.bidi_iovs]

    def data_in_iovs(self) -> tuple[Iovec, ...]:
        """The iovecs the kernel copies back to the initiator on completion."""
        return self.bidi_iovs if self.bidi_iovs else self.iovs

    def __repr__(self) -> str:
        return f"Command(id={self.cmd_id}, cdb={self.cdb.hex()}, iovs={self.iovs})"


class TmrEvent(NamedTuple):
    """A task management notification. ``cmd_ids`` are the aborted commands that are
    still outstanding here; they must still be completed (any status), the kernel does
    not drop them."""

    tmr_type: int
    cmd_ids: tuple[int, ...]


class Fetched(NamedTuple):
    """What one :meth:`Ring.fetch` found. ``broken`` is a one-line reason when the ring
    holds a malformed entry: commands before it are valid and may be completed, but no
    further entries will be read; fail the device and reset the ring."""

    commands: list[Command]
    tmrs: tuple[TmrEvent, ...]
    broken: str | None


class ResetMode(IntEnum):
    """Values for ``action/reset_ring``: how the kernel finishes in-flight commands."""

    BUSY = 1  # retryable: the initiator resends
    CHECK_CONDITION = 2  # hard failure


class RecoveryStep(NamedTuple):
    """One configfs write of the restart sequence, relative to the device directory."""

    attribute: str
    value: str
    why: str


def recovery_steps(mode: ResetMode = ResetMode.BUSY) -> tuple[RecoveryStep, ...]:
    """The writes to do before mapping a device this process did not set up itself
    (daemon restart, or a ring found broken), as libtcmu does on reopen (tcmu.md 1.9).

    Before them open the uio device (claiming it: one opener at a time); after them
    mmap it, build a :class:`Ring` (head and tail are 0), then :data:`UNBLOCK` and run
    :meth:`Ring.fetch` once at once, because commands queued before ``open()`` raised
    no event.
    """
    return (
        RecoveryStep(
            "action/block_dev", "1", "stop new commands (they get BUSY) and reap completions"
        ),
        RecoveryStep(
            "action/reset_ring",
            str(int(mode)),
            "finish in-flight commands, zero head and tail, clear BROKEN",
        ),
    )


UNBLOCK: Final = RecoveryStep("action/block_dev", "0", "accept commands again")

# iov_cnt, iov_bidi_cnt, iov_dif_cnt, hole, cdb_off, 16 pad bytes, iov[0]: one unpack
# for the common command (fields from abi: REQ at +8, IOV at +48).
_REQ_IOV0: Final = struct.Struct("=III4xQ16xQQ")
# the entry header and the same: a whole command's fixed part in one unpack
_CMD_HEAD: Final = struct.Struct("=IHBBIII4xQ16xQQ")
_CMD_HEAD_SIZE: Final = _CMD_HEAD.size  # 64: iov[0] ends there

_iov_structs: dict[int, struct.Struct] = {}


def _iov_struct(count: int) -> struct.Struct:
    """A Struct unpacking ``count`` iovecs at once (cached: command sizes repeat)."""
    s = _iov_structs.get(count)
    if s is None:
        s = struct.Struct("=" + "QQ" * count)
        if count <= 64:
            _iov_structs[count] = s
    return s


def _as_bytes_view(buffer: RingBuffer) -> memoryview:
    with memoryview(buffer) as mv:
        if mv.readonly:
            raise RingError("the ring buffer is read-only; map the uio device PROT_READ|PROT_WRITE")
        if not mv.c_contiguous:
            raise RingError("the ring buffer is not contiguous")
        # A fresh view either way, so the one released here leaves no export behind.
        return mv.cast("B")


class Ring:
    """The command ring of one TCMU device, over its whole mmap (or a test buffer).

    Not thread-safe: one device loop owns it. Hot path: :meth:`fetch`,
    :meth:`complete`.
    """

    def __init__(self, buffer: RingBuffer) -> None:
        mv = _as_bytes_view(buffer)
        total = mv.nbytes
        try:
            if total < abi.MAILBOX_SIZE:
                raise RingError(f"buffer of {total} bytes cannot hold the 128-byte mailbox")
            version, flags, cmdr_off, cmdr_size, head = abi.MAILBOX.unpack_from(mv, 0)
            (tail,) = abi.CMD_TAIL.unpack_from(mv, abi.CMD_TAIL_OFF)
            _check_mailbox(
                total=total,
                version=version,
                flags=flags,
                cmdr_off=cmdr_off,
                cmdr_size=cmdr_size,
                head=head,
                tail=tail,
            )
        except RingError:
            mv.release()  # else the caller cannot close the mmap it passed in
            raise
        self._mv = mv
        self._flags: int = flags
        self._base: int = cmdr_off
        self._size: int = cmdr_size
        self._data_lo: int = cmdr_off + cmdr_size
        self._data_hi: int = total
        self._next: int = tail  # fetch cursor; the kernel only sees _tail
        self._tail: int = tail
        # Fetched slots from _tail to _next in ring order: +length for a CMD slot (it
        # will receive a response), -length for one the tail just skips (PAD, TMR,
        # unknown op). There are exactly len(_outstanding) positive entries.
        self._slots: deque[int] = deque()
        self._outstanding: dict[int, Command] = {}
        self._broken: str | None = None

    # --- state ----------------------------------------------------------------------

    @property
    def flags(self) -> int:
        """The kernel's CAP_* flags from the mailbox."""
        return self._flags

    @property
    def cmdr_size(self) -> int:
        return self._size

    @property
    def data_area(self) -> tuple[int, int]:
        """Offsets ``[lo, hi)`` of the data area in the buffer."""
        return self._data_lo, self._data_hi

    @property
    def broken(self) -> str | None:
        """Why the ring was found malformed, or None."""
        return self._broken

    @property
    def cmd_tail(self) -> int:
        """The tail as last published to the kernel."""
        return self._tail

    @property
    def fetch_cursor(self) -> int:
        """Ring offset of the next entry :meth:`fetch` will read."""
        return self._next

    @property
    def outstanding(self) -> int:
        """Number of fetched commands not yet completed."""
        return len(self._outstanding)

    def is_outstanding(self, cmd_id: int) -> bool:
        return cmd_id in self._outstanding

    def outstanding_ids(self) -> list[int]:
        return list(self._outstanding)

    def has_new_entries(self) -> bool:
        """Whether the kernel has published entries not fetched yet (cheap peek)."""
        (head,) = abi.CMD_HEAD.unpack_from(self._mv, abi.CMD_HEAD_OFF)
        return self._broken is None and head != self._next

    # --- fetching -------------------------------------------------------------------

    def fetch(self) -> Fetched:
        """Read every entry the kernel published since the last call.

        Never raises for anything found in the buffer: a malformed entry stops the
        scan and is reported in :attr:`Fetched.broken` (and :attr:`broken`).
        """
        if self._broken is not None:
            return Fetched([], (), self._broken)
        mv = self._mv
        size = self._size
        base = self._base
        (head,) = abi.CMD_HEAD.unpack_from(mv, abi.CMD_HEAD_OFF)
        commands: list[Command] = []
        tmrs: tuple[TmrEvent, ...] = ()
        if head >= size or head & 7:
            return Fetched(commands, tmrs, self._break(f"cmd_head {head} is not a slot offset"))
        slots_append = self._slots.append
        hdr_unpack = abi.ENTRY_HDR.unpack_from
        head_unpack = _CMD_HEAD.unpack_from
        outstanding = self._outstanding
        lo, hi = self._data_lo, self._data_hi
        nxt = self._next
        try:
            while nxt != head:
                ent = base + nxt
                # An entry never wraps and never runs past what the kernel published.
                limit = (head if head > nxt else size) - nxt
                if limit < _CMD_HEAD_SIZE:  # a short PAD at the ring end: its header only
                    len_op, cmd_id, _kflags, uflags = hdr_unpack(mv, ent)
                    iov_cnt = -1
                else:  # the ring area past an entry is mapped too, so reading it is safe
                    len_op, cmd_id, _kflags, uflags, iov_cnt, bidi_cnt, _dif, cdb_off, b0, n0 = (
                        head_unpack(mv, ent)
                    )
                length = len_op & ~7
                op = len_op & 7
                if length == 0 or length > limit:
                    raise _Malformed(f"entry at ring offset {nxt} has length {length}")
                if op == abi.OP_CMD:
                    end = ent + length
                    if (  # the everyday command, one iovec: parsed here, checks and all
                        iov_cnt == 1
                        and not bidi_cnt
                        and length >= abi.CMD_ENTRY_SIZE
                        and ent + _CMD_HEAD_SIZE <= cdb_off < end
                        and cmd_id
                        and cmd_id not in outstanding
                        and lo <= b0
                        and b0 + n0 <= hi
                    ):
                        cmd = Command(cmd_id, mv[cdb_off:end].tobytes(), ((b0, n0),), (), mv)
                        outstanding[cmd_id] = cmd
                        commands.append(cmd)
                    else:  # the same checks in full, naming what is wrong
                        commands.append(self._parse_cmd(ent, length, cmd_id))
                    slots_append(length)
                elif op == abi.OP_PAD:
                    slots_append(-length)
                elif op == abi.OP_TMR:
                    tmrs = (*tmrs, self._parse_tmr(ent, length))
                    slots_append(-length)
                else:
                    # tcmu-design.rst: flag unknown ops and go on; the tail skips them.
                    abi.HDR_UFLAGS.pack_into(
                        mv, ent + abi.HDR_UFLAGS_OFF, uflags | abi.UFLAG_UNKNOWN_OP
                    )
                    slots_append(-length)
                nxt += length
                if nxt == size:
                    nxt = 0
        except _Malformed as why:
            self._next = nxt
            self._skip_leading()
            return Fetched(commands, tmrs, self._break(str(why)))
        self._next = nxt
        if self._slots and self._slots[0] < 0:
            self._skip_leading()
        return Fetched(commands, tmrs, None)

    def _parse_cmd(self, ent: int, length: int, cmd_id: int) -> Command:
        if length < abi.CMD_ENTRY_SIZE:
            raise _Malformed(f"command entry {cmd_id} is {length} bytes, below 112")
        outstanding = self._outstanding
        if cmd_id == 0 or cmd_id in outstanding:
            raise _Malformed(f"command id {cmd_id} is zero or already outstanding")
        mv = self._mv
        # length >= 112, so the request fields and iov[0] lie inside the entry.
        iov_cnt, bidi_cnt, _dif, cdb_off, base0, len0 = _REQ_IOV0.unpack_from(mv, ent + abi.REQ_OFF)
        count = iov_cnt + bidi_cnt
        iov_end = abi.IOV_ARRAY_OFF + abi.IOV_SIZE * count
        end = ent + length
        if iov_end > length:
            raise _Malformed(f"command {cmd_id}: {count} iovecs overrun its {length}-byte entry")
        if not ent + iov_end <= cdb_off < end:
            raise _Malformed(f"command {cmd_id}: cdb_off {cdb_off} lies outside its entry")
        cdb = bytes(mv[cdb_off:end])
        if count == 0:
            cmd = Command(cmd_id, cdb, _NO_IOVS, _NO_IOVS, mv)
        elif count == 1 and not bidi_cnt:
            if base0 < self._data_lo or base0 + len0 > self._data_hi:
                raise _Malformed(f"command {cmd_id}: iovec {base0}+{len0} is outside the data area")
            cmd = Command(cmd_id, cdb, ((base0, len0),), _NO_IOVS, mv)
        else:
            iovs = self._parse_iovs(ent + abi.IOV_ARRAY_OFF, count, cmd_id)
            if bidi_cnt:
                cmd = Command(cmd_id, cdb, iovs[:iov_cnt], iovs[iov_cnt:], mv)
            else:
                cmd = Command(cmd_id, cdb, iovs, _NO_IOVS, mv)
        outstanding[cmd_id] = cmd
        return cmd

    def _parse_iovs(self, at: int, count: int, cmd_id: int) -> tuple[Iovec, ...]:
        lo = self._data_lo
        hi = self._data_hi
        if count == 1:
            off, length = abi.IOV.unpack_from(self._mv, at)
            if off < lo or off + length > hi:
                raise _Malformed(f"command {cmd_id}: iovec {off}+{length} is outside the data area")
            return ((off, length),)
        flat = iter(_iov_struct(count).unpack_from(self._mv, at))
        iovs = tuple(zip(flat, flat, strict=True))
        for off, length in iovs:
            if off < lo or off + length > hi:
                raise _Malformed(f"command {cmd_id}: iovec {off}+{length} is outside the data area")
        return iovs

    def _parse_tmr(self, ent: int, length: int) -> TmrEvent:
        if length < abi.TMR_ENTRY_SIZE:
            raise _Malformed(f"TMR entry is {length} bytes, below 32")
        tmr_type, cnt = abi.TMR.unpack_from(self._mv, ent + abi.TMR_OFF)
        if abi.TMR_ENTRY_SIZE + 2 * cnt > length:
            raise _Malformed(f"TMR entry lists {cnt} ids but is only {length} bytes")
        ids = struct.unpack_from(f"={cnt}H", self._mv, ent + abi.TMR_CMD_IDS_OFF)
        # Ids the kernel lists may already be completed here (the kernel has not seen
        # the tail move yet); keep only the ones the caller still owns.
        outstanding = self._outstanding
        return TmrEvent(tmr_type, tuple(i for i in ids if i in outstanding))

    def _break(self, why: str) -> str:
        self._broken = why
        return why

    # --- completing -----------------------------------------------------------------

    def complete(
        self,
        cmd_id: int,
        status: int,
        sense: bytes = b"",
        read_len: int | None = None,
    ) -> None:
        """Post the response of an outstanding command and move ``cmd_tail``.

        ``read_len`` is the number of Data-In bytes really produced: the kernel then
        returns only those and reports an underflow residual. Data-In bytes past it are
        otherwise stale data of earlier commands, so when the kernel cannot be told
        (``read_len == 0`` means "all" to the kernel, or no CAP_READ_LEN) they are
        zeroed here instead. The caller notifies the kernel afterwards (one uio write
        covers any number of completions).
        """
        cmd = self._outstanding.get(cmd_id)
        if cmd is None:
            raise _not_outstanding(cmd_id)
        if not 0 <= status <= 0xFF:
            raise InvalidArgument(f"SCSI status {status} does not fit in a byte")
        if len(sense) > abi.SENSE_BUFFERSIZE:
            raise InvalidArgument(f"sense of {len(sense)} bytes exceeds 96")
        uflags = 0
        wire_read_len = 0
        if read_len is not None:
            if read_len < 0:
                raise InvalidArgument(f"read_len {read_len} is negative")
            if read_len and self._flags & abi.CAP_READ_LEN:
                uflags = abi.UFLAG_READ_LEN
                wire_read_len = min(read_len, _U32_MAX)
            else:
                self._zero_data_in(cmd, read_len)
        self._post((cmd_id,), uflags, status, wire_read_len, sense)

    def complete_good(self, cmd_ids: list[int]) -> None:
        """:meth:`complete` with GOOD status, no sense and all data, for several
        outstanding commands, publishing ``cmd_tail`` once: the everyday command's
        completion without the general one's checks.  An id that is not outstanding
        raises :class:`RingError` after the ids before it were completed (and
        published), the ring still consistent."""
        self._post(cmd_ids, 0, abi.SAM_STAT_GOOD, 0, b"")

    def _zero_data_in(self, cmd: Command, keep: int) -> None:
        """Zero the Data-In bytes past the first ``keep`` (only inside the command's
        own iovecs)."""
        mv = self._mv
        for off, length in cmd.data_in_iovs():
            if keep >= length:
                keep -= length
                continue
            start = off + keep
            mv[start : off + length] = bytes(length - keep)
            keep = 0

    def _post(
        self,
        cmd_ids: Sequence[int],
        uflags: int,
        status: int,
        read_len: int,
        sense: bytes,
    ) -> None:
        """Write one response for each of ``cmd_ids`` (the same for all) into the slots
        at the tail, moving the tail past them (and past PAD/TMR slots between them),
        then publish the tail once.  An id that is not outstanding raises after the
        ones before it were posted and published."""
        outstanding = self._outstanding
        slots = self._slots
        size = self._size
        base = self._base
        mv = self._mv
        pack_id = abi.HDR_CMD_ID.pack_into
        pack_rsp = abi.RSP_UFLAGS_STATUS_READ_LEN.pack_into
        # the kernel passes all 96 sense bytes on: pad, so no request bytes leak out
        check = status == abi.SAM_STAT_CHECK_CONDITION
        padded = sense + _ZEROS[len(sense) :] if sense or check else b""
        tail = self._tail
        try:
            for cmd_id in cmd_ids:
                if outstanding.pop(cmd_id, None) is None:
                    raise _not_outstanding(cmd_id)
                # Skip PAD/TMR/unknown slots to the first fetched CMD slot (normally
                # already done); one exists, since every outstanding command owns one.
                length = slots.popleft()
                while length < 0:
                    tail -= length
                    if tail >= size:
                        tail -= size
                    length = slots.popleft()
                ent = base + tail
                pack_id(mv, ent + abi.HDR_CMD_ID_OFF, cmd_id)
                pack_rsp(mv, ent + abi.RSP_UFLAGS_STATUS_READ_LEN_OFF, uflags, status, read_len)
                if padded:
                    sense_at = ent + abi.RSP_SENSE_OFF
                    mv[sense_at : sense_at + abi.SENSE_BUFFERSIZE] = padded
                tail += length
                if tail >= size:
                    tail -= size
        finally:
            self._tail = tail
            # Last: the kernel may act on the tail as soon as it sees it.
            self._skip_leading()

    def _skip_leading(self) -> None:
        """Move the tail over fetched PAD/TMR/unknown slots at its front, so their ring
        space (e.g. a PAD at the ring end, a TMR with nothing behind it) is reclaimed
        at the kernel's next reap instead of waiting for a later completion.  Publishes
        the tail."""
        slots = self._slots
        size = self._size
        tail = self._tail
        while slots and slots[0] < 0:
            tail -= slots.popleft()
            if tail >= size:
                tail -= size
        self._tail = tail
        abi.CMD_TAIL.pack_into(self._mv, abi.CMD_TAIL_OFF, tail)

    def fail_outstanding(self, status: int = abi.SAM_STAT_BUSY) -> int:
        """Complete every outstanding command with ``status`` (BUSY lets initiators
        retry), e.g. before closing the device. Returns how many were completed."""
        ids = list(self._outstanding)
        for cmd_id in ids:
            self.complete(cmd_id, status)
        return len(ids)

    def release(self) -> None:
        """Drop this ring's view of the buffer so an mmap can be closed. Commands
        still referenced keep their own views alive until dropped."""
        self._outstanding.clear()
        self._slots.clear()
        self._mv.release()


def _not_outstanding(cmd_id: int) -> RingError:
    return RingError(
        f"cannot complete command {cmd_id}: it is not outstanding "
        "(never fetched or already completed); the kernel would break the ring"
    )


def _check_mailbox(
    *, total: int, version: int, flags: int, cmdr_off: int, cmdr_size: int, head: int, tail: int
) -> None:
    if version != abi.TCMU_MAILBOX_VERSION:
        raise RingError(f"mailbox version is {version}, this handler speaks version 2")
    if not flags & abi.CAP_OOOC:
        raise RingError(
            f"mailbox flags {flags:#x} lack CAP_OOOC; out-of-order completion is required"
        )
    if cmdr_off < abi.MAILBOX_SIZE or cmdr_off % abi.OP_ALIGN_SIZE:
        raise RingError(f"mailbox cmdr_off {cmdr_off} is not an aligned offset after the mailbox")
    if cmdr_size < abi.CMD_ENTRY_SIZE or cmdr_size % abi.OP_ALIGN_SIZE:
        raise RingError(f"mailbox cmdr_size {cmdr_size} is not a usable ring size")
    if cmdr_off + cmdr_size > total:
        raise RingError(
            f"command ring {cmdr_off}+{cmdr_size} runs past the {total}-byte buffer; "
            "was the whole map0 size mapped?"
        )
    for name, value in (("cmd_head", head), ("cmd_tail", tail)):
        if value >= cmdr_size or value % abi.OP_ALIGN_SIZE:
            raise RingError(f"mailbox {name} {value} is not a slot offset in the ring")
