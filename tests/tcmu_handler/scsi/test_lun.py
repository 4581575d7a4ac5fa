import uuid

import pytest

from targetvirt.errors import InvalidArgument
from tcmu_handler.scsi import LunState, naa_from_uuid
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.lun import HELD_COPY_STATUSES

U = "12345678-9abc-4def-8123-456789abcdef"


def test_naa_is_type_6_with_lio_oui_and_stable() -> None:
    naa = naa_from_uuid(U)
    assert len(naa) == 16
    assert naa.hex()[:7] == "6001405"
    assert naa == naa_from_uuid(uuid.UUID(U).bytes)
    assert naa != naa_from_uuid(uuid.uuid4().bytes)


def test_naa_with_another_oui() -> None:
    assert naa_from_uuid(U, oui=0xABCDEF).hex()[:7] == "6abcdef"


@pytest.mark.parametrize("bad", ["not-a-uuid", b"short"])
def test_naa_rejects_non_uuids(bad: str | bytes) -> None:
    with pytest.raises(InvalidArgument):
        naa_from_uuid(bad)


def test_for_vdisk_derives_limits_from_the_segment() -> None:
    lun = LunState.for_vdisk(U, 1 << 21, block_size=4096, segment_size=1 << 20)
    assert lun.serial == uuid.UUID(U).hex
    assert lun.naa == naa_from_uuid(U)
    assert lun.unmap_granularity == 256
    assert lun.optimal_transfer_length == 256
    assert lun.max_unmap_lba_count % 256 == 0 and lun.max_unmap_lba_count <= 1 << 20
    assert lun.max_write_same_length == (1 << 30) // 4096
    assert lun.max_transfer_length == (8 << 20) // 4096


@pytest.mark.parametrize(
    "kw",
    [
        {"block_size": 1024},
        {"vendor": "TOOLONGVENDOR"},
        {"product": "é"},
        {"naa": bytes(16)},
    ],
)
def test_invalid_configuration_is_refused(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        LunState(**kw)  # type: ignore[arg-type]


def test_segment_must_be_whole_blocks() -> None:
    with pytest.raises(InvalidArgument):
        LunState.for_vdisk(U, 8, block_size=4096, segment_size=6000)


def test_unit_attentions_queue_without_duplicates_and_drive_the_gate() -> None:
    lun = LunState()
    assert not lun.gate
    lun.resize(100)
    lun.resize(200)
    lun.report_soft_threshold()
    assert lun.num_blocks == 200
    assert lun.pending_unit_attentions == (sn.CAPACITY_DATA_CHANGED, sn.SOFT_THRESHOLD_REACHED)
    assert lun.gate
    assert lun.take_unit_attention() == sn.CAPACITY_DATA_CHANGED
    assert lun.take_unit_attention() == sn.SOFT_THRESHOLD_REACHED
    assert lun.take_unit_attention() is None
    assert not lun.gate


def test_set_write_cache_announces_the_change() -> None:
    lun = LunState()
    lun.set_write_cache(False)
    assert not lun.write_cache_enabled
    assert lun.pending_unit_attentions == (sn.MODE_PARAMETERS_CHANGED,)


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        LunState().resize(-1)


def test_one_long_operation_at_a_time_with_progress() -> None:
    lun = LunState()
    assert lun.begin_operation(sn.FORMAT_IN_PROGRESS)
    assert not lun.begin_operation(sn.SANITIZE_IN_PROGRESS)
    lun.set_progress(1, 4)
    assert lun.operation == (sn.FORMAT_IN_PROGRESS, 0x4000)
    lun.set_progress(4, 4)
    assert lun.operation == (sn.FORMAT_IN_PROGRESS, 0xFFFF)
    assert lun.gate
    lun.end_operation()
    assert lun.operation is None and not lun.gate


def test_gate_stays_up_while_an_operation_runs_after_the_ua_is_taken() -> None:
    lun = LunState()
    lun.begin_operation(sn.FORMAT_IN_PROGRESS)
    lun.resize(5)
    lun.take_unit_attention()
    assert lun.gate
    lun.end_operation()
    assert not lun.gate


def test_write_protect_reason() -> None:
    lun = LunState()
    assert lun.write_protect is None
    lun.swp = True
    assert lun.write_protect == (0x7, 0x27, 0x02)
    lun.read_only = True
    assert lun.write_protect == (0x7, 0x27, 0x00)


def test_designators_are_naa_then_t10_vendor_id() -> None:
    lun = LunState.for_vdisk(U, 8)
    naa, t10 = lun.designators()
    assert naa == bytes.fromhex("01030010") + naa_from_uuid(U)
    assert t10 == bytes((0x02, 0x01, 0x00, 40)) + b"TGTVIRT " + uuid.UUID(U).hex.encode()


def test_copy_statuses_one_running_copy_per_list_identifier() -> None:
    lun = LunState(num_blocks=8)
    first = lun.begin_copy(7)
    assert first is not None and lun.copy_status(7) is first
    assert lun.begin_copy(7) is None  # still running
    first.done = True
    second = lun.begin_copy(7)
    assert second is not None and second is not first and lun.copy_status(7) is second
    lun.drop_copy(7, first)  # not the current one: nothing happens
    assert lun.copy_status(7) is second
    lun.drop_copy(7, second)
    assert lun.copy_status(7) is None


def test_copy_statuses_keep_the_newest_finished_and_every_running_one() -> None:
    lun = LunState(num_blocks=8)
    running = lun.begin_copy(255)
    for list_id in range(40):
        status = lun.begin_copy(list_id)
        assert status is not None
        status.done = True
    assert lun.copy_status(255) is running
    held = [i for i in range(40) if lun.copy_status(i) is not None]
    assert held == list(range(40 - HELD_COPY_STATUSES, 40))
