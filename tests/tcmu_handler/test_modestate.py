"""MODE SELECT state survives a restart of the handler (not a new device, not a reboot)."""

from __future__ import annotations

import stat
from pathlib import Path

from tcmu_handler.modestate import ModeStore
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.service import TcmuService
from tests.tcmu_handler.scsi.helpers import Device
from tests.tcmu_handler.scsi.test_modepages import CONTROL, caching, select6

KEY = "user_1/lun0"


def lun(serial: str = "ab" * 16) -> LunState:
    return LunState(num_blocks=4096, serial=serial)


def test_a_mode_select_is_saved_and_taken_back(tmp_path: Path) -> None:
    store = ModeStore(tmp_path / "modes")
    dev = Device(num_blocks=4096)
    dev.lun.serial = "ab" * 16
    dev.lun.on_mode_select = lambda changed: store.save(KEY, changed)
    control = bytearray(CONTROL)
    control[2] |= 0x04  # D_SENSE
    assert dev.run(*select6(bytes(4) + caching(False) + bytes(control))).good
    saved = tmp_path / "modes" / "user_1:lun0.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    after = lun()
    assert store.restore(KEY, after)
    assert (after.write_cache_enabled, after.d_sense, after.swp) == (False, True, False)
    # the kernel's reconfiguration (emulate_write_cache) is saved too
    dev.lun.set_write_cache(True)
    again = lun()
    assert store.restore(KEY, again) and again.write_cache_enabled


def test_state_of_another_lun_or_damaged_is_not_applied(tmp_path: Path) -> None:
    store = ModeStore(tmp_path)
    old = lun()
    old.write_cache_enabled = False
    store.save(KEY, old)
    other = lun(serial="cd" * 16)  # the name now serves another vdisk
    assert not store.restore(KEY, other) and other.write_cache_enabled
    for text in ("{", "[]", '{"serial": "' + "ab" * 16 + '", "wce": "no"}'):
        (tmp_path / "user_1:lun0.json").write_text(text)
        fresh = lun()
        assert not store.restore(KEY, fresh) and fresh.write_cache_enabled
    assert not store.restore("user_1/none", lun())


def test_a_new_device_starts_from_the_defaults_a_taken_over_one_does_not(
    tmp_path: Path,
) -> None:
    store = ModeStore(tmp_path)
    service = TcmuService(lambda cfg, info: (None, None), modes=store)  # type: ignore[arg-type,return-value]
    old = lun()
    old.write_cache_enabled = False
    store.save(KEY, old)
    taken_over = lun()
    service._keep_modes(KEY, taken_over, fresh=False)  # a restarted handler's rescan
    assert not taken_over.write_cache_enabled
    new = lun()
    service._keep_modes(KEY, new, fresh=True)  # ADDED_DEVICE: a device just made
    assert new.write_cache_enabled and not (tmp_path / "user_1:lun0.json").exists()
    new.set_write_cache(False)  # and its changes are saved from now on
    back = lun()
    assert store.restore(KEY, back) and not back.write_cache_enabled
    service._remove(KEY)  # REMOVED_DEVICE forgets it
    assert not (tmp_path / "user_1:lun0.json").exists()
