"""State of one emulated thin-provisioned LUN.

:class:`LunState` is what the SCSI emulation knows about a LUN: geometry, identity, the
limits it advertises in the Block Limits VPD page, mode-page state, pending unit
attentions and the long operation (FORMAT UNIT, SANITIZE) in progress, if any.

It is shared by every thread that runs commands for the LUN. Plain fields are read
without locking (a stale read of ``num_blocks`` or ``write_cache_enabled`` races with
the command that changes it, as on any disk); the unit-attention queue, the operation in
progress and the table of EXTENDED COPY statuses change under ``_lock``, and ``gate`` is
the one flag the READ/WRITE fast path looks at to learn that either of the first two
needs attention.

TCMU tells the handler nothing about the I_T nexus, so a unit attention is one per LUN,
not one per initiator as SAM-5 wants: the first command from any initiator reports it.
EXTENDED COPY list identifiers are per LUN for the same reason (SPC-4 scopes them to the
I_T nexus).
"""

from __future__ import annotations

import hashlib
import threading
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from targetvirt.errors import DATA_PROTECT, InvalidArgument, Sense
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.alua import NO_ALUA, AluaConfig, AluaProvider

LIO_OUI = 0x001405  # the IEEE company id LIO (and tcmu-runner) put in NAA designators
BLOCK_SIZES = (512, 4096)
PROVISIONING_THIN = 0x2
HELD_COPY_STATUSES = 16  # finished EXTENDED COPY statuses kept for RECEIVE COPY RESULTS


def naa_from_uuid(uuid: bytes | str, oui: int = LIO_OUI) -> bytes:
    """A 16-byte NAA type 6 (IEEE Registered Extended) identifier for a vdisk.

    The 100 vendor-specific bits are the first 100 bits of SHA-256 of the 16 UUID bytes:
    stable across restarts and hosts (multipath needs that), and collision-free in
    practice even though a UUID has more bits than fit.
    """
    raw = _uuid_bytes(uuid)
    digest = int.from_bytes(hashlib.sha256(raw).digest()[:13], "big") >> 4  # 100 bits
    value = (0x6 << 124) | ((oui & 0xFFFFFF) << 100) | digest
    return value.to_bytes(16, "big")


def _uuid_bytes(uuid: bytes | str) -> bytes:
    if isinstance(uuid, str):
        try:
            return uuidlib.UUID(uuid).bytes
        except ValueError as e:
            raise InvalidArgument(f"{uuid!r} is not a UUID") from e
    if len(uuid) != 16:
        raise InvalidArgument(f"a UUID is 16 bytes, not {len(uuid)}")
    return bytes(uuid)


@dataclass(slots=True, eq=False)
class CopyStatus:
    """Progress of one EXTENDED COPY that has a list identifier (RECEIVE COPY RESULTS).

    Updated by the thread running the copy, read by any other without locking: each
    field is one Python object, and a reader seeing one segment behind is still correct.
    """

    done: bool = False
    failed: bool = False
    segments: int = 0  # segment descriptors completed
    transferred: int = 0  # bytes written to the destination


def _check_ascii(name: str, value: str, width: int) -> None:
    if len(value) > width or not all(0x20 <= ord(c) <= 0x7E for c in value):
        raise InvalidArgument(f"{name} {value!r} must be at most {width} printable ASCII chars")


