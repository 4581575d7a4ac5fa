"""Cost of the emulation on the READ/WRITE hot path, against the bare minimum.

The baseline is what any handler must do per command: decode the CDB with a struct and
call the backend. The ratio says what the rest of ``handle()`` (dispatch, unit-attention
gate, range and buffer checks) adds. The backend does nothing, so only Python is timed.

    python -m tests.tcmu_handler.scsi.bench_handle [--json]

(Belongs in bench/ per HACKING.md; kept next to the tests until bench/ exists.)
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from collections.abc import Callable, Sequence

from tcmu_handler.scsi import LunState, handle


class NullBackend:
    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def write_from(self, offset: int, bufs: Sequence[memoryview], fua: bool) -> None:
        pass


def per_call(fn: Callable[[], object], n: int = 200_000, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lun = LunState.for_vdisk("12345678-1234-5678-1234-567812345678", 1 << 24)
    be = NullBackend()
    buf = [memoryview(bytearray(4096))]
    cdb10 = struct.Struct(">BBIBHB")
    read10 = cdb10.pack(0x28, 0, 1000, 0, 8, 0)
    write10 = cdb10.pack(0x2A, 0, 1000, 0, 8, 0)
    read16 = struct.pack(">BBQIBB", 0x88, 0, 1000, 8, 0, 0)
    inquiry = bytes((0x12, 0, 0, 0, 96, 0))
    cases = {
        "READ(10) 4 KiB": lambda: handle(lun, read10, [], buf, be),
        "WRITE(10) 4 KiB": lambda: handle(lun, write10, buf, [], be),
        "READ(16) 4 KiB": lambda: handle(lun, read16, [], buf, be),
        "INQUIRY": lambda: handle(lun, inquiry, [], buf, be),
    }
    baseline = per_call(lambda: (cdb10.unpack_from(read10), be.read_into(0, buf)))
    rows = {name: per_call(fn) for name, fn in cases.items()}
    if args.json:
        print(json.dumps({"baseline_ns": baseline * 1e9, **{k: v * 1e9 for k, v in rows.items()}}))
        return
    print(f"{'command':<18}{'ns/cmd':>10}{'x baseline':>12}")
    print(f"{'baseline':<18}{baseline * 1e9:>10.0f}{1.0:>12.2f}")
    for name, t in rows.items():
        print(f"{name:<18}{t * 1e9:>10.0f}{t / baseline:>12.2f}")


if __name__ == "__main__":
    main()
