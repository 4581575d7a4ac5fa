import struct
import threading

import pytest

from targetvirt.errors import ContainerWriteError
from tcmu_handler.scsi import RamBackend, longops
from tcmu_handler.scsi import sense as sn

from .helpers import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    Device,
    cdb16,
    parse_sense,
)

N = 4096


@pytest.fixture
def dev() -> Device:
    d = Device(num_blocks=N, segment_size=64 * 512)
    d.write(0, b"a" * 8 * 512)
    d.write(N - 8, b"a" * 8 * 512)
    return d


def mapped(dev: Device) -> list[tuple[int, int, bool]]:
    return dev.backend.mapped_ranges(0, N * dev.bs)


def sanitize(action: int, length: int = 0, byte1: int = 0, reserved: bytes = bytes(5)) -> bytes:
    return bytes((0x48, byte1 | action)) + reserved + struct.pack(">HB", length, 0)


def overwrite_params(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | count, 0)) + struct.pack(">H", len(pattern)) + pattern


# --- FORMAT UNIT ---------------------------------------------------------------------------------


def test_format_unit_deallocates_everything(dev: Device) -> None:
    assert dev.run([0x04, 0, 0, 0, 0, 0]).good
    assert mapped(dev) == [(0, N * 512, False)]
    assert dev.read(0, 8) == bytes(8 * 512)
    assert dev.backend.flushes == 1
    assert dev.lun.operation is None


def test_format_unit_with_an_empty_parameter_list(dev: Device) -> None:
    assert dev.run([0x04, 0x10, 0, 0, 0, 0], bytes(4)).good
    assert dev.run([0x04, 0x30, 0, 0, 0, 0], bytes(8)).good  # long list header


@pytest.mark.parametrize(
    ("byte1", "params", "triple", "pointer"),
    [
        (0x40, b"", INVALID_FIELD_IN_CDB, 1),  # FMTPINFO
        (0x10, bytes(2), PARAMETER_LIST_LENGTH_ERROR, None),
        (0x10, bytes((0, 0x08, 0, 0)), INVALID_FIELD_IN_PARAMETER_LIST, 1),  # IP
        (0x10, bytes((0, 0x20, 0, 0)), INVALID_FIELD_IN_PARAMETER_LIST, 1),  # DCRT without FOV
        (0x10, bytes((0, 0, 0, 8)), INVALID_FIELD_IN_PARAMETER_LIST, 2),  # a defect list
        (0x30, bytes((0, 0, 0, 1)) + bytes(4), INVALID_FIELD_IN_PARAMETER_LIST, 3),  # PI
    ],
)
def test_format_unit_errors(
    dev: Device, byte1: int, params: bytes, triple: tuple[int, int, int], pointer: int | None
) -> None:
    r = dev.run([0x04, byte1, 0, 0, 0, 0], params)
    assert r.sense.triple == triple and r.sense.field_pointer == pointer
    assert mapped(dev)[0][2]  # nothing was erased


def test_format_unit_on_a_read_only_lun(dev: Device) -> None:
    dev.lun.read_only = True
    assert dev.run([0x04, 0, 0, 0, 0, 0]).sense.triple == WRITE_PROTECTED


# --- SANITIZE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [0x02, 0x03])
def test_sanitize_block_and_crypto_erase_deallocate(dev: Device, action: int) -> None:
    assert dev.run(sanitize(action)).good
    assert mapped(dev) == [(0, N * 512, False)]


def test_sanitize_overwrite_repeats_the_pattern(dev: Device) -> None:
    params = overwrite_params(b"\x12\x34\x56")
    assert dev.run(sanitize(0x01, len(params)), params).good
    block = (b"\x12\x34\x56" * 171)[:512]
    assert dev.read(0, 2) == block * 2 and dev.read(N - 1, 1) == block


def test_sanitize_overwrite_with_inversion_on_an_even_count(dev: Device) -> None:
    params = overwrite_params(b"\x0f", count=2, invert=True)
    assert dev.run(sanitize(0x01, len(params)), params).good
    assert dev.read(7, 1) == b"\xf0" * 512


def test_sanitize_overwrite_with_zeros_stays_mapped(dev: Device) -> None:
    params = overwrite_params(bytes(512))
    assert dev.run(sanitize(0x01, len(params)), params).good
    assert mapped(dev) == [(0, N * 512, True)]


def test_sanitize_overwrite_data_out_longer_than_the_list(dev: Device) -> None:
    params = overwrite_params(b"\xaa" * 5)
    assert dev.run(sanitize(0x01, len(params)), params + bytes(3)).good


