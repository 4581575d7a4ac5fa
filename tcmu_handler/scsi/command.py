"""Entry points of the SCSI emulation: :func:`handle` and :func:`classify`.

``handle(lun, cdb, data_out, data_in, backend)`` runs one command to completion and
returns a :class:`Completion`; it never raises. The device loop calls it once per ring
entry, in the loop itself for commands :func:`classify` calls ``Kind.INLINE`` and in a
worker thread otherwise.

Order of processing: a pending unit attention, then a FORMAT UNIT / SANITIZE in
progress (both skipped for INQUIRY, REPORT LUNS and REQUEST SENSE), then the command.
READ and WRITE go from the opcode table straight to their handler: one attribute test
(``lun.gate``), one struct unpack, one range check and one backend call.

Not emulated, answered INVALID COMMAND OPERATION CODE so initiators (and libiscsi)
know it: WRITE ATOMIC(16) (no crash atomicity across segments to promise), the 32-byte
CDBs, LOG SENSE/SELECT, and everything LIO answers itself (REPORT LUNS, persistent
reservations, RESERVE/RELEASE). EXTENDED COPY copies only within the LUN (``xcopy``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence

from targetvirt.errors import ScsiError, invalid_field_in_cdb, invalid_opcode, sense_of
from tcmu_handler.scsi import longops, modepages, sbc, spc, xcopy
from tcmu_handler.scsi import opcodes as op
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.backend import BlockBackend, WouldBlock
from tcmu_handler.scsi.common import CHECK_CONDITION, Completion, Kind, short_cdb
from tcmu_handler.scsi.lun import LunState

__all__ = ["Completion", "Kind", "classify", "handle"]

log = logging.getLogger(__name__)

Buffers = Sequence[memoryview]
Handler = Callable[[LunState, bytes, Buffers, Buffers, BlockBackend], Completion]


def _unsupported(
    lun: LunState, cdb: bytes, _o: Buffers, _i: Buffers, _b: BlockBackend
) -> Completion:
    raise invalid_opcode(cdb[0])


def _service_action_in(
    lun: LunState, cdb: bytes, _o: Buffers, data_in: Buffers, be: BlockBackend
) -> Completion:
    action = cdb[1] & 0x1F
    if action == op.SAI_READ_CAPACITY_16:
        return sbc.read_capacity_16(lun, cdb, data_in)
    if action == op.SAI_GET_LBA_STATUS:
        return sbc.get_lba_status(lun, cdb, data_in, be)
    # Field pointer at the SERVICE ACTION: libiscsi scores this as "not implemented".
    raise invalid_field_in_cdb(1, 4, f"SERVICE ACTION IN(16) action {action:#04x} is not supported")


_HANDLERS: dict[int, tuple[Handler, Kind]] = {
    op.TEST_UNIT_READY: (spc.test_unit_ready, Kind.INLINE),
    op.REQUEST_SENSE: (spc.request_sense, Kind.INLINE),
    op.FORMAT_UNIT: (longops.format_unit, Kind.LONG),
    op.READ_6: (sbc.read_6, Kind.IO),
    op.WRITE_6: (sbc.write_6, Kind.IO),
    op.INQUIRY: (spc.inquiry, Kind.INLINE),
    op.MODE_SELECT_6: (modepages.mode_select_6, Kind.IO),  # turning WCE off flushes
    op.MODE_SENSE_6: (modepages.mode_sense_6, Kind.INLINE),
    op.START_STOP_UNIT: (sbc.start_stop_unit, Kind.IO),  # STOP flushes
    op.SEND_DIAGNOSTIC: (spc.send_diagnostic, Kind.INLINE),
    op.PREVENT_ALLOW: (spc.prevent_allow, Kind.INLINE),
    op.READ_CAPACITY_10: (sbc.read_capacity_10, Kind.INLINE),
    op.READ_10: (sbc.read_10, Kind.IO),
    op.WRITE_10: (sbc.write_10, Kind.IO),
    op.WRITE_VERIFY_10: (sbc.write_verify_10, Kind.IO),
    op.VERIFY_10: (sbc.verify_10, Kind.IO),
    op.PRE_FETCH_10: (sbc.pre_fetch_10, Kind.INLINE),
    op.SYNCHRONIZE_CACHE_10: (sbc.synchronize_cache_10, Kind.IO),
    op.READ_DEFECT_DATA_10: (sbc.read_defect_data_10, Kind.INLINE),
    op.WRITE_SAME_10: (sbc.write_same_10, Kind.IO),
    op.UNMAP: (sbc.unmap, Kind.IO),
    op.SANITIZE: (longops.sanitize, Kind.LONG),
    op.MODE_SELECT_10: (modepages.mode_select_10, Kind.IO),
    op.MODE_SENSE_10: (modepages.mode_sense_10, Kind.INLINE),
    op.EXTENDED_COPY: (xcopy.extended_copy, Kind.IO),
    op.RECEIVE_COPY_RESULTS: (xcopy.receive_copy_results, Kind.INLINE),
    op.READ_16: (sbc.read_16, Kind.IO),
    op.COMPARE_AND_WRITE: (sbc.compare_and_write, Kind.IO),
    op.WRITE_16: (sbc.write_16, Kind.IO),
    op.ORWRITE_16: (sbc.orwrite_16, Kind.IO),
    op.WRITE_VERIFY_16: (sbc.write_verify_16, Kind.IO),
    op.VERIFY_16: (sbc.verify_16, Kind.IO),
    op.PRE_FETCH_16: (sbc.pre_fetch_16, Kind.INLINE),
    op.SYNCHRONIZE_CACHE_16: (sbc.synchronize_cache_16, Kind.IO),
    op.WRITE_SAME_16: (sbc.write_same_16, Kind.IO),
    op.SERVICE_ACTION_IN_16: (_service_action_in, Kind.INLINE),  # GET LBA STATUS: see classify
    op.MAINTENANCE_IN: (spc.maintenance_in, Kind.INLINE),  # RTPG: see classify
    op.READ_12: (sbc.read_12, Kind.IO),
    op.WRITE_12: (sbc.write_12, Kind.IO),
    op.WRITE_VERIFY_12: (sbc.write_verify_12, Kind.IO),
    op.VERIFY_12: (sbc.verify_12, Kind.IO),
    op.READ_DEFECT_DATA_12: (sbc.read_defect_data_12, Kind.INLINE),
}

# Indexed by opcode: the fast path does one list lookup.
_DISPATCH: list[Handler] = [_HANDLERS.get(i, (_unsupported, Kind.INLINE))[0] for i in range(256)]
_KIND: list[Kind] = [_HANDLERS.get(i, (_unsupported, Kind.INLINE))[1] for i in range(256)]


def classify(cdb: bytes) -> Kind:
    """How the device loop should run ``cdb``: inline, in a worker, or as a long job.

    Cheap (a list lookup) and safe on any bytes. ``Kind.INLINE`` commands never call the
    backend, so running them in the loop cannot block it.
    """
    if not cdb:
        return Kind.INLINE
    if len(cdb) > 1 and (cdb[0], cdb[1] & 0x1F) in _IO_ACTIONS:
        return Kind.IO
    return _KIND[cdb[0]]


# Service actions of inline opcodes that must run in a worker: GET LBA STATUS reads the
# backend's map, REPORT TARGET PORT GROUPS reads configfs (tcmu_handler/alua.py).
_IO_ACTIONS = frozenset(
    {
        (op.SERVICE_ACTION_IN_16, op.SAI_GET_LBA_STATUS),
        (op.MAINTENANCE_IN, op.MI_REPORT_TARGET_PGS),
    }
)


def cdb_length(opcode: int) -> int:
    """The CDB length the opcode's group implies (SPC-4 4.2.5.1); 0 when unknown."""
    group = opcode >> 5
    return (6, 10, 10, 0, 16, 12, 0, 0)[group]


