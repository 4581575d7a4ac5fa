"""The kernel emulator's own behaviour, driven by raw byte writes (no Ring), so the ring
tests can trust it to catch what the real kernel would punish."""

from __future__ import annotations

import struct

import pytest

from tests.tcmu_handler.kernel_emulator import KernelEmulator, KernelViolation

READ10 = bytes.fromhex("28000000000000000800")


def respond(emu: KernelEmulator, ring_off: int, cmd_id: int, status: int = 0) -> None:
    """What a handler writes for one in-order completion, by hand."""
    ent = 128 + ring_off
    struct.pack_into("<H", emu.buf, ent + 4, cmd_id)
    struct.pack_into("<B", emu.buf, ent + 8, status)
    length = struct.unpack_from("<I", emu.buf, ent)[0] & ~7
    struct.pack_into("<I", emu.buf, 64, (ring_off + length) % emu.cmdr_size)


def test_mailbox_is_laid_out_like_tcmu_configure_device() -> None:
    emu = KernelEmulator()
    assert struct.unpack_from("<HHIII", emu.buf, 0) == (2, 0x0F, 128, 3968, 0)
    assert len(emu.buf) == 128 + 3968 + 32 * 4096 and emu.data_off == 4096


def test_unknown_id_breaks_the_ring() -> None:
    emu = KernelEmulator()
    k = emu.submit(READ10, data_in=512)
    assert k is not None
    respond(emu, 0, k.cmd_id + 1)
    assert emu.notify() == [] and emu.broken is not None and "not found" in emu.broken
    assert emu.submit(READ10, data_in=512) is None  # a broken ring takes nothing more


def test_double_completion_breaks_the_ring() -> None:
    emu = KernelEmulator()
    a, b = emu.submit(bytes(6)), emu.submit(bytes(6))
    assert a and b
    respond(emu, a.ring_offset, a.cmd_id)
    assert [d.tag for d in emu.notify()] == [a.tag]
    respond(emu, b.ring_offset, a.cmd_id)  # a again, in b's slot
    emu.notify()
    assert emu.broken is not None


def test_tail_inside_an_entry_or_past_head_is_a_violation() -> None:
    emu = KernelEmulator()
    emu.submit(bytes(6))
    struct.pack_into("<I", emu.buf, 64, 8)
    with pytest.raises(KernelViolation, match="boundary"):
        emu.notify()
    struct.pack_into("<I", emu.buf, 64, 240)
    with pytest.raises(KernelViolation, match="beyond"):
        emu.notify()


def test_ring_full_and_data_full_return_none() -> None:
    emu = KernelEmulator(cmdr_size=256, data_blocks=2)
    assert emu.submit(READ10, data_in=4096) is not None  # 128 bytes of 256
    assert emu.submit(READ10, data_in=4096) is None  # 1 byte must stay free
    emu2 = KernelEmulator(data_blocks=2)
    assert emu2.submit(READ10, data_in=8192) is not None
    assert emu2.submit(READ10, data_in=1) is None and emu2.blocks_in_use() == 2


def test_ids_are_lowest_free_and_reused() -> None:
    emu = KernelEmulator()
    a, b = emu.submit(bytes(6)), emu.submit(bytes(6))
    assert a and b and (a.cmd_id, b.cmd_id) == (1, 2)
    respond(emu, a.ring_offset, a.cmd_id)
    emu.notify()
    c = emu.submit(bytes(6))
    assert c is not None and c.cmd_id == 1  # xa_alloc: lowest free id


def test_reused_blocks_keep_stale_bytes_and_fresh_ones_are_zero() -> None:
    emu = KernelEmulator(data_blocks=2)
    w = emu.submit(bytes.fromhex("2a000000000000000800"), data_out=b"\xaa" * 4096)
    assert w is not None
    assert emu.buf[emu.data_off + 4096] == 0xEE  # never allocated yet
    respond(emu, w.ring_offset, w.cmd_id)
    emu.notify()
    r = emu.submit(READ10, data_in=8192)
    assert r is not None and r.iovs == [(emu.data_off, 8192)]
    assert emu.buf[emu.data_off] == 0xAA  # stale, reused without zeroing
    assert emu.buf[emu.data_off + 4096] == 0  # zeroed on first allocation


def test_reset_ring_finishes_everything_with_busy() -> None:
    emu = KernelEmulator()
    k = emu.submit(READ10, data_in=512)
    respond(emu, 0, 999)
    emu.notify()
    why = emu.broken
    assert why is not None and k is not None
    assert emu.reset_ring() == [k.tag]
    assert (emu.cmd_head, emu.cmd_tail, emu.broken, emu.blocks_in_use()) == (0, 0, None, 0)
    assert emu.completions[-1].status == 0x08
