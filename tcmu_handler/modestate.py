"""What initiators set with MODE SELECT, kept across a restart of the handler.

An initiator that turns the write cache off (WCE=0, e.g. ``sdparm --clear WCE`` or the sd
driver's ``cache_type``) stops sending SYNCHRONIZE CACHE: it takes every acknowledged
write as durable.  A handler that came back from a crash or an upgrade with the default
WCE=1 would silently break that.  To the initiator a restart of the handler is not a
power cycle (SPC keeps MODE SELECT values until one), so the changeable mode state of each
device is saved in the run folder (a tmpfs: gone at reboot, as it should be) and taken
back when the restarted handler takes the device over.  A device the kernel newly adds
starts from the defaults, and its removal forgets its state.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tcmu_handler.scsi.lun import LunState

log = logging.getLogger(__name__)


class ModeStore:
    """One small JSON file per device (by its configfs key) in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        # key is "user_<hba>/<name>"; configfs names hold no '/'
        return self.folder / (key.replace("/", ":") + ".json")

    def save(self, key: str, lun: LunState) -> None:
        """Write ``lun``'s changeable mode state atomically (rename over the old one)."""
        state = {"serial": lun.serial, "wce": lun.write_cache_enabled,
                 "d_sense": lun.d_sense, "swp": lun.swp}  # fmt: skip
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot save the mode state of %s (%s): a restarted handler would "
                      "start it with the defaults", key, e)  # fmt: skip

    def restore(self, key: str, lun: LunState) -> bool:
        """Apply the saved state of ``key`` to ``lun`` if it was saved for the same LUN
        (same serial: the vdisk's identity); returns whether it did."""
        try:
            state = json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            log.error("ignoring the saved mode state of %s: %s", key, e)
            return False
        if not isinstance(state, dict) or state.get("serial") != lun.serial:
            return False
        values = {k: state.get(k) for k in ("wce", "d_sense", "swp")}
        if not all(isinstance(v, bool) for v in values.values()):
            log.error("ignoring the saved mode state of %s: not booleans", key)
            return False
        lun.write_cache_enabled = bool(values["wce"])
        lun.d_sense, lun.swp = bool(values["d_sense"]), bool(values["swp"])
        return True

    def forget(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
