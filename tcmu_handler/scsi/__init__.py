"""SCSI emulation for a thin-provisioned disk (sans-I/O).

The device loop calls, for each TCMU command::

    kind = classify(cdb)          # Kind.INLINE: run now; Kind.IO / Kind.LONG: a worker
    done = handle(lun, cdb, data_out, data_in, backend)
    # done.status (SAM status byte), done.sense (sense bytes or b""),
    # done.read_len (None: all of data_in is valid; else set TCMU_UFLAG_READ_LEN)

- ``cdb`` is bytes-like (bytes, or a memoryview of the ring entry); ``data_out`` and
  ``data_in`` are the command's iovecs as 1-D byte memoryviews of the data area.
  ``handle`` never raises and never writes outside ``data_in``; it writes all of
  ``data_in`` or reports how much with ``read_len``.
- ``lun`` is the :class:`LunState` of the LUN (shared by all threads serving it);
  ``backend`` is the vdisk's :class:`BlockBackend`. Errors the backend raises with a
  ``sense`` (``targetvirt.errors``) become CHECK CONDITION with that sense; anything
  else is logged and becomes HARDWARE ERROR / INTERNAL TARGET FAILURE.
- :class:`RamBackend` is a bytearray-backed backend for tests and tools.

Modules: ``command`` (entry points, dispatch), ``spc`` (INQUIRY, VPD, REQUEST SENSE,
REPORT SUPPORTED OPERATION CODES...), ``modepages`` (MODE SENSE/SELECT), ``sbc`` (data
path, WRITE SAME, UNMAP, COMPARE AND WRITE, GET LBA STATUS...), ``longops`` (FORMAT
UNIT, SANITIZE), ``xcopy`` (EXTENDED COPY, RECEIVE COPY RESULTS), ``sense``, ``lun``,
``backend``, ``opcodes``, ``common``.
"""

from tcmu_handler.scsi.backend import BlockBackend, RamBackend
from tcmu_handler.scsi.command import classify, handle
from tcmu_handler.scsi.common import CHECK_CONDITION, GOOD, Completion, Kind
from tcmu_handler.scsi.lun import LunState, naa_from_uuid

__all__ = [
    "CHECK_CONDITION",
    "GOOD",
    "BlockBackend",
    "Completion",
    "Kind",
    "LunState",
    "RamBackend",
    "classify",
    "handle",
    "naa_from_uuid",
]
