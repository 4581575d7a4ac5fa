from targetvirt import errors


def test_engine_errors_carry_sense_as_data() -> None:
    assert errors.sense_of(errors.PoolFull("pool p is full")) == (0x7, 0x27, 0x07)
    assert errors.sense_of(errors.ContainerWriteError("eio")) == (0x3, 0x0C, 0x00)
    assert errors.sense_of(errors.NotFound("no vdisk x")) is None
    assert errors.sense_of(ValueError()) is None


def test_scsi_error_helpers_fill_sense_specific_fields() -> None:
    e = errors.invalid_field_in_cdb(1, bit=5, why="RDPROTECT set")
    assert e.scsi_sense == (0x5, 0x24, 0x00)
    assert (e.field_pointer, e.bit, e.in_cdb) == (1, 5, True)
    assert "RDPROTECT" in str(e)
    m = errors.miscompare(4097)
    assert m.information == 4097 and m.scsi_sense.key == errors.MISCOMPARE