def handle(
    lun: LunState,
    cdb: bytes,
    data_out: Buffers,
    data_in: Buffers,
    backend: BlockBackend,
) -> Completion:
    """Run one command (see module doc). Never raises, except :class:`WouldBlock` when
    the caller passed a non-blocking backend view that could not finish."""
    try:
        if lun.gate:
            held = _gate(lun, cdb[0])
            if held is not None:
                return held
        return _DISPATCH[cdb[0]](lun, cdb, data_out, data_in, backend)
    except ScsiError as e:
        return Completion(CHECK_CONDITION, sn.from_error(e, descriptor=lun.d_sense), 0)
    except WouldBlock:
        raise  # the device loop retries the command in a worker
    except (struct.error, IndexError) as e:
        if not cdb or len(cdb) < cdb_length(cdb[0]):
            return Completion(
                CHECK_CONDITION, sn.from_error(short_cdb(), descriptor=lun.d_sense), 0
            )
        return _internal_failure(lun, cdb, e)
    except Exception as e:  # noqa: BLE001 - every failure must become a completion
        sense = sense_of(e)
        if sense is None:
            return _internal_failure(lun, cdb, e)
        log.debug("CDB %s failed: %s", cdb.hex(), e)
        return Completion(CHECK_CONDITION, sn.build(sense, descriptor=lun.d_sense), 0)


def _gate(lun: LunState, opcode: int) -> Completion | None:
    """Report a pending unit attention or a long operation instead of running the command."""
    if opcode not in op.UA_EXEMPT:
        ua = lun.take_unit_attention()
        if ua is not None:
            return Completion(CHECK_CONDITION, sn.build(ua, descriptor=lun.d_sense), 0)
    current = lun.operation
    if current is not None and opcode not in op.NOT_READY_EXEMPT:
        sense, progress = current
        data = sn.build(sense, sks=sn.progress_sks(progress), descriptor=lun.d_sense)
        return Completion(CHECK_CONDITION, data, 0)
    return None


def _internal_failure(lun: LunState, cdb: bytes, error: BaseException) -> Completion:
    log.error("CDB %s: internal error", cdb.hex(), exc_info=error)
    return Completion(
        CHECK_CONDITION, sn.build(sn.INTERNAL_TARGET_FAILURE, descriptor=lun.d_sense), 0
    )
