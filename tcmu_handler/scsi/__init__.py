"""SCSI emulation for a thin-provisioned disk (sans-I/O).

``handle(lun, cdb, data_out, data_in, backend) -> Completion`` runs one command against
a :class:`LunState` and an injected :class:`BlockBackend`; ``classify(cdb)`` tells the
device loop whether a command can run inline or needs a worker thread.
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
