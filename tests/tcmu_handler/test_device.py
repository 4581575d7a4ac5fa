"""The device loop against the byte-exact kernel emulator, on the host.

The emulated kernel queues commands into the ring and signals an eventfd (the uio
event); the device's ``notify`` runs the kernel's completion walk, as the real uio write
does.  Checked: every command completes exactly once with the right data and status,
in whatever order the workers finish, and stopping completes what was in flight.
"""

from __future__ import annotations

import errno
import os
import random
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from targetvirt.errors import ContainerIOError
from tcmu_handler.device import Device
from tcmu_handler.ring import Ring
from tcmu_handler.scsi import handle
from tcmu_handler.scsi import sense as sn
from tcmu_handler.scsi.backend import RamBackend
from tcmu_handler.scsi.lun import LunState
from tests.targetvirt.cluster import Cluster
from tests.targetvirt.engine_model import SEG, open_catalog
from tests.tcmu_handler.kernel_emulator import KernelCompletion, KernelEmulator

BLOCK = 512


class EmulatedUio:
    """A UioHandle over the emulator: eventfd for kernel events, notify = reap."""

    def __init__(self, kernel: KernelEmulator) -> None:
        self.kernel = kernel
        self.lock = threading.Lock()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.done: dict[int, KernelCompletion] = {}
        self.arrived = threading.Condition(self.lock)
        self.closed = False

    def fileno(self) -> int:
        return self.efd

    def take_event(self) -> int | None:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return None

    def notify(self) -> None:
        with self.lock:
            for c in self.kernel.notify():
                self.done[c.tag] = c
            self.arrived.notify_all()

    def close(self) -> None:
        self.closed = True
        os.close(self.efd)

    def submit(self, cdb: bytes, **kw: object) -> int:
        while True:
            with self.lock:
                cmd = self.kernel.submit(cdb, **kw)  # type: ignore[arg-type]
                if cmd is not None:
                    os.eventfd_write(self.efd, 1)
                    return cmd.tag
                # ring or data area full: wait for completions, as the kernel's qfull would
                self.arrived.wait(1.0)

    def wait_all(self, tags: list[int], timeout: float = 30.0) -> list[KernelCompletion]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(t in self.done for t in tags):
                assert time.monotonic() < deadline, (
                    f"{sum(t not in self.done for t in tags)} missing"
                )
                self.arrived.wait(0.5)
            return [self.done[t] for t in tags]


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def make_device(backend: object, blocks: int) -> tuple[Device, EmulatedUio]:
    kernel = KernelEmulator(cmdr_size=64 * 1024 - 128, data_blocks=128)
    uio = EmulatedUio(kernel)
    lun = LunState(block_size=BLOCK, num_blocks=blocks, serial="t", naa=bytes([0x60]) + bytes(15))
    device = Device("emu", uio, Ring(kernel.buf), lun, backend, workers=3)  # type: ignore[arg-type]
    return device, uio


def test_random_reads_and_writes_complete_with_the_right_data() -> None:
    blocks = 2048
    device, uio = make_device(RamBackend(blocks * BLOCK), blocks)
    device.start()
    rng = random.Random(3)
    model = bytearray(blocks * BLOCK)
    try:
        for _ in range(20):
            tags = []
            writes: list[tuple[int, int, bytes]] = []
            lbas = rng.sample(range(0, blocks - 16, 16), 12)  # disjoint within a batch
            for lba in lbas:
                n = rng.randint(1, 16)
                data = rng.randbytes(n * BLOCK)
                tags.append(uio.submit(write10(lba, n), data_out=data))
                writes.append((lba, n, data))
            for c in uio.wait_all(tags):
                assert c.status == 0, c
            for lba, n, data in writes:
                model[lba * BLOCK : (lba + n) * BLOCK] = data
            reads = [(lba, rng.randint(1, 16)) for lba in rng.sample(range(blocks - 16), 12)]
            tags = [uio.submit(read10(lba, n), data_in=n * BLOCK) for lba, n in reads]
            for (lba, n), c in zip(reads, uio.wait_all(tags), strict=True):
                assert c.status == 0
                assert c.data_in == bytes(model[lba * BLOCK : (lba + n) * BLOCK])
        inq = uio.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
        (c,) = uio.wait_all([inq])
        assert c.status == 0 and c.data_in is not None and c.data_in[8:16] == b"TGTVIRT "
    finally:
        device.stop()
    assert uio.kernel.broken is None
    assert not uio.kernel.commands  # everything fetched was completed


