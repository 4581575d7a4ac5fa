"""The ring loop's own cost per command: what the handler's ``tv-ring`` thread spends on a
plain 4 KiB READ or WRITE besides the I/O system call itself.

``bench.lun --cpu`` shows that on random I/O the handler's CPU is the ring thread's, and
that what it spends beyond tcmu-runner is user time: the interpreter.  This benchmark
isolates that part so a change to the loop can be judged in seconds, on the host or in
the guest, instead of by a noisy end-to-end fio run.

For each batch size k (commands the loop finds per wake-up) and direction, every round
queues k commands in the byte-exact kernel emulator (tests/tcmu_handler), then times one
``Device.serve_ready()``: fetch, SCSI decode, the table lookup of an agent's vdisk, the
preadv/pwritev into a container file, completion.  The emulator's own work (queueing,
reaping) is outside the timed part, and so are the poll, the uio read and the notify
system calls of the real loop.  The baseline, measured in the same run: the same number of
bare ``os.preadv``/``os.pwritev`` calls of 4 KiB on the container file, timed k at a time.

The table shows µs per command (medians over rounds), the loop over the bare calls, and
a fit of the loop's cost as a fixed part per wake-up plus a part per command (from the
smallest and largest k).  Every command must complete GOOD, or the run fails.

``python -m bench.ringloop [--batches 1,4,16] [--wakes 300] [--rounds 5] [--dir DIR] [--json]``
(in the guest: ``tools/vm exec -- sh -c 'cd TREE && .venv/bin/python -m bench.ringloop'``)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.common import dumps, table
from tcmu_handler.device import Device
from tcmu_handler.ring import Ring
from tcmu_handler.scsi.lun import LunState
from tests.targetvirt.cluster import Cluster
from tests.targetvirt.engine_model import SEG
from tests.tcmu_handler.kernel_emulator import KernelEmulator

BLOCK = 512
IO = 4096
# the vdisk: 32 segments of the test cluster's 64 KiB (2 MiB), every one mapped before
# timing; a lookup costs the same whatever the segment size
SEGMENTS = 32


class _NoNotify:
    """The device's uio handle: the benchmark reaps through the emulator itself, after
    the timed part."""

    def notify(self) -> None:
        pass


@dataclass
class Result:
    batch: int
    write: bool
    loop_us: float  # µs per command through serve_ready()
    bare_us: float  # µs per bare preadv/pwritev

    @property
    def name(self) -> str:
        return f"{'write' if self.write else 'read'}, {self.batch} per wake-up"


class Bench:
    """An agent's vdisk on a container file in ``workdir``, behind a Device on the
    kernel emulator."""

    def __init__(self, workdir: str) -> None:
        self.cluster = Cluster(workdir, vdisks={"v": SEGMENTS * SEG}, agents=1)
        vdisk = self.cluster.vd(0)
        for i in range(SEGMENTS):  # map every segment: the fast path's case
            vdisk.write_from(i * SEG, [memoryview(bytes(IO))], False)
        self.blocks = SEGMENTS * SEG // BLOCK
        # room for 16 commands of 4 KiB in flight: a 64 KiB ring, 128 data blocks
        self.kernel = KernelEmulator(cmdr_size=64 * 1024 - 128, data_blocks=128)
        lun = LunState(block_size=BLOCK, num_blocks=self.blocks, serial="bench",
                       naa=bytes([0x60]) + bytes(15))  # fmt: skip
        ring = Ring(self.kernel.buf)
        self.device = Device("bench", _NoNotify(), ring, lun, vdisk, workers=0)  # type: ignore[arg-type]
        self.container = os.open(os.path.join(workdir, "c0"), os.O_RDWR)
        self.rng = random.Random(7)
        self.payload = os.urandom(IO)

    def close(self) -> None:
        os.close(self.container)
        self.cluster.close()

    def _cdb(self, write: bool) -> bytes:
        lba = self.rng.randrange(0, self.blocks, IO // BLOCK)
        return struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, lba, 0, IO // BLOCK, 0)

    def loop(self, batch: int, write: bool, wakes: int) -> float:
        """Seconds per command through the loop."""
        kernel, serve, spent = self.kernel, self.device.serve_ready, 0.0
        for _ in range(wakes):
            for _ in range(batch):
                if write:
                    queued = kernel.submit(self._cdb(True), data_out=self.payload)
                else:
                    queued = kernel.submit(self._cdb(False), data_in=IO)
                if queued is None:
                    raise RuntimeError(f"the emulated ring has no room for {batch} commands")
            t0 = time.perf_counter()
            serve()
            spent += time.perf_counter() - t0
            done = kernel.notify()
            bad = [c for c in done if c.status != 0]
            if len(done) != batch or bad:
                raise RuntimeError(f"{len(done)} of {batch} commands completed; failed: {bad}")
        return spent / (wakes * batch)

    def bare(self, batch: int, write: bool, wakes: int) -> float:
        """Seconds per bare preadv/pwritev of 4 KiB on the container file."""
        fd, buf = self.container, bytearray(self.payload)
        call = os.pwritev if write else os.preadv
        span = SEGMENTS * SEG // IO
        spent = 0.0
        for _ in range(wakes):
            offsets = [SEG + self.rng.randrange(span) * IO for _ in range(batch)]
            t0 = time.perf_counter()
            for off in offsets:
                call(fd, (buf,), off)
            spent += time.perf_counter() - t0
        return spent / (wakes * batch)


def measure(batches: list[int], wakes: int, rounds: int, workdir: str) -> list[Result]:
    bench = Bench(workdir)
    try:
        results = []
        for batch in batches:
            for write in (False, True):
                loop, bare = [], []
                for _ in range(rounds):  # interleaved: a busy machine slows both alike
                    loop.append(bench.loop(batch, write, wakes))
                    bare.append(bench.bare(batch, write, wakes))
                results.append(Result(batch, write, statistics.median(loop) * 1e6,
                                      statistics.median(bare) * 1e6))  # fmt: skip
        return results
    finally:
        bench.close()


def fit(results: list[Result], write: bool) -> tuple[float, float] | None:
    """(µs fixed per wake-up, µs per command) of the loop, from the smallest and the
    largest batch; None without two batch sizes."""
    rs = sorted((r for r in results if r.write == write), key=lambda r: r.batch)
    if not rs or rs[0].batch == rs[-1].batch:
        return None
    lo, hi = rs[0], rs[-1]
    per_cmd = (hi.loop_us * hi.batch - lo.loop_us * lo.batch) / (hi.batch - lo.batch)
    return lo.loop_us * lo.batch - per_cmd * lo.batch, per_cmd


def report(results: list[Result]) -> str:
    rows = [[r.name, f"{r.loop_us:,.2f}", f"{r.bare_us:,.2f}", f"{r.loop_us - r.bare_us:,.2f}",
             f"{r.loop_us / r.bare_us:.1f}"] for r in results]  # fmt: skip
    out = table(["µs per command", "ring loop", "bare syscall", "loop - bare", "loop / bare"],
                rows)  # fmt: skip
    for write in (False, True):
        f = fit(results, write)
        if f is not None:
            out += (f"\n{'write' if write else 'read'}: the loop costs {f[0]:,.1f} µs per "
                    f"wake-up plus {f[1]:,.2f} µs per command")  # fmt: skip
    return out


def to_json(results: list[Result]) -> dict[str, Any]:
    data: dict[str, Any] = {
        f"{'write' if r.write else 'read'}_k{r.batch}": {
            "loop_us": round(r.loop_us, 3),
            "bare_us": round(r.bare_us, 3),
            "loop_vs_bare": round(r.loop_us / r.bare_us, 2),
        }
        for r in results
    }
    for write in (False, True):
        f = fit(results, write)
        if f is not None:
            data[f"{'write' if write else 'read'}_fit"] = {
                "per_wake_us": round(f[0], 2), "per_command_us": round(f[1], 3)
            }  # fmt: skip
    return data


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or any(not 1 <= k <= 16 for k in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be 1-16 (the ring's room): {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ringloop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--batches", type=batch_sizes, default=[1, 4, 16],
                    help="commands per wake-up, comma-separated, 1-16 (1,4,16)")  # fmt: skip
    ap.add_argument("--wakes", type=int, default=300, help="wake-ups per round (300)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per row; median (5)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the container file goes (default /dev/shm)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.wakes < 1 or args.rounds < 1:
        ap.error("--wakes and --rounds must be at least 1")
    workdir = tempfile.mkdtemp(prefix="ringloop-", dir=args.dir)
    try:
        results = measure(args.batches, args.wakes, args.rounds, workdir)
    except (OSError, RuntimeError) as e:
        print(f"bench.ringloop: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(dumps(to_json(results)) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
