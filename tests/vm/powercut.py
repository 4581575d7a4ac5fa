"""Guest side of the power-cut test (tests/vm/test_powercut.py): runs INSIDE the guest.

    python -m tests.vm.powercut write DIR LOG [SIZE]
        write DIR/f00000, f00001, ... (SIZE bytes of random data each, default 8 KiB, at
        most PACE files a second so that a fast guest does not fill the filesystem):
        each file is fsynced, then its folder, and only then its name, size and sha256
        go to LOG (a line, fsynced): every line in LOG names a file the filesystem
        acknowledged as durable.  Runs until killed (or the guest is reset).
    python -m tests.vm.powercut verify ROOT LOG [LOG...]
        check every file named in the LOGs (relative to ROOT) against its line; prints
        one JSON document: {"verified": N, "bad": [...]}.
    python -m tests.vm.powercut daemon TRAP ARM NOTE -- DAEMON-ARGS...
        targetvirt-handler (targetvirt.manage.daemon) with a power-cut trap: once the file
        ARM exists, the trap resets the guest (sysrq b) at a chosen point inside an
        operation, after writing what it cut into NOTE (on the shared results folder).

Traps, ``POINT:N`` (the Nth time the point is reached once armed; ``none`` for none):

    copy-before   a snapshot or clone is in memory (table copied, refcounts raised, the
                  source frozen), its store commit not yet made
    copy-after    the snapshot or clone is durable, the source still frozen
    repoint-before  a segment's data is copied to its new place, no table points there yet
    repoint-after   every table points at the new place in memory, not yet durable

``migrate-`` in front of a repoint trap also starts a migrator in the daemon: once armed,
it moves every mapped segment of vdisk $TV_MIGRATE_VDISK to the other container of its
pool, one by one, over and over (the shell has no single-segment migration; the
controller's ``migrate`` is what evacuation and future rebalancing use).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHUNK = 8192
PACE = 20.0  # files per second at most


def _append_durably(log: int, line: str) -> None:
    os.write(log, line.encode())
    os.fsync(log)


def write(folder: Path, log_path: Path, size: int = CHUNK) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(1_000_000):
        name = f"f{i:05d}"
        data = os.urandom(size)
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(dfd)  # the name is durable too, not only the data
        _append_durably(log, f"{folder.name}/{name} {size} {hashlib.sha256(data).hexdigest()}\n")
        time.sleep(1 / PACE)


def recorded(log_path: Path) -> list[tuple[str, int, str]]:
    """The complete lines of a writer's log (a torn last line names nothing)."""
    text = log_path.read_text()
    lines = text.split("\n")[:-1]  # what follows the last newline is torn
    out = []
    for line in lines:
        name, size, digest = line.split()
        out.append((name, int(size), digest))
    return out


def verify(root: Path, logs: list[Path]) -> dict[str, Any]:
    verified, bad = 0, []
    for log in logs:
        for name, size, digest in recorded(log):
            try:
                data = (root / name).read_bytes()
            except OSError as e:
                bad.append(f"{name}: {e.strerror}")
                continue
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                bad.append(f"{name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
            else:
                verified += 1
    return {"verified": verified, "bad": bad}


# --- the daemon with a trap --------------------------------------------------------------------


def cut(note: Path, why: str) -> None:
    """Reset the guest now, as a power cut would: no sync, no unmount, no shutdown."""
    with open(note, "a") as f:
        f.write(f"cut: {why}\n")
        f.flush()
        os.fsync(f.fileno())
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("b")
    time.sleep(600)  # the reset takes effect at once; nothing after it may run


class Trap:
    def __init__(self, spec: str, arm: Path, note: Path) -> None:
        point, _, n = spec.removeprefix("migrate-").partition(":")
        self.point, self.n, self.arm, self.note = point, int(n or 1), arm, note
        self.seen = 0
        self.lock = threading.Lock()

    def reached(self, point: str, what: str) -> None:
        if point != self.point or not self.arm.exists():
            return
        with self.lock:
            self.seen += 1
            if self.seen == self.n:
                cut(self.note, f"{point} #{self.n}: {what}")


def install(trap: Trap) -> None:
    """Wrap the functions the trap points sit in (the daemon is not changed)."""
    from targetvirt.catalog import Catalog  # noqa: PLC0415 - only the daemon needs them
    from targetvirt.store.base import Transaction  # noqa: PLC0415
    from targetvirt.store.sqlite import SqliteStore  # noqa: PLC0415

    store_commit = SqliteStore.commit

    def commit(self: SqliteStore, txn: Transaction) -> None:
        copies = [op for op in txn.ops if op[0] == "copy"]
        if copies:
            trap.reached("copy-before", f"store commit with {copies}")
        store_commit(self, txn)
        if copies:
            trap.reached("copy-after", f"store commit with {copies}")

    SqliteStore.commit = commit  # type: ignore[method-assign]
    repoint: Callable[..., Any] = Catalog._repoint

    def repoint_traced(tables: list[Any], index: int, old: int, new: int, pool: Any) -> Any:
        what = f"entry {index} from {old:#x} to {new:#x}"
        trap.reached("repoint-before", what)
        result = repoint(tables, index, old, new, pool)  # (newer catalogs return the sharers)
        trap.reached("repoint-after", what)
        return result

    Catalog._repoint = staticmethod(repoint_traced)  # type: ignore[method-assign]


def migrator(handler: Any, vdisk: str, arm: Path) -> None:
    """Move vdisk's segments between the containers of its pool until the guest resets."""
    from targetvirt import table as t  # noqa: PLC0415
    from targetvirt.errors import TargetvirtError  # noqa: PLC0415

    while not arm.exists():
        time.sleep(0.2)
    while True:
        v = handler.catalog.vdisk(vdisk)
        cids = sorted(v.pool.containers)
        for index, entry in list(v.table.iter_mapped()):
            dst = next(c for c in cids if c != t.cid_of(entry))
            try:
                handler.controller.migrate(vdisk, index, dst)
            except TargetvirtError as e:  # e.g. unmapped meanwhile: the next one
                print(f"migrate {vdisk} entry {index}: {e}", flush=True)
            time.sleep(0.1)  # let the writer's commands in between


def daemon(spec: str, arm: Path, note: Path, args: list[str]) -> int:
    from targetvirt.manage import daemon as d  # noqa: PLC0415

    if spec != "none":
        install(Trap(spec, arm, note))
    if spec.startswith("migrate-"):
        start = d.Handler.start

        def start_and_migrate(self: d.Handler) -> None:
            start(self)
            vdisk = os.environ["TV_MIGRATE_VDISK"]
            threading.Thread(target=migrator, args=(self, vdisk, arm), daemon=True).start()

        d.Handler.start = start_and_migrate  # type: ignore[method-assign]
    return d.main(args)


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"]:
        write(Path(argv[1]), Path(argv[2]), int(argv[3]) if len(argv) > 3 else CHUNK)
        return 0
    if argv[:1] == ["verify"]:
        print(json.dumps(verify(Path(argv[1]), [Path(a) for a in argv[2:]])))
        return 0
    if argv[:1] == ["daemon"] and argv[4:5] == ["--"]:
        return daemon(argv[1], Path(argv[2]), Path(argv[3]), argv[5:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