@pytest.mark.parametrize(
    ("params", "length", "triple"),
    [
        (b"", 0, INVALID_FIELD_IN_CDB),
        (bytes(4), 4, INVALID_FIELD_IN_CDB),
        (bytes(520), 517, INVALID_FIELD_IN_CDB),
        (overwrite_params(b"x", count=0), 5, INVALID_FIELD_IN_PARAMETER_LIST),
        (bytes((1, 0, 0, 0)) + bytes(512), 516, INVALID_FIELD_IN_PARAMETER_LIST),
        (bytes((1, 0, 2, 4)) + bytes(512), 516, INVALID_FIELD_IN_PARAMETER_LIST),
        (bytes((0x21, 0, 0, 1, 0)), 5, INVALID_FIELD_IN_PARAMETER_LIST),  # TEST
        (overwrite_params(b"xy") + b"\0", 7, INVALID_FIELD_IN_PARAMETER_LIST),
        (overwrite_params(b"xy")[:3], 6, PARAMETER_LIST_LENGTH_ERROR),
    ],
)
def test_sanitize_overwrite_parameter_errors(
    dev: Device, params: bytes, length: int, triple: tuple[int, int, int]
) -> None:
    r = dev.run(sanitize(0x01, length), params)
    assert r.sense.triple == triple
    assert mapped(dev)[0][2]


@pytest.mark.parametrize("action", [0x00, 0x04, 0x10, 0x1E])
def test_sanitize_unknown_service_actions(dev: Device, action: int) -> None:
    r = dev.run(sanitize(action))
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.sks == bytes((0xCC, 0, 1))


@pytest.mark.parametrize("action", [0x02, 0x03, 0x1F])
def test_sanitize_actions_without_parameters_refuse_a_list(dev: Device, action: int) -> None:
    assert dev.run(sanitize(action, 8), bytes(8)).sense.field_pointer == 7


@pytest.mark.parametrize("i", range(2, 7))
def test_sanitize_reserved_bytes(dev: Device, i: int) -> None:
    reserved = bytearray(5)
    reserved[i - 2] = i
    r = dev.run(sanitize(0x02, reserved=bytes(reserved)))
    assert r.sense.triple == INVALID_FIELD_IN_CDB and r.sense.field_pointer == i


def test_sanitize_reserved_bit(dev: Device) -> None:
    assert dev.run(sanitize(0x02, byte1=0x40)).sense.sks == bytes((0xCE, 0, 1))


def test_sanitize_immed_and_ause_are_accepted(dev: Device) -> None:
    assert dev.run(sanitize(0x02, byte1=0xA0)).good


def test_sanitize_exit_failure_mode(dev: Device) -> None:
    assert dev.run(sanitize(0x1F)).good
    assert mapped(dev)[0][2]


def test_sanitize_on_a_write_protected_lun(dev: Device) -> None:
    dev.lun.swp = True
    assert dev.run(sanitize(0x02)).sense.triple == (0x07, 0x27, 0x02)
    params = overwrite_params(b"x")
    assert dev.run(sanitize(0x01, len(params)), params).sense.triple == (0x07, 0x27, 0x02)


# --- commands while a long operation runs --------------------------------------------------------


class PausingBackend(RamBackend):
    """Blocks in write_zeroes until released, so the test can look at the LUN meanwhile."""

    def __init__(self, size: int, granule: int) -> None:
        super().__init__(size, granule)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super().write_zeroes(offset, length, unmap)


def test_other_commands_are_not_ready_during_sanitize(dev: Device) -> None:
    dev.backend = PausingBackend(N * 512, 64 * 512)
    results = []
    worker = threading.Thread(target=lambda: results.append(dev.run(sanitize(0x02))))
    worker.start()
    assert dev.backend.entered.wait(10)
    try:
        r = dev.run([0, 0, 0, 0, 0, 0])
        assert r.sense.triple == (0x02, 0x04, 0x1B) and r.sense.sks is not None
        assert dev.run(cdb16(0x88, 0, 1), in_len=512).sense.triple == (0x02, 0x04, 0x1B)
        assert dev.run(sanitize(0x02)).sense.triple == (0x02, 0x04, 0x1B)
        assert dev.run([0x12, 0, 0, 0, 96, 0], in_len=96).good
        pending = dev.run([0x03, 0, 0, 0, 18, 0], in_len=18)
        assert parse_sense(pending.data).triple == (0x02, 0x04, 0x1B)
    finally:
        dev.backend.release.set()
        worker.join()
    assert results[0].good
    assert dev.run([0, 0, 0, 0, 0, 0]).good


def test_a_failed_long_operation_ends_the_not_ready_state(dev: Device) -> None:
    dev.backend.fail_next(ContainerWriteError("eio"))
    assert dev.run([0x04, 0, 0, 0, 0, 0]).sense.triple == (0x03, 0x0C, 0x00)
    assert dev.lun.operation is None and dev.run([0, 0, 0, 0, 0, 0]).good


def test_progress_moves_in_chunks(dev: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(longops, "ERASE_CHUNK", N * 512 // 4)
    seen: list[int] = []
    lun = dev.lun

    class Spy(RamBackend):
        def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
            op = lun.operation
            assert op is not None and op[0] == (0x02, 0x04, 0x04)
            seen.append(op[1])
            super().write_zeroes(offset, length, unmap)

    dev.backend = Spy(N * 512, 64 * 512)
    assert dev.run([0x04, 0, 0, 0, 0, 0]).good
    assert seen == [0, 0x4000, 0x8000, 0xC000]


def test_overwrite_progress_and_sense_constant() -> None:
    assert sn.SANITIZE_IN_PROGRESS == (0x02, 0x04, 0x1B)
