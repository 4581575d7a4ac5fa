"""The metadata checker: finds damage and leaks; repairs what can be repaired safely.

Loading a catalog already verifies every checksum (records, chunks, table roots) and
every container label.  On top of that the checker verifies the invariants that make the
tables trustworthy:

* every mapped entry names an existing container and a segment inside it;
* a segment is mapped at one index only, by tables of one family (sharing only ever
  comes from copying tables), so no vdisk can see another vdisk's data;

lists the vdisks a user froze (a controller started on the store keeps them frozen), and
looks for *leaks*: free segments that still occupy space (data of sparse files,
objects of RADOS containers), left behind when a crash lost an allocation that was
never committed.  Repair mode gives that space back; it never touches a segment that any
table maps.

``targetvirt-check [--repair] [--state-dir DIR | --store rados:POOL[/NS][?opts]]`` runs it
on a store no daemon holds; the shell's ``check`` runs it inside the daemon.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from targetvirt import table as t
from targetvirt.catalog import Catalog
from targetvirt.errors import StoreError, TargetvirtError
from targetvirt.store.base import Store
from targetvirt.store.rados import RadosStore
from targetvirt.store.sqlite import SqliteStore
from targetvirt.vdisk import VDisk


@dataclass
class Report:
    damage: list[str] = field(default_factory=list)
    leaked_segments: int = 0
    reclaimed_segments: int = 0
    checked_vdisks: int = 0
    checked_entries: int = 0
    frozen: list[str] = field(default_factory=list)  # "name (mode, until when)"

    @property
    def clean(self) -> bool:
        return not self.damage and self.leaked_segments == self.reclaimed_segments

    def lines(self) -> list[str]:
        out = [f"checked {self.checked_vdisks} vdisks, {self.checked_entries} mapped entries"]
        out += [f"frozen: {f}" for f in self.frozen]
        out += [f"DAMAGE: {d}" for d in self.damage]
        if self.leaked_segments:
            out.append(
                f"leaked segments (free but holding space): {self.leaked_segments}, "
                f"reclaimed: {self.reclaimed_segments}"
            )
        out.append("clean" if self.clean else "NOT clean")
        return out


def check(catalog: Catalog, *, repair: bool = False) -> Report:
    report = Report()
    with catalog.lock:
        catalog.commit()  # dropped references settle: their segments are free, not leaks
        for pool in catalog.pools.values():
            owners: dict[int, tuple[int, int, str]] = {}
            for v in (v for v in catalog.vdisks.values() if v.pool is pool):
                report.checked_vdisks += 1
                _note_freeze(report, v)
                for index, entry in v.table.iter_mapped():
                    report.checked_entries += 1
                    _check_entry(report, v, index, entry, owners)
            for cid, c in pool.containers.items():
                free = np.flatnonzero(pool.refs_view(cid) == 0).tolist()
                for pseg in c.segments_holding_data(free):
                    report.leaked_segments += 1
                    if repair:
                        c.discard(pseg)
                        report.reclaimed_segments += 1
                if repair:
                    c.sync()  # discards may be asynchronous (RADOS)
    return report


def _note_freeze(report: Report, v: VDisk) -> None:
    f = v.freeze
    if f is not None:
        until = (
            "until thawed"
            if f.until is None
            else "until " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.until))
        )
        report.frozen.append(f"{v.name} ({f.mode}, {until})")


def _check_entry(
    report: Report, v: VDisk, index: int, entry: int, owners: dict[int, tuple[int, int, str]]
) -> None:
    cid, pseg = t.cid_of(entry), t.pseg_of(entry)
    container = v.pool.containers.get(cid)
    if container is None or pseg >= container.nsegments:
        report.damage.append(
            f"{v.name} entry {index} maps outside pool {v.pool.name} ({cid}:{pseg})"
        )
        return
    fid = v.family.fid
    prev = owners.setdefault(t.location(entry), (fid, index, v.name))
    if prev[:2] != (fid, index):
        report.damage.append(
            f"segment {cid}:{pseg} is mapped by {prev[2]} entry {prev[1]} and by {v.name} "
            f"entry {index} (different {'families' if prev[0] != fid else 'indexes'})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="targetvirt-check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir", default=os.environ.get("TARGETVIRT_STATE_DIR", "/var/lib/targetvirt")
    )
    parser.add_argument(
        "--store", help="a metadata store on RADOS (rados:<pool>[/<ns>][?options]) instead"
    )
    parser.add_argument("--store-name", default="targetvirt", help="its name (with --store)")
    parser.add_argument("--repair", action="store_true", help="reclaim leaked space")
    args = parser.parse_args(argv)
    try:
        store: Store
        if args.store:
            store = RadosStore(args.store, name=args.store_name, readonly=not args.repair)
        else:
            path = os.path.join(args.state_dir, "targetvirt.db")
            store = SqliteStore(path, readonly=not args.repair)
        catalog = Catalog.open(store)
        report = check(catalog, repair=args.repair)
        if args.repair:
            catalog.close()
    except StoreError as e:
        print(f"targetvirt-check: DAMAGE: {e}", file=sys.stderr)
        return 2
    except TargetvirtError as e:
        print(f"targetvirt-check: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0 if report.clean else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