@dataclass(slots=True, eq=False)
class LunState:
    """Everything the emulation needs to know about one LUN (see module docstring)."""

    block_size: int = 512
    num_blocks: int = 0
    read_only: bool = False
    write_cache_enabled: bool = True
    serial: str = ""
    naa: bytes = field(default=naa_from_uuid(bytes(16)))
    vendor: str = "TGTVIRT"
    product: str = "targetvirt"
    revision: str = "0001"
    # Block Limits VPD (all lengths in logical blocks; 0 means "not reported / no limit").
    # The transfer lengths are advice to initiators, not enforced: a command that reached
    # the handler fitted in the TCMU data area, and serving it costs nothing extra
    # (libiscsi itself sends 65536-block writes whatever the page says).
    optimal_transfer_length: int = 0
    max_transfer_length: int = 0
    unmap_granularity: int = 1
    unmap_granularity_alignment: int = 0
    max_unmap_lba_count: int = 0x100000  # libiscsi: 0xFFFFFFFF or at most 1 Mi
    max_unmap_descriptors: int = 256
    max_write_same_length: int = 0x40000
    max_compare_and_write_length: int = 255
    # EXTENDED COPY (LID1) limits, reported by RECEIVE COPY RESULTS (OPERATING PARAMETERS)
    # and the Third-party Copy VPD page, and enforced. Every copy runs in one worker
    # thread, so segments x segment bytes (256 MiB) bounds how long one command holds it.
    max_copy_targets: int = 8  # CSCD (target) descriptors in one parameter list
    max_copy_segments: int = 16  # segment descriptors in one parameter list
    max_copy_segment_bytes: int = 16 << 20  # bytes one block-to-block segment may copy
    # READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT. 0 by default:
    # libiscsi 1.19's GetLBAStatus.UnmapSingle expects GET LBA STATUS to round its
    # starting LBA up to a physical block when this is > 0, which SBC-4 forbids.
    physical_block_exponent: int = 0
    # Logical block provisioning (thin): LBPME/LBPRZ and the B2h page bits
    lbpme: bool = True
    lbprz: bool = True
    lbpu: bool = True
    lbpws: bool = True
    lbpws10: bool = True
    provisioning_type: int = PROVISIONING_THIN
    threshold_exponent: int = 0  # 0: no per-initiator thresholds (only the soft UA)
    rotation_rate: int = 1  # 1: non-rotating medium
    # Mode page state: caching WCE is above; control page SWP and D_SENSE here.
    swp: bool = False
    d_sense: bool = False
    wce_default: bool | None = None  # the "default" value MODE SENSE reports
    # ALUA target port groups (scsi/alua.py); None: the LUN reports no ALUA (TPGS 00b).
    alua: AluaProvider | None = field(default=None, repr=False)
    # told after a MODE SELECT changed the state above (the service saves it)
    on_mode_select: Callable[[LunState], None] | None = field(default=None, init=False, repr=False)
    # Set while unit attentions are pending or a long operation runs (see module doc).
    gate: bool = field(default=False, init=False)
    _ua: deque[Sense] = field(default_factory=deque, init=False, repr=False)
    _operation: Sense | None = field(default=None, init=False, repr=False)
    _progress: int = field(default=0, init=False, repr=False)
    _copies: dict[int, CopyStatus] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise InvalidArgument(f"block size {self.block_size} is not one of {BLOCK_SIZES}")
        if len(self.naa) != 16 or self.naa[0] >> 4 != 6:
            raise InvalidArgument("the NAA identifier must be 16 bytes of NAA type 6")
        _check_ascii("vendor", self.vendor, 8)
        _check_ascii("product", self.product, 16)
        _check_ascii("revision", self.revision, 4)
        _check_ascii("serial", self.serial, 247)  # + 8-byte vendor in a 255-byte designator
        if self.wce_default is None:
            self.wce_default = self.write_cache_enabled

    @classmethod
    def for_vdisk(
        cls,
        uuid: bytes | str,
        num_blocks: int,
        *,
        block_size: int = 512,
        segment_size: int = 1 << 20,
        read_only: bool = False,
        write_cache_enabled: bool = True,
        max_transfer_bytes: int = 8 << 20,
    ) -> LunState:
        """The usual LUN for a thin vdisk: identity from its UUID, limits from its segment."""
        raw = _uuid_bytes(uuid)
        if segment_size % block_size:
            raise InvalidArgument(f"segment size {segment_size} is not a multiple of {block_size}")
        granularity = segment_size // block_size
        return cls(
            block_size=block_size,
            num_blocks=num_blocks,
            read_only=read_only,
            write_cache_enabled=write_cache_enabled,
            serial=raw.hex(),
            naa=naa_from_uuid(raw),
            optimal_transfer_length=granularity,
            max_transfer_length=max(1, max_transfer_bytes // block_size),
            unmap_granularity=granularity,
            # Big enough for Linux discards, within libiscsi's "at most 1 Mi" rule and a
            # whole number of segments.
            max_unmap_lba_count=max(granularity, 0x100000 // granularity * granularity),
            # Zeroing is a table operation, but a WRITE SAME with a non-zero pattern
            # writes every block: bound it to 1 GiB of data.
            max_write_same_length=(1 << 30) // block_size,
        )

    # --- identity ------------------------------------------------------------------------

    def designators(self) -> tuple[bytes, ...]:
        """The logical unit's designation descriptors (SPC-4 7.8.6), as VPD page 83h lists
        them: NAA (binary), then T10 vendor ID (ASCII, vendor + serial).

        EXTENDED COPY names a copy source or destination by one of these, so both use
        this one list.
        """
        naa = bytes((0x01, 0x03, 0x00, len(self.naa))) + self.naa
        t10_id = self.vendor.encode("ascii").ljust(8, b" ")
        t10_id += (self.serial or self.naa.hex()).encode("ascii")
        return naa, bytes((0x02, 0x01, 0x00, len(t10_id))) + t10_id

    def alua_config(self, *, fresh: bool = False) -> AluaConfig:
        """The target port groups now (``fresh``) or as recently read (see AluaProvider)."""
        provider = self.alua
        return NO_ALUA if provider is None else provider.snapshot(fresh=fresh)

    # --- capacity and unit attentions -------------------------------------------------

    def resize(self, num_blocks: int) -> None:
        """Change the capacity; initiators learn it from CAPACITY DATA HAS CHANGED."""
        if num_blocks < 0:
            raise InvalidArgument(f"capacity {num_blocks} is negative")
        self.num_blocks = num_blocks
        self.queue_unit_attention(sn.CAPACITY_DATA_CHANGED)

    def report_soft_threshold(self) -> None:
        """The pool crossed its soft threshold (SBC-4 4.7.3.6.3)."""
        self.queue_unit_attention(sn.SOFT_THRESHOLD_REACHED)

    def set_write_cache(self, enabled: bool) -> None:
        """Change WCE administratively; initiators learn it from MODE PARAMETERS CHANGED.

        MODE SELECT from an initiator does not come through here: SPC-4 sends that unit
        attention to the *other* I_T nexuses, and without nexus information it would hit
        the initiator that made the change (which would then fail its next command).
        """
        self.write_cache_enabled = enabled
        self.queue_unit_attention(sn.MODE_PARAMETERS_CHANGED)
        if self.on_mode_select is not None:
            self.on_mode_select(self)

    def queue_unit_attention(self, sense: Sense) -> None:
        with self._lock:
            if sense not in self._ua:
                self._ua.append(sense)
            self.gate = True

    def take_unit_attention(self) -> Sense | None:
        """Remove and return the oldest pending unit attention."""
        with self._lock:
            sense = self._ua.popleft() if self._ua else None
            self.gate = bool(self._ua) or self._operation is not None
            return sense

    @property
    def pending_unit_attentions(self) -> tuple[Sense, ...]:
        with self._lock:
            return tuple(self._ua)

    # --- long operations (FORMAT UNIT, SANITIZE) -------------------------------------

    def begin_operation(self, sense: Sense) -> bool:
        """Enter a long operation that makes other commands NOT READY with ``sense``.

        Returns False if another one is already running.
        """
        with self._lock:
            if self._operation is not None:
                return False
            self._operation, self._progress, self.gate = sense, 0, True
            return True

    def set_progress(self, done: int, total: int) -> None:
        self._progress = (done * 0x10000 // total) if total else 0

    def end_operation(self) -> None:
        with self._lock:
            self._operation = None
            self.gate = bool(self._ua)

    @property
    def operation(self) -> tuple[Sense, int] | None:
        """The long operation in progress and its progress (a fraction of 65536)."""
        op = self._operation
        return None if op is None else (op, min(self._progress, 0xFFFF))

    # --- EXTENDED COPY statuses ------------------------------------------------------------

    def begin_copy(self, list_id: int) -> CopyStatus | None:
        """Register a copy under ``list_id``, replacing a finished one with that identifier.

        Returns None if a copy with that identifier is still running (the caller reports
        OPERATION IN PROGRESS). Only the newest ``HELD_COPY_STATUSES`` finished copies are
        kept.
        """
        with self._lock:
            old = self._copies.pop(list_id, None)
            if old is not None and not old.done:
                self._copies[list_id] = old
                return None
            finished = [k for k, v in self._copies.items() if v.done]
            for key in finished[: max(0, len(finished) + 1 - HELD_COPY_STATUSES)]:
                del self._copies[key]
            status = self._copies[list_id] = CopyStatus()
            return status

    def drop_copy(self, list_id: int, status: CopyStatus) -> None:
        """Forget a copy that was refused before it started: it leaves no status behind."""
        with self._lock:
            if self._copies.get(list_id) is status:
                del self._copies[list_id]

    def copy_status(self, list_id: int) -> CopyStatus | None:
        with self._lock:
            return self._copies.get(list_id)

    @property
    def write_protect(self) -> Sense | None:
        """Why writes are refused, if they are: a read-only export wins over SWP."""
        if self.read_only:
            return Sense(DATA_PROTECT, 0x27, 0x00)
        if self.swp:
            return Sense(DATA_PROTECT, 0x27, 0x02)
        return None
