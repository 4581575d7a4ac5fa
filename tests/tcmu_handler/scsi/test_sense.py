from targetvirt import errors
from targetvirt.errors import Sense
from tcmu_handler.scsi import sense as sn


def test_fixed_sense_is_18_bytes_with_key_asc_ascq() -> None:
    assert sn.build(Sense(0x05, 0x21, 0x00)) == bytes.fromhex(
        "700005000000000a000000002100000000 00".replace(" ", "")
    )


def test_fixed_sense_information_sets_valid() -> None:
    data = sn.build(Sense(0x0E, 0x1D, 0x00), information=0x1234)
    assert data == bytes.fromhex("f0000e000012340a000000001d0000000000")


def test_information_beyond_32_bits_is_not_valid_in_fixed_format() -> None:
    data = sn.build(Sense(0x0E, 0x1D, 0x00), information=1 << 32)
    assert data[0] == 0x70 and data[3:7] == bytes(4)


def test_field_pointer_in_cdb_with_bit_pointer() -> None:
    data = sn.from_error(errors.invalid_field_in_cdb(1, 7, "RDPROTECT"))
    # SKSV | C/D | BPV | bit 7, field pointer 0001h
    assert data[15:18] == bytes((0xCF, 0x00, 0x01))
    assert data[2] == 0x05 and data[12:14] == b"\x24\x00"


def test_field_pointer_in_parameter_list_without_bit() -> None:
    data = sn.from_error(errors.invalid_field_in_parameter_list(0x102))
    assert data[15:18] == bytes((0x80, 0x01, 0x02))


def test_progress_indication() -> None:
    data = sn.build(sn.SANITIZE_IN_PROGRESS, sks=sn.progress_sks(0x8000))
    assert data == bytes.fromhex("700002000000000a00000000041b00808000")


def test_progress_is_clamped() -> None:
    assert sn.progress_sks(0x12345) == bytes((0x80, 0xFF, 0xFF))
    assert sn.progress_sks(-1) == bytes((0x80, 0, 0))


def test_descriptor_sense_with_information_and_sks() -> None:
    data = sn.build(
        Sense(0x0E, 0x1D, 0x00), information=1 << 40, sks=bytes((0xC0, 0, 2)), descriptor=True
    )
    assert data == bytes.fromhex(
        "720e1d0000000014"  # header: 20 bytes of descriptors follow
        "000a80000000010000000000"  # information descriptor, VALID
        "02060000c0000200"  # sense-key specific descriptor
    )


def test_descriptor_sense_without_descriptors() -> None:
    assert sn.build(Sense(0x06, 0x2A, 0x09), descriptor=True) == bytes.fromhex("72062a0900000000")


def test_to_descriptor_keeps_information_and_sks() -> None:
    fixed = sn.from_error(errors.miscompare(77))
    desc = sn.to_descriptor(fixed)
    assert desc[:4] == bytes((0x72, 0x0E, 0x1D, 0x00))
    assert desc[8:20] == bytes.fromhex("000a8000000000000000004d")
