"""Many threads on one LUN, as the device loop's workers will be."""

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from tcmu_handler.scsi import sense as sn

from .helpers import Device, caw, cdb16


def test_a_unit_attention_is_reported_exactly_once() -> None:
    dev = Device(num_blocks=64)
    dev.lun.resize(128)
    barrier = threading.Barrier(8)

    def tur() -> bool:
        barrier.wait()
        return dev.run(bytes(6)).status == 2

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda _: tur(), range(8))) == 1
    assert dev.lun.pending_unit_attentions == () and not dev.lun.gate


def test_compare_and_write_increments_do_not_get_lost() -> None:
    dev = Device(num_blocks=64)
    bs = dev.bs

    def increment(times: int) -> int:
        retries = 0
        done = 0
        while done < times:
            old = dev.read(0, 1)
            value = struct.unpack_from(">Q", old)[0]
            new = struct.pack(">Q", value + 1) + old[8:]
            r = dev.run(caw(0, 1), old + new)
            if r.good:
                done += 1
            else:
                assert r.sense.triple == (0x0E, 0x1D, 0x00)
                retries += 1
        return retries

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(increment, [200] * 4))
    assert struct.unpack_from(">Q", dev.read(0, 1))[0] == 800
    assert dev.read(0, 1)[8:] == bytes(bs - 8)


def test_orwrite_from_many_threads_sets_every_bit() -> None:
    dev = Device(num_blocks=64)
    bs = dev.bs

    def set_bit(bit: int) -> bool:
        mask = bytearray(bs)
        mask[bit // 8] = 1 << (bit % 8)
        return dev.run(cdb16(0x8B, 3, 1), bytes(mask)).good

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(set_bit, range(256)))
    assert dev.read(3, 1)[:32] == b"\xff" * 32


def test_sense_constants_are_what_initiators_expect() -> None:
    assert sn.CAPACITY_DATA_CHANGED == (0x06, 0x2A, 0x09)
    assert sn.SOFT_THRESHOLD_REACHED == (0x06, 0x38, 0x07)
    assert sn.MODE_PARAMETERS_CHANGED == (0x06, 0x2A, 0x01)