def test_the_loop_and_its_workers_carry_kernel_names_while_they_run() -> None:
    """So that ``top -H`` and ``bench --cpu`` tell the ring loop from the workers."""
    device, _ = make_device(RamBackend(64 * BLOCK), 64)
    device.start()
    want = ["tv-io", "tv-io", "tv-io", "tv-ring"]
    deadline = time.monotonic() + 10
    try:
        while True:  # each thread names itself once it runs
            names = sorted(
                Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip()
                for t in device._threads
            )
            if names == want or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        device.stop()
    assert names == want


def test_errors_come_back_as_check_condition_with_sense() -> None:
    device, uio = make_device(RamBackend(64 * BLOCK), 64)
    device.start()
    try:
        (c,) = uio.wait_all([uio.submit(read10(100, 1), data_in=BLOCK)])
        assert c.status == 2 and c.sense is not None
        assert (c.sense[2] & 0xF, c.sense[12], c.sense[13]) == (5, 0x21, 0)  # LBA out of range
    finally:
        device.stop()


def test_serves_an_engine_vdisk_through_its_table(tmp_path: Path) -> None:
    catalog = open_catalog(str(tmp_path / "meta.db"))
    catalog.create_pool("p", str(tmp_path / "c0"), 9 << 20)
    vdisk = catalog.create_vdisk("v", "p", 4 << 20)
    device, uio = make_device(vdisk, (4 << 20) // BLOCK)
    device.start()
    try:
        data = os.urandom(64 * 1024)
        (w,) = uio.wait_all([uio.submit(write10(2040, 128), data_out=data)])  # straddles 1 MiB
        assert w.status == 0
        assert vdisk.read(2040 * BLOCK, len(data)) == data
        (r,) = uio.wait_all([uio.submit(read10(2040, 128), data_in=len(data))])
        assert r.data_in == data
        # a one-segment read of mapped data is served inline by the ring thread
        hits = device.inline_hits
        (r,) = uio.wait_all([uio.submit(read10(2048, 8), data_in=4096)])
        assert r.data_in == data[4096:8192] and device.inline_hits == hits + 1
        # an unallocated segment needs a fault: a worker does it, the result is the same
        (w,) = uio.wait_all([uio.submit(write10(6000, 8), data_out=b"x" * 4096)])
        assert w.status == 0 and vdisk.read(6000 * BLOCK, 4096) == b"x" * 4096
        assert device.inline_hits == hits + 1
    finally:
        device.stop()
        catalog.close()


class Network(RamBackend):
    """A vdisk on RADOS, as the loop sees it: plain reads and writes are started
    (``start_io``) and end later, when the test says, in any order and from another
    thread, as librados calls back.  Everything else runs the blocking way."""

    waits_on_network = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.lock = threading.Lock()
        self.started: list[tuple[int, list[memoryview], bool, Callable[[bool], None]]] = []
        self.blocking: list[int] = []  # offsets of reads and writes done the blocking way

    def start_io(
        self, offset: int, bufs: list[memoryview], write: bool, done: Callable[[bool], None]
    ) -> bool:
        with self.lock:
            self.started.append((offset, list(bufs), write, done))
        return True

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.blocking.append(offset)
        super().read_into(offset, bufs)

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        self.blocking.append(offset)
        super().write_from(offset, bufs, fua)

    def wait_started(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while len(self.started) < n:
            assert time.monotonic() < deadline, f"{len(self.started)} of {n} started"
            time.sleep(0.01)

    def end_all(self, rng: random.Random, failed: int | None = None) -> None:
        """End every started I/O in a random order; the one at ``failed`` reports a
        failure, and the blocking retry that follows meets a medium error."""
        with self.lock:
            ios, self.started = self.started, []
        rng.shuffle(ios)
        ios.sort(key=lambda io: io[0] == failed)  # the failure last: fail_next is for it
        for offset, bufs, write, done in ios:
            if offset == failed:
                self.fail_next(ContainerIOError("injected: the OSD is gone"))
                done(False)
                continue
            if write:
                RamBackend.write_from(self, offset, bufs, False)
            else:
                RamBackend.read_into(self, offset, bufs)
            done(True)


class NetworkAgent(Network):
    """Network as an agent's vdisk on RADOS has it: with the non-blocking file calls,
    which never apply (its segments have no file descriptor)."""

    def try_read_into(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        return False

    def try_write_from(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        return False


@pytest.mark.parametrize("kind", [Network, NetworkAgent])
def test_a_vdisk_on_the_network_has_its_reads_and_writes_started_by_the_loop(
    kind: type[Network],
) -> None:
    """Plain READs and WRITEs of a RADOS-backed vdisk hold no worker: the loop starts
    them and they complete in the order they end.  A failed one is run again the
    blocking way, which names the error; FUA and range errors never start."""
    blocks = 2048
    backend = kind(blocks * BLOCK)
    device, uio = make_device(backend, blocks)
    device.start()
    rng = random.Random(5)
    try:
        datas = {lba: rng.randbytes(8 * BLOCK) for lba in range(0, 16 * 64, 64)}
        tags = [uio.submit(write10(lba, 8), data_out=d) for lba, d in datas.items()]
        backend.wait_started(len(tags))
        assert not any(t in uio.done for t in tags)  # none complete before its I/O ends
        backend.end_all(rng)
        assert all(c.status == 0 for c in uio.wait_all(tags))
        for lba, d in datas.items():
            assert backend.data[lba * BLOCK : (lba + 8) * BLOCK] == d
        reads = list(datas)
        tags = [uio.submit(read10(lba, 8), data_in=8 * BLOCK) for lba in reads]
        backend.wait_started(len(tags))
        backend.end_all(rng, failed=reads[3] * BLOCK)
        for lba, c in zip(reads, uio.wait_all(tags), strict=True):
            if lba == reads[3]:
                assert c.status == 2 and c.sense is not None
                assert (c.sense[2] & 0xF, c.sense[12]) == (3, 0x11)  # MEDIUM ERROR
            else:
                assert (c.status, c.data_in) == (0, datas[lba])
        assert backend.blocking == [reads[3] * BLOCK]  # only the failure was done again
        fua = struct.pack(">BBIBHB", 0x2A, 0x08, 0, 0, 1, 0)
        (c,) = uio.wait_all([uio.submit(fua, data_out=b"f" * BLOCK)])
        (r,) = uio.wait_all([uio.submit(read10(blocks, 1), data_in=BLOCK)])
        assert c.status == 0 and backend.blocking[-1] == 0  # FUA: the blocking way
        assert r.status == 2 and not backend.started  # out of range: nothing started
        assert device.started == 2 * len(datas)
        tag = uio.submit(read10(7, 1), data_in=BLOCK)
        backend.wait_started(1)
        stopper = threading.Thread(target=device.stop)
        stopper.start()
        stopper.join(0.2)
        assert stopper.is_alive()  # stop waits for what is started
        backend.end_all(rng)
        stopper.join(10)
        assert not stopper.is_alive() and uio.wait_all([tag])[0].status == 0
    finally:
        if device._threads and device._threads[-1].is_alive():
            backend.end_all(rng)
            device.stop()
    assert uio.kernel.broken is None and not uio.kernel.commands


@pytest.mark.ceph
def test_an_agent_vdisk_on_rados_is_served_by_started_io(
    tmp_path: Path, rados_location: str
) -> None:
    """The real thing: the agent's copy of a vdisk whose segments are RADOS objects,
    librados calling back into the ring's pages.  Random 4 KiB writes and reads at
    queue depth 16 read back what was written, and the loop started them itself."""
    cluster = Cluster(str(tmp_path), vdisks={"v": 4 * SEG}, agents=1,
                      location=lambda i: rados_location)  # fmt: skip
    vd = cluster.vd(0)
    for i in range(4):
        vd.write_from(i * SEG, [memoryview(b"\0" * 4096)], False)  # map every segment
    blocks = 4 * SEG // BLOCK
    device, uio = make_device(vd, blocks)
    device.start()
    rng = random.Random(9)
    model = bytearray(4 * SEG)
    try:
        for _ in range(8):
            lbas = rng.sample(range(0, blocks, 8), 16)
            datas = [rng.randbytes(4096) for _ in lbas]
            tags = [
                uio.submit(write10(lba, 8), data_out=d) for lba, d in zip(lbas, datas, strict=True)
            ]
            assert all(c.status == 0 for c in uio.wait_all(tags))
            for lba, d in zip(lbas, datas, strict=True):
                model[lba * BLOCK : lba * BLOCK + 4096] = d
            lbas = rng.sample(range(0, blocks, 8), 16)
            tags = [uio.submit(read10(lba, 8), data_in=4096) for lba in lbas]
            for lba, c in zip(lbas, uio.wait_all(tags), strict=True):
                assert (c.status, c.data_in) == (0, bytes(model[lba * BLOCK : lba * BLOCK + 4096]))
        assert device.started == 8 * 32
    finally:
        device.stop()
        cluster.close()
    assert uio.kernel.broken is None and not uio.kernel.commands


def test_stop_completes_in_flight_commands() -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)

    class Held(RamBackend):
        def read_into(self, offset: int, bufs: object) -> None:
            started.release()
            gate.wait(10)  # a slow medium: the read finishes only when the test says so
            super().read_into(offset, bufs)  # type: ignore[arg-type]

    device, uio = make_device(Held(64 * BLOCK), 64)
    device.start()
    tags = [uio.submit(read10(i, 1), data_in=BLOCK) for i in range(3)]
    for _ in range(3):  # all three are in the workers' hands
        assert started.acquire(timeout=10)
    stopper = threading.Thread(target=device.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # stop waits for the in-flight reads
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert all(c.status == 0 for c in uio.wait_all(tags, timeout=5))


def test_a_removed_device_ends_its_loop_quietly() -> None:
    """uio answers EIO once the kernel unregisters the device (before REMOVED_DEVICE
    arrives): the loop ends without a traceback, in-flight work is completed, and the
    service's stop afterwards still closes it."""
    gate = threading.Event()
    started = threading.Semaphore(0)

    class Held(RamBackend):
        def read_into(self, offset: int, bufs: object) -> None:
            started.release()
            gate.wait(10)
            super().read_into(offset, bufs)  # type: ignore[arg-type]

    device, uio = make_device(Held(64 * BLOCK), 64)
    errors: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,arg-type]
    try:
        device.start()
        tag = uio.submit(read10(0, 1), data_in=BLOCK)
        assert started.acquire(timeout=10)

        def gone() -> int | None:
            raise OSError(errno.EIO, "Input/output error")

        uio.take_event = gone  # type: ignore[method-assign]
        os.eventfd_write(uio.efd, 1)
        loop = next(t for t in device._threads if t.name.endswith("-ring"))
        loop.join(0.5)
        assert loop.is_alive()  # it waits for the read it handed out
        gate.set()
        loop.join(10)
        assert not loop.is_alive() and errors == []
        assert uio.wait_all([tag], timeout=5)[0].status == 0
        device.stop()
        assert uio.closed
    finally:
        threading.excepthook = old_hook


def test_commands_queued_before_start_complete_before_the_loop_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inline commands found at start (queued before the daemon opened the device, e.g. the
    TEST UNIT READYs of initiators after a restart) are completed before the loop first
    sleeps: its poll has no timeout, and no event may ever come for them."""
    import tcmu_handler.device as device_module  # noqa: PLC0415

    device, uio = make_device(RamBackend(64 * BLOCK), 64)
    queued = uio.kernel.submit(bytes(6))  # TEST UNIT READY, runs inline; no uio event
    assert queued is not None
    tag = queued.tag
    done_before_first_wait: list[bool] = []
    real_poll = select.poll

    class Poller:
        def __init__(self) -> None:
            self.inner = real_poll()

        def register(self, fd: int, mask: int) -> None:
            self.inner.register(fd, mask)

        def poll(self, timeout: int | None = None) -> list[tuple[int, int]]:
            if not done_before_first_wait:
                with uio.lock:
                    done_before_first_wait.append(tag in uio.done)
            return self.inner.poll(timeout)

    monkeypatch.setattr(device_module.select, "poll", Poller)
    device.start()
    try:
        (c,) = uio.wait_all([tag])
        assert c.status == 0
    finally:
        device.stop()
    assert done_before_first_wait == [True]


class HalfFast(RamBackend):
    """A backend with the agent's non-blocking calls, which succeed in even 4 KiB
    granules only (as the agent's do for private, mapped segments): the loop must serve
    those itself and give the others to a worker."""

    def __init__(self, size: int) -> None:
        super().__init__(size, granule=4096)
        self.fast = 0

    def try_read_into(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        if len(bufs) != 1 or offset // self.granule % 2:
            return False
        self.read_into(offset, bufs)
        self.fast += 1
        return True

    def try_write_from(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        if len(bufs) != 1 or offset // self.granule % 2:
            return False
        self.write_from(offset, bufs, False)
        self.fast += 1
        return True


class HalfFastBatch(HalfFast):
    """HalfFast that also takes a wake-up's plain transfers together, as the agent does,
    and records how many each call carried."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.batches: list[int] = []

    def try_batch(self, batch: Sequence[tuple[bool, int, memoryview]]) -> list[bool]:
        self.batches.append(len(batch))
        return [
            (self.try_write_from if write else self.try_read_into)(offset, [buf])
            for write, offset, buf in batch
        ]


def test_plain_commands_of_one_wake_up_reach_the_backend_in_one_call() -> None:
    """The loop hands the plain READs/WRITEs it finds together to ``try_batch``; a command
    the loop must run through the emulation ends a batch first (ring order for what the
    loop does itself), and those the backend declines go to a worker."""
    blocks = 64
    backend = HalfFastBatch(blocks * BLOCK)
    device, uio = make_device(backend, blocks)
    model = bytearray(blocks * BLOCK)
    tags, reads = [], {}
    for i, lba in enumerate([0, 8, 16, 24, 32, -1, 40, 48, 56, 8]):
        if lba < 0:  # a read with a residual: not plain, the emulation runs it in the loop
            reads[uio.submit(read10(16, 8), data_in=4096 + BLOCK)] = 16
        elif i % 2:
            reads[uio.submit(read10(lba, 8), data_in=4096)] = lba
        else:
            data = bytes([i + 1]) * 4096
            tags.append(uio.submit(write10(lba, 8), data_out=data))
            model[lba * BLOCK : (lba + 8) * BLOCK] = data
    device.start()  # queued before start: one fetch finds them all
    try:
        done = uio.wait_all(tags + list(reads))
    finally:
        device.stop()
    assert backend.batches == [5, 4]
    assert all(c.status == 0 for c in done)
    for c, lba in zip(done[len(tags) :], reads.values(), strict=True):
        assert c.data_in is not None and c.data_in[:4096] == model[lba * BLOCK : lba * BLOCK + 4096]
    assert backend.data == model
    assert backend.fast == 5  # even granules (LBA 0, 16, 32, 48) and the residual read


RW_OPS = [0x28, 0x2A, 0x88, 0x8A]
rw_command = st.tuples(
    st.just("cmd"),
    st.sampled_from(RW_OPS),
    st.sampled_from([0, 0, 0, 0x08, 0x10, 0x20, 0x80]),  # flags: none, FUA, DPO, protection
    st.integers(0, 7).map(lambda i: 8 * i) | st.integers(0, 70),  # LBA (64 blocks)
    st.sampled_from([8, 8, 8, 1, 2, 4]) | st.integers(0, 16),  # blocks
    st.sampled_from([0, 0, 0, -BLOCK, BLOCK, -1]),  # buffer length minus the transfer
)
lun_change = st.one_of(
    st.tuples(st.just("ua")),
    st.tuples(st.just("wce"), st.booleans()),
    st.tuples(st.just("read_only"), st.booleans()),
)


@pytest.mark.parametrize("kind", [HalfFast, HalfFastBatch])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.one_of(rw_command, rw_command, rw_command, lun_change), min_size=4, max_size=25
    )
)
def test_reads_and_writes_answer_as_the_emulation_does_whichever_path_runs_them(
    kind: type[HalfFast],
    steps: list[tuple],  # type: ignore[type-arg]
) -> None:
    """Commands through the loop (served by the loop itself when plain and fast, by the
    emulation or a worker otherwise) get the status, sense and data that ``handle`` gives
    on a reference LUN and disk, one command at a time; with the single calls and with
    ``try_batch``."""
    blocks = 64
    backend = kind(blocks * BLOCK)
    device, uio = make_device(backend, blocks)
    model_lun = LunState(block_size=BLOCK, num_blocks=blocks, serial="t", naa=device.lun.naa)
    model = RamBackend(blocks * BLOCK, granule=4096)
    rng = random.Random(len(steps))
    device.start()
    try:
        for step in steps:
            if step[0] != "cmd":
                for lun in (device.lun, model_lun):
                    if step[0] == "ua":
                        lun.queue_unit_attention(sn.MODE_PARAMETERS_CHANGED)
                    elif step[0] == "wce":
                        lun.write_cache_enabled = step[1]
                    else:
                        lun.read_only = step[1]
                continue
            _, op, flags, lba, n, delta = step
            cdb = (
                struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)
                if op < 0x80
                else struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)
            )
            length = max(1, n * BLOCK + delta)
            write = op in (0x2A, 0x8A)
            data = rng.randbytes(length)
            buf = bytearray(data if write else length)
            want = handle(model_lun, cdb, [memoryview(buf)], [memoryview(buf)], model)
            kw = {"data_out": data} if write else {"data_in": length}
            (got,) = uio.wait_all([uio.submit(cdb, **kw)])
            assert got.status == want.status, (cdb.hex(), got, want)
            if want.sense:
                assert got.sense is not None and got.sense[: len(want.sense)] == want.sense
            if not write and want.status == 0:
                valid = length if want.read_len is None else want.read_len
                assert got.data_in is not None and got.data_in[:valid] == bytes(buf[:valid])
        assert backend.data == model.data
    finally:
        device.stop()
    event(f"served by the loop itself: {'some' if backend.fast else 'none'}")
    assert uio.kernel.broken is None and not uio.kernel.commands
