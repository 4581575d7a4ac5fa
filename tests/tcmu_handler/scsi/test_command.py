import pytest

from targetvirt.errors import NotFound, StoreCorrupt
from tcmu_handler.scsi import Kind, classify
from tcmu_handler.scsi import sense as sn

from .helpers import INVALID_FIELD_IN_CDB, INVALID_OPCODE, Device, cdb10, parse_sense


@pytest.fixture
def dev() -> Device:
    return Device(num_blocks=1024)


@pytest.mark.parametrize(
    ("cdb", "kind"),
    [
        (bytes(6), Kind.INLINE),  # TEST UNIT READY
        (bytes((0x12, 0, 0, 0, 96, 0)), Kind.INLINE),
        (cdb10(0x28, 0, 1), Kind.IO),
        (cdb10(0x2A, 0, 1), Kind.IO),
        (bytes((0x9E, 0x10)) + bytes(14), Kind.INLINE),  # READ CAPACITY(16)
        (bytes((0x9E, 0x12)) + bytes(14), Kind.IO),  # GET LBA STATUS
        (bytes((0x48, 0x02)) + bytes(8), Kind.LONG),
        (bytes((0x04,)) + bytes(5), Kind.LONG),
        (bytes((0x15, 0x10, 0, 0, 24, 0)), Kind.IO),  # MODE SELECT may flush
        (bytes((0x83,)) + bytes(15), Kind.IO),  # EXTENDED COPY reads and writes
        (bytes((0x84, 0x03)) + bytes(14), Kind.INLINE),  # RECEIVE COPY RESULTS
        (bytes((0x9C,)) + bytes(15), Kind.INLINE),  # unsupported: answered inline
        (b"", Kind.INLINE),
        (b"\x9e", Kind.INLINE),
    ],
)
def test_classify(cdb: bytes, kind: Kind) -> None:
    assert classify(cdb) is kind


def test_inline_commands_never_call_the_backend(dev: Device) -> None:
    class Exploding:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"backend.{name} called by an inline command")

    dev.backend = Exploding()  # type: ignore[assignment]
    for cdb in (
        bytes(6),
        bytes((0x12, 1, 0xB0, 0, 255, 0)),
        bytes((0x1A, 0, 0x3F, 0, 255, 0)),
        bytes((0x25,)) + bytes(9),
        bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)),
        cdb10(0x34, 0, 1),
        bytes((0x84, 0x03)) + bytes(8) + bytes((0, 0, 1, 0, 0, 0)),
        bytes((0x12, 1, 0x8F, 0, 255, 0)),
    ):
        assert classify(cdb) is Kind.INLINE
        assert dev.run(cdb, in_len=256).status in (0, 2)


def test_empty_cdb(dev: Device) -> None:
    r = dev.run(b"")
    assert r.status == 2 and r.sense.triple == INVALID_FIELD_IN_CDB


@pytest.mark.parametrize("cdb", [b"\x28\x00\x00", b"\x88" + bytes(9), b"\x12\x01", b"\xa3\x0c"])
def test_short_cdbs_are_invalid_fields_not_crashes(dev: Device, cdb: bytes) -> None:
    r = dev.run(cdb, in_len=64)
    assert r.sense.triple == INVALID_FIELD_IN_CDB


def test_unknown_opcode(dev: Device) -> None:
    r = dev.run(bytes((0xC5,)) + bytes(11))
    assert r.sense.triple == INVALID_OPCODE and r.completion.read_len == 0


def test_targetvirt_errors_without_sense_are_internal_failures(
    dev: Device, caplog: pytest.LogCaptureFixture
) -> None:
    for error in (NotFound("no vdisk"), StoreCorrupt("bad checksum")):
        dev.backend.fail_next(error)
        r = dev.run(cdb10(0x28, 0, 1), in_len=512)
        assert r.sense.triple == (0x04, 0x44, 0x00)
    assert caplog.text.count("internal error") == 2


def test_unit_attention_in_descriptor_format_when_d_sense(dev: Device) -> None:
    dev.lun.d_sense = True
    dev.lun.resize(2048)
    r = dev.run(bytes(6))
    assert r.completion.sense == sn.build(sn.CAPACITY_DATA_CHANGED, descriptor=True)


def test_a_pending_unit_attention_reaches_read_and_write(dev: Device) -> None:
    dev.lun.queue_unit_attention(sn.MODE_PARAMETERS_CHANGED)
    r = dev.run(cdb10(0x28, 0, 1), in_len=512)
    assert r.sense.triple == (0x06, 0x2A, 0x01) and r.completion.read_len == 0
    assert r.raw == bytes([0xA5]) * 512  # nothing was read
    assert dev.run(cdb10(0x28, 0, 1), in_len=512).good


def test_the_operation_gate_reports_progress(dev: Device) -> None:
    dev.lun.begin_operation(sn.FORMAT_IN_PROGRESS)
    dev.lun.set_progress(3, 4)
    r = dev.run(cdb10(0x2A, 0, 1), b"x" * 512)
    assert r.sense.triple == (0x02, 0x04, 0x04) and r.sense.sks == bytes((0x80, 0xC0, 0x00))
    assert parse_sense(r.completion.sense).information is None


def test_report_luns_is_left_to_lio(dev: Device) -> None:
    assert dev.run(bytes((0xA0,)) + bytes(11), in_len=64).sense.triple == INVALID_OPCODE
