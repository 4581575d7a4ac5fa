"""The management facade: every operation an admin can ask for, in one class.

:class:`Manager` is what the D-Bus API (and so the shell) calls.  It validates the
request and refuses with a one-line reason (unknown names, bad sizes, exported, frozen,
busy...), then performs it:

* pool, container and vdisk bookkeeping directly on the :class:`Catalog`;
* everything that touches a vdisk agents may be serving (snapshot, clone, group
  snapshot, freeze/thaw, delay/resume, resize, rollback, delete, flatten, evacuate)
  through an :class:`Operations` object: the :class:`~targetvirt.controller.Controller`,
  which keeps every agent serving the vdisk coherent;
* exports through an :class:`~targetvirt.manage.exports.Exporter` (rtslib-fb in the
  daemon, a fake in host tests), persisted in ``<state-dir>/exports.json``.

Long operations (flatten, evacuate, rollback, delete, check) run as :mod:`jobs`.
Results are plain JSON-able dicts; a mutating call's dict has a ``message`` line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import targetvirt
from targetvirt import check as checker
from targetvirt.catalog import SNAP_SEP, Catalog, check_name
from targetvirt.ceph import RadosLocation, import_rados, is_rados, reachable
from targetvirt.controller import Controller
from targetvirt.errors import (
    AlreadyExists,
    ContainerIOError,
    InUse,
    InvalidArgument,
    NotFound,
    ReadOnly,
    TargetvirtError,
)
from targetvirt.manage.common import NotAvailable
from targetvirt.manage.exports import (
    Exporter,
    ExportTable,
    Lun,
    LunSpec,
    Target,
    default_iqn,
)
from targetvirt.manage.jobs import Job, Jobs, Progress, raise_busy
from targetvirt.manage.values import (
    MAX_DURATION,
    check_block_multiple,
    check_iscsi_name,
    format_size,
    normalize_portal,
)
from targetvirt.pool import (
    DEFAULT_SEGMENT,
    DEFAULT_THRESHOLD,
    check_segment_size,
    check_threshold,
)
from targetvirt.vdisk import COW_MODES, VDisk

FREEZE_MODES = ("nowrite", "invalid")
DEVICE_WAIT = 60.0  # seconds to wait for the handler to serve a new LUN's device (slow VMs)
CHAP_MAX = 255
# The table of a vdisk lives in memory (8 bytes an entry): 2^27 entries is 1 GiB of table,
# 128 TiB at 1 MiB segments.  The engine sets no bound; a typo like size=10E must not
# make the daemon try to allocate exabytes of table.
MAX_ENTRIES = 1 << 27


@dataclass(frozen=True)
class CephOptions:
    """How a RADOS container reaches its cluster: shell conf=, id=, keyring=."""

    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None

    @property
    def given(self) -> list[str]:
        return [f"{k}=" for k, v in (("conf", self.conf), ("id", self.client_id),
                                      ("keyring", self.keyring)) if v]  # fmt: skip


def _default_ceph_confs() -> list[str]:
    """Where librados looks for a ceph.conf when none is named."""
    env = os.environ.get("CEPH_CONF")
    return [*([env] if env else []), "/etc/ceph/ceph.conf",
            os.path.expanduser("~/.ceph/ceph.conf")]  # fmt: skip


@contextlib.contextmanager
def _connected(where: str) -> Iterator[None]:
    """For a RADOS location: reach the cluster and its pool before any lock is taken
    (an unreachable cluster takes a while to say so; the catalog must not wait)."""
    if not is_rados(where):
        yield
        return
    with reachable(RadosLocation.parse(where), ContainerIOError):
        yield


class Operations(Protocol):
    """Operations on vdisks that agents may be serving.

    The controller (``targetvirt/controller.py``) has these methods with these
    signatures.  ``live`` says whether changes to exported vdisks are coherent with the agents
    serving them (rollback and evacuation of exported vdisks need that).
    """

    live: bool

    def snapshot(self, source: str, snap: str, *, mode: str = "nowrite") -> VDisk: ...
    def clone(self, source: str, name: str, *, mode: str = "nowrite") -> VDisk: ...
    def group_snapshot(
        self, sources: Sequence[str], snap: str, *, mode: str = "nowrite"
    ) -> list[VDisk]: ...
    def freeze(
        self, names: Sequence[str], *, mode: str = "nowrite", timeout: float | None = None
    ) -> None: ...
    def thaw(self, names: Sequence[str]) -> None: ...
    def frozen(self, name: str) -> bool: ...
    def delay(self, name: str, seconds: float) -> None: ...
    def cancel_delay(self, name: str) -> None: ...
    def delayed(self, name: str) -> bool: ...
    def rollback(self, name: str, snap: str) -> None: ...
    def resize(self, name: str, size: int) -> None: ...
    def delete(self, name: str, *, recursive: bool = False) -> None: ...
    def flatten(self, name: str, progress: Progress) -> int: ...
    def evacuate(self, pool: str, cid: int, progress: Progress) -> int: ...
    def servers(self, name: str) -> list[str]: ...
    def agents(self) -> list[dict[str, Any]]: ...


# "served", "refused: <why>" or "absent": what the TCMU service does with a vdisk's device
DeviceState = Callable[[str], str]


def _split(name: str) -> tuple[str, str | None]:
    base, at, snap = name.partition(SNAP_SEP)
    return base, (snap if at else None)


def check_ref(name: str, what: str = "vdisk") -> None:
    """A vdisk (``db``) or snapshot (``db@s1``) reference must be well formed."""
    base, snap = _split(name)
    check_name(base, what)
    if snap is not None:
        check_name(snap, "snapshot")


class Manager:
    """Every management operation of one daemon (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        state_dir: str | Path,
        *,
        exporter: Exporter | None = None,
        ops: Operations | None = None,
        device_state: DeviceState | None = None,
        device_wait: float = DEVICE_WAIT,
        hostname: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.state_dir = Path(state_dir)
        self.exporter = exporter
        self.device_state = device_state
        self.ops: Operations = ops if ops is not None else Controller(catalog)
        self.device_wait = device_wait
        self.hostname = hostname or socket.gethostname()
        self._sleep = sleep
        self._clock = clock
        self.exports = ExportTable(self.state_dir / "exports.json")
        self.jobs = Jobs()
        self.lock = threading.RLock()

    def stop(self) -> None:
        self.jobs.stop()

    # --- lookups and checks ----------------------------------------------------------------

    def _vdisk(self, name: str, what: str = "vdisk") -> VDisk:
        check_ref(name, what)
        return self.catalog.vdisk(name)

    def _not_busy(self, *names: str) -> None:
        for name in names:
            job = self.jobs.busy(name)
            if job is not None:
                raise_busy(name, job)

    def _not_frozen(self, name: str, doing: str) -> None:
        if self.ops.frozen(name):
            raise InUse(f"{name} is frozen; thaw it before you {doing}")

    def _not_exported(self, name: str, doing: str, *, snapshots: bool = False) -> None:
        found = self.exports.exported_under(name) if snapshots else []
        if not snapshots:
            hit = self.exports.find(name)
            found = [hit] if hit else []
        if found:
            target, lun = found[0]
            raise InUse(
                f"{lun.vdisk} is exported as LUN {lun.lun} of {target.iqn}; unexport it "
                f"before you {doing} (targetvirt /exports delete vdisk={lun.vdisk})"
            )

    @staticmethod
    def _check_entries(size: int, segment_size: int, pool: str) -> None:
        if -(-size // segment_size) > MAX_ENTRIES:
            raise InvalidArgument(
                f"size {format_size(size)} is too large for pool {pool}: at most "
                f"{format_size(MAX_ENTRIES * segment_size)} ({MAX_ENTRIES} segments of "
                f"{format_size(segment_size)})"
            )

    @staticmethod
    def _mode(mode: str) -> str:
        if mode not in FREEZE_MODES:
            raise InvalidArgument(f"freeze mode {mode!r} is not one of {', '.join(FREEZE_MODES)}")
        return mode

    # --- status and listings -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lio = self.exporter.unavailable() if self.exporter else "no exporter configured"
        return {
            "version": targetvirt.__version__,
            "pid": os.getpid(),
            "state_dir": str(self.state_dir),
            "hostname": self.hostname,
            "controller": f"in-process, {len(self.ops.agents())} agents",
            "lio": "available" if lio is None else f"unavailable: {lio}",
            "pools": len(self.catalog.pools),
            "vdisks": len(self.catalog.vdisks),
            "exports": len(self.exports.targets),
            "jobs_running": sum(1 for j in self.jobs.all() if j.state == "running"),
        }

    def listing(self) -> dict[str, Any]:
        """Everything the shell's tree shows, in one call."""
        with self.catalog.lock:
            pools = [self._pool_info(name) for name in sorted(self.catalog.pools)]
            vdisks = [self._vdisk_info(v) for _, v in sorted(self.catalog.vdisks.items())]
        targets = sorted(self.exports.targets.items())
        exports = [self._export_info(t, live=False) for _, t in targets]
        return {
            "daemon": self.status(),
            "pools": pools,
            "vdisks": vdisks,
            "exports": exports,
            "agents": self.ops.agents(),
            "jobs": [j.public() for j in self.jobs.all()],
        }

    def info(self, kind: str, name: str) -> dict[str, Any]:
        """One object in detail: kind is pool, vdisk, export, job or daemon."""
        if kind == "daemon":
            return self.status()
        if kind == "pool":
            check_name(name, "pool")
            with self.catalog.lock:
                return self._pool_info(name)
        if kind == "vdisk":
            with self.catalog.lock:
                return self._vdisk_info(self._vdisk(name))
        if kind == "export":
            target = self.exports.targets.get(name.lower())
            if target is None:
                found = self.exports.find(name)
                if found is None:
                    raise NotFound(f"no export named {name!r} (give a target IQN or a vdisk)")
                target = found[0]
            return self._export_info(target, live=True)
        if kind == "job":
            return self.jobs.get(_job_id(name)).public()
        raise InvalidArgument(f"unknown kind {kind!r} (pool, vdisk, export, job or daemon)")

    def _pool_info(self, name: str) -> dict[str, Any]:
        pool = self.catalog.pool(name)
        usage = self.catalog.pool_usage(pool)
        seg = pool.segment_size
        containers = [
            {"cid": c.cid, "path": c.path, "kind": c.kind, "state": c.state,
             "bytes": c.segments * seg, "used_bytes": c.used * seg, "free_bytes": c.free * seg,
             "failure": pool.containers[c.cid].failure}
            for c in pool.usage()
        ]  # fmt: skip
        return {
            "name": pool.name, "uuid": pool.uuid, "segment_size": seg,
            "total_bytes": usage.total_bytes, "used_bytes": usage.used_bytes,
            "free_bytes": usage.free_bytes,
            # what new data can still take (free segments of failed or evacuating
            # containers excluded), and the soft threshold against it
            "available_bytes": pool.available_segments() * seg,
            "usage_percent": int(pool.usage_percent()),
            "soft_threshold_percent": pool.threshold, "containers": containers,
            "vdisks": sorted(v.name for v in self.catalog.vdisks.values() if v.pool is pool),
            "jobs": [j.id for j in self.jobs.all() if j.state == "running"
                     and f"pool:{name}" in j.locks],
        }  # fmt: skip

    def _vdisk_info(self, v: VDisk) -> dict[str, Any]:
        parent = None
        if v.parent is not None:
            try:
                parent = self.catalog.by_vid(v.parent).name
            except KeyError:
                parent = None  # the parent was deleted since
        exported = self.exports.find(v.name)
        clones = sorted(
            c.name for c in self.catalog.vdisks.values() if c.parent == v.vid and not c.readonly
        )
        state = "frozen" if self.ops.frozen(v.name) else "normal"
        if self.ops.delayed(v.name):
            state = "delayed" if state == "normal" else f"{state}, delayed"
        return {
            "name": v.name, "uuid": v.uuid, "kind": v.kind, "pool": v.pool.name,
            "size": v.size, "cow": v.cow, "segment_size": v.segment_size,
            "allocated_bytes": v.allocated_bytes(), "exclusive_bytes": v.exclusive_bytes(),
            "parent": parent, "created": v.created, "readonly": v.readonly,
            "snapshots": [s.name for s in self.catalog.snapshots_of(v)] if not v.readonly else [],
            "clones": clones, "state": state, "served_by": self.ops.servers(v.name),
            "export": None if exported is None else {
                "iqn": exported[0].iqn, "lun": exported[1].lun, "readonly": exported[1].readonly,
            },
            "jobs": [j.id for j in self.jobs.all() if j.state == "running" and v.name in j.locks],
        }  # fmt: skip

    def _export_info(self, target: Target, *, live: bool) -> dict[str, Any]:
        info = target.public()
        if live and self.exporter is not None:
            why = self.exporter.unavailable()
            try:
                info["lio"] = self.exporter.status(target) if why is None else {"error": why}
            except TargetvirtError as e:
                info["lio"] = {"error": str(e)}
        return info

    # --- pools and containers ----------------------------------------------------------------

    @staticmethod
    def _container_source(
        path: str | None,
        device: str | None,
        size: int | None,
        *,
        rados: str | None = None,
        ceph: CephOptions | None = None,
        preallocate: bool = False,
    ) -> tuple[str, int | None]:
        """The location (a path, or a RADOS location) and size of a new container."""
        given = [f"{k}=" for k, v in (("path", path), ("device", device), ("rados", rados)) if v]
        if len(given) > 1:
            raise InvalidArgument(
                "give one of path= (a file), device= (a block device) or rados= (a Ceph "
                f"pool), not {' and '.join(given)}"
            )
        if not given:
            raise InvalidArgument(
                "give path=FILE size=SIZE (a file), device=BLOCKDEV, "
                "or rados=CEPHPOOL size=SIZE (a Ceph pool)"
            )
        ceph = ceph or CephOptions()
        if rados:
            return Manager._rados_source(rados, size, ceph, preallocate)
        if ceph.given:
            raise InvalidArgument(
                f"{' and '.join(ceph.given)} {'is' if len(ceph.given) == 1 else 'are'} "
                "for RADOS containers (rados=CEPHPOOL)"
            )
        where = path or device
        assert where is not None
        if not where.isprintable():  # NUL, line breaks, terminal escapes
            raise InvalidArgument(f"{where!r} holds control characters; give a plain path")
        if not os.path.isabs(where):
            raise InvalidArgument(f"{where!r} is not an absolute path")
        if device:
            if size is not None:
                raise InvalidArgument("size= is for files; a block device is used whole")
            try:
                mode = os.stat(device).st_mode
            except FileNotFoundError:
                raise NotFound(f"device {device} does not exist") from None
            if not stat.S_ISBLK(mode):
                raise InvalidArgument(f"{device} is not a block device")
            return device, None
        if size is None:
            raise InvalidArgument(f"a file container needs size=SIZE (for {path})")
        if size <= 0:
            raise InvalidArgument(f"size must be positive, got {size}")
        if os.path.exists(where):
            raise AlreadyExists(f"{where} already exists; refusing to overwrite it")
        if not os.path.isdir(os.path.dirname(where)):
            raise NotFound(f"folder {os.path.dirname(where)} does not exist")
        return where, size

    @staticmethod
    def _rados_source(
        rados: str, size: int | None, ceph: CephOptions, preallocate: bool
    ) -> tuple[str, int]:
        """rados=CEPHPOOL[/NAMESPACE] with conf=, id=, keyring=: a RADOS location."""
        import_rados()  # python3-rados missing: say so first, in one line
        pool, _, namespace = rados.partition("/")
        if preallocate:
            raise InvalidArgument("preallocate= is for files; RADOS objects are made when written")
        if size is None:
            raise InvalidArgument(f"a RADOS container needs size=SIZE (for rados={rados})")
        if size <= 0:
            raise InvalidArgument(f"size must be positive, got {size}")
        for what, file in (("Ceph config file", ceph.conf), ("keyring", ceph.keyring)):
            if not file:
                continue
            if not os.path.isabs(file):
                raise InvalidArgument(f"{what} {file!r} is not an absolute path")
            if not os.path.isfile(file):
                raise NotFound(f"{what} {file} does not exist")
        if not ceph.conf and not any(os.path.isfile(f) for f in _default_ceph_confs()):
            raise NotFound(
                "no Ceph config file: give conf=FILE (/etc/ceph/ceph.conf does not exist)"
            )
        loc = RadosLocation(
            pool, namespace, ceph.conf or None, ceph.client_id or None, ceph.keyring or None
        )
        loc.validate()
        return str(loc), size

    def create_pool(
        self,
        name: str,
        *,
        path: str | None = None,
        device: str | None = None,
        rados: str | None = None,
        conf: str | None = None,
        client_id: str | None = None,
        keyring: str | None = None,
        size: int | None = None,
        segment_size: int = DEFAULT_SEGMENT,
        preallocate: bool = False,
        threshold: int = DEFAULT_THRESHOLD,
    ) -> dict[str, Any]:
        """A pool with its first container: a file (path=, size=), a block device
        (device=), or objects in a Ceph pool (rados=POOL[/NAMESPACE], size=; conf=,
        client_id=, keyring= say how to reach and authenticate to the cluster)."""
        check_name(name, "pool")
        check_segment_size(segment_size)
        check_threshold(threshold)
        ceph = CephOptions(conf, client_id, keyring)
        where, nbytes = self._container_source(
            path, device, size, rados=rados, ceph=ceph, preallocate=preallocate
        )
        if name in self.catalog.pools:  # before connecting; again under the lock
            raise AlreadyExists(f"a pool named {name!r} already exists")
        with _connected(where), self.lock:
            if name in self.catalog.pools:
                raise AlreadyExists(f"a pool named {name!r} already exists")
            pool = self.catalog.create_pool(
                name, where, nbytes, segment_size=segment_size, preallocate=preallocate,
                threshold=threshold,
            )  # fmt: skip
            usage = self.catalog.pool_usage(pool)
        return {
            "name": name,
            "message": f"Created pool {name}: {format_size(usage.total_bytes)} in {where} "
            f"({format_size(segment_size)} segments)",
        }

    def set_pool(self, name: str, *, threshold: int | None = None) -> dict[str, Any]:
        """Change a pool's settings: ``threshold``, its soft threshold in percent."""
        check_name(name, "pool")
        if threshold is None:
            raise InvalidArgument("give threshold=PERCENT: the pool's soft threshold")
        check_threshold(threshold)
        with self.lock:
            self.catalog.set_threshold(name, threshold)
            used = int(self.catalog.pool(name).usage_percent())
        return {
            "message": f"Set the soft threshold of pool {name} to {threshold}% (it is {used}% used)"
        }

    def clear_container(self, pool: str, cid: int) -> dict[str, Any]:
        """An operator says a failed container is sound again: it takes new segments."""
        check_name(pool, "pool")
        with self.lock:
            container = self.catalog.pool(pool).container(cid)
            if not container.failed:
                raise InvalidArgument(f"container {cid} of pool {pool} is not failed")
            self.catalog.clear_failure(pool, cid)
        return {
            "message": f"Container {cid} of pool {pool} is online again: new segments may go "
            "to it (if its medium fails again, it is marked failed again)"
        }

    def delete_pool(self, name: str) -> dict[str, Any]:
        check_name(name, "pool")
        with self.lock:
            self._not_busy(f"pool:{name}")
            rados = any(c.kind == "rados" for c in self.catalog.pool(name).containers.values())
            self.catalog.delete_pool(name)
        left = "its container files and RADOS objects" if rados else "its container files"
        return {"message": f"Deleted pool {name} ({left} are left in place)"}

    def add_container(
        self,
        pool: str,
        *,
        path: str | None = None,
        device: str | None = None,
        rados: str | None = None,
        conf: str | None = None,
        client_id: str | None = None,
        keyring: str | None = None,
        size: int | None = None,
        preallocate: bool = False,
    ) -> dict[str, Any]:
        """Another container for a pool, of any kind (as for :meth:`create_pool`)."""
        check_name(pool, "pool")
        self.catalog.pool(pool)
        ceph = CephOptions(conf, client_id, keyring)
        where, nbytes = self._container_source(
            path, device, size, rados=rados, ceph=ceph, preallocate=preallocate
        )
        with _connected(where), self.lock:
            self._not_busy(f"pool:{pool}")
            c = self.catalog.add_container(pool, where, nbytes, preallocate=preallocate)
        return {
            "cid": c.cid,
            "message": f"Added container {c.cid} to pool {pool}: "
            f"{format_size(c.nsegments * c.segment_size)} in {where}",
        }

    def remove_container(self, pool: str, cid: int) -> dict[str, Any]:
        check_name(pool, "pool")
        with self.lock:
            self._not_busy(f"pool:{pool}")
            self.catalog.pool(pool).container(cid)
            self.catalog.remove_container(pool, cid)
        return {"message": f"Removed container {cid} from pool {pool}"}

    def evacuate(self, pool: str, cid: int) -> Job:
        check_name(pool, "pool")
        with self.lock:
            p = self.catalog.pool(pool)
            p.container(cid)
            if not set(p.containers) - p.draining - {cid}:
                raise InUse(f"pool {pool} has no other container to evacuate {cid} to")
            if not self.ops.live:
                exported = sorted(
                    v.name for v in self.catalog.vdisks.values()
                    if v.pool is p and self.exports.find(v.name)
                )  # fmt: skip
                if exported:
                    raise InUse(
                        f"pool {pool} has exported vdisks ({', '.join(exported[:5])}); moving "
                        "data under a live LUN needs the controller: unexport them first"
                    )

            def body(progress: Progress) -> dict[str, Any]:
                moved = self.ops.evacuate(pool, cid, progress)
                return {
                    "moved": moved,
                    "message": f"Evacuated container {cid} of pool {pool}: {moved} segments "
                    f"moved; remove it with: targetvirt /pools/{pool} remove container={cid}",
                }

            return self.jobs.start(
                "evacuate", f"{pool}/{cid}", body, unit="segments", locks=(f"pool:{pool}",)
            )

    # --- vdisks --------------------------------------------------------------------------------

    def create_vdisk(
        self,
        name: str,
        pool: str,
        size: int,
        *,
        cow: str = "redirect",
        segment_size: int | None = None,
    ) -> dict[str, Any]:
        check_name(name, "vdisk")
        check_name(pool, "pool")
        if size <= 0:
            raise InvalidArgument(f"size must be positive, got {size}")
        check_block_multiple(size)
        if cow not in COW_MODES:
            raise InvalidArgument(f"COW mode {cow!r} is not one of {', '.join(COW_MODES)}")
        with self.lock:
            p = self.catalog.pool(pool)
            if segment_size is not None and segment_size != p.segment_size:
                raise InvalidArgument(
                    f"pool {pool} has {format_size(p.segment_size)} segments, not "
                    f"{format_size(segment_size)}: the segment size is chosen per pool "
                    "(targetvirt /pools create ... segment=SIZE)"
                )
            if name in self.catalog.vdisks:
                raise AlreadyExists(f"a vdisk named {name!r} already exists")
            self._check_entries(size, p.segment_size, pool)
            self.catalog.create_vdisk(name, pool, size, cow)
        return {
            "name": name,
            "message": f"Created vdisk {name}: {format_size(size)} in pool {pool} "
            f"(thin, {cow} on write, {format_size(p.segment_size)} segments)",
        }

    def delete_vdisk(self, name: str, *, recursive: bool = False) -> Job:
        with self.lock:
            v = self._vdisk(name)
            self._not_busy(name)
            self._not_exported(name, "delete it", snapshots=recursive)
            self._not_frozen(name, "delete it")
            snaps = [] if v.readonly else self.catalog.snapshots_of(v)
            if snaps and not recursive:
                raise InUse(
                    f"{name} has snapshots ({', '.join(s.name for s in snaps[:3])}); "
                    "delete them first or give recursive=true"
                )
            what = "snapshot" if v.readonly else "vdisk"

            def body(progress: Progress) -> dict[str, Any]:
                self.ops.delete(name, recursive=recursive)
                extra = f" and {len(snaps)} snapshots" if snaps else ""
                return {"message": f"Deleted {what} {name}{extra}"}

            return self.jobs.start(
                "delete", name, body, cancellable=False, locks=(name, *(s.name for s in snaps))
            )

    def snapshot(self, vdisk: str, snap: str, *, mode: str = "nowrite") -> dict[str, Any]:
        check_name(snap, "snapshot")
        self._mode(mode)
        with self.lock:
            v = self._vdisk(vdisk)
            if v.readonly:
                raise InvalidArgument(
                    f"{vdisk} is a snapshot; snapshot the vdisk itself, or clone the snapshot"
                )
            if f"{vdisk}{SNAP_SEP}{snap}" in self.catalog.vdisks:
                raise AlreadyExists(f"{vdisk} already has a snapshot named {snap!r}")
        made = self.ops.snapshot(vdisk, snap, mode=mode)
        return {"name": made.name, "message": f"Created snapshot {made.name}"}

    def clone(
        self, source: str, name: str, *, snapshot: str | None = None, mode: str = "nowrite"
    ) -> dict[str, Any]:
        check_name(name, "clone")
        self._mode(mode)
        if snapshot is not None:
            check_name(snapshot, "snapshot")
            if SNAP_SEP in source:
                raise InvalidArgument(f"{source} is already a snapshot; drop snapshot=")
            source = f"{source}{SNAP_SEP}{snapshot}"
        with self.lock:
            self._vdisk(source)
            if name in self.catalog.vdisks:
                raise AlreadyExists(f"a vdisk named {name!r} already exists")
        made = self.ops.clone(source, name, mode=mode)
        return {"name": made.name, "message": f"Created clone {made.name} of {source}"}

    def group_snapshot(
        self, vdisks: Sequence[str], snap: str, *, mode: str = "nowrite"
    ) -> dict[str, Any]:
        check_name(snap, "snapshot")
        self._mode(mode)
        if not vdisks:
            raise InvalidArgument("a consistency group needs at least one vdisk")
        if len(set(vdisks)) != len(vdisks):
            raise InvalidArgument("a consistency group names the same vdisk twice")
        with self.lock:
            for name in vdisks:
                if self._vdisk(name).readonly:
                    raise InvalidArgument(f"{name} is a snapshot; a group lists vdisks")
            taken = [f"{n}{SNAP_SEP}{snap}" for n in vdisks if f"{n}{SNAP_SEP}{snap}" in
                     self.catalog.vdisks]  # fmt: skip
            if taken:
                raise AlreadyExists(f"{', '.join(taken)} already exists")
        made = self.ops.group_snapshot(list(vdisks), snap, mode=mode)
        names = [v.name for v in made]
        return {"names": names, "message": f"Created snapshots {', '.join(names)} at one instant"}

    def rollback(self, vdisk: str, snap: str) -> Job:
        with self.lock:
            v = self._vdisk(vdisk)
            if v.readonly:
                raise InvalidArgument(f"{vdisk} is a snapshot; roll back the vdisk it was taken of")
            full = snap if SNAP_SEP in snap else f"{vdisk}{SNAP_SEP}{snap}"
            check_ref(full, "vdisk")
            if not full.startswith(vdisk + SNAP_SEP):
                raise InvalidArgument(f"{full} is not a snapshot of {vdisk}")
            if full not in self.catalog.vdisks:
                raise NotFound(f"no snapshot named {full!r}")
            self._not_busy(vdisk)
            self._not_frozen(vdisk, "roll it back")
            if not self.ops.live:
                self._not_exported(vdisk, "roll it back")

            def body(progress: Progress) -> dict[str, Any]:
                self.ops.rollback(vdisk, full)
                return {"message": f"Rolled {vdisk} back to {full}"}

            return self.jobs.start("rollback", vdisk, body, cancellable=False, locks=(vdisk,))

    def flatten(self, vdisk: str) -> Job:
        with self.lock:
            v = self._vdisk(vdisk)
            if v.readonly:
                raise ReadOnly(f"{vdisk} is a snapshot; clone it and flatten the clone")
            self._not_busy(vdisk)
            self._not_frozen(vdisk, "flatten it")

            def body(progress: Progress) -> dict[str, Any]:
                copied = self.ops.flatten(vdisk, progress)
                return {
                    "copied": copied,
                    "message": f"Flattened {vdisk}: {copied} shared segments copied",
                }

            return self.jobs.start("flatten", vdisk, body, unit="segments", locks=(vdisk,))

    def resize(self, vdisk: str, size: int) -> dict[str, Any]:
        if size <= 0:
            raise InvalidArgument(f"size must be positive, got {size}")
        check_block_multiple(size)
        with self.lock:
            v = self._vdisk(vdisk)
            if v.readonly:
                raise ReadOnly(f"{vdisk} is a snapshot and cannot be resized")
            self._not_busy(vdisk)
            self._not_frozen(vdisk, "resize it")
            self._check_entries(size, v.segment_size, v.pool.name)
            old = v.size
            exported = self.exports.find(vdisk)
            if exported and size < old:
                raise InUse(
                    f"{vdisk} is exported as LUN {exported[1].lun} of {exported[0].iqn}; "
                    "shrinking it under the initiator would cut off its data: unexport it first"
                )
            if size == old:
                return {"message": f"{vdisk} is already {format_size(size)}"}
            self.ops.resize(vdisk, size)
            if exported and self.exporter is not None:
                try:
                    self.exporter.set_size(exported[1], size)
                except TargetvirtError as e:
                    raise TargetvirtError(
                        f"{vdisk} is now {format_size(size)} but its LUN still has the old "
                        f"size ({e}); run the resize again"
                    ) from None
        told = " (the initiator is told)" if exported else ""
        return {"message": f"Resized {vdisk} from {format_size(old)} to {format_size(size)}{told}"}

    # --- freeze / delay (through the controller) ---------------------------------------------

    def freeze(
        self, vdisk: str, *, mode: str = "nowrite", timeout: float | None = None
    ) -> dict[str, Any]:
        self._mode(mode)
        if timeout is not None:
            _check_timeout(timeout)
        with self.lock:
            if self._vdisk(vdisk).readonly:
                raise InvalidArgument(f"{vdisk} is a snapshot; snapshots take no writes to hold")
            if self.ops.frozen(vdisk):
                raise InUse(f"{vdisk} is already frozen")
        self.ops.freeze([vdisk], mode=mode, timeout=timeout)
        until = f" for at most {timeout:g} s" if timeout is not None else " until thawed"
        return {"message": f"Froze {vdisk} ({mode}){until}"}

    def thaw(self, vdisk: str) -> dict[str, Any]:
        with self.lock:
            self._vdisk(vdisk)
            if not self.ops.frozen(vdisk):
                raise InvalidArgument(f"{vdisk} is not frozen")
        self.ops.thaw([vdisk])
        return {"message": f"Thawed {vdisk}"}

    def delay(self, vdisk: str, timeout: float) -> dict[str, Any]:
        _check_timeout(timeout)
        with self.lock:
            self._vdisk(vdisk)
        self.ops.delay(vdisk, timeout)
        return {"message": f"Holding I/O to {vdisk} for at most {timeout:g} s"}

    def resume(self, vdisk: str) -> dict[str, Any]:
        with self.lock:
            self._vdisk(vdisk)
            if not self.ops.delayed(vdisk):
                raise InvalidArgument(f"{vdisk} is not delayed")
        self.ops.cancel_delay(vdisk)
        return {"message": f"Resumed I/O to {vdisk}"}

    # --- exports -------------------------------------------------------------------------------

    def _lio(self) -> Exporter:
        if self.exporter is None:
            raise NotAvailable("this daemon exports nothing (no LIO exporter configured)")
        why = self.exporter.unavailable()
        if why is not None:
            raise NotAvailable(f"LIO is not available: {why}")
        return self.exporter

    def _spec(self, lun: Lun) -> LunSpec:
        v = self.catalog.vdisk(lun.vdisk)
        return LunSpec(lun, v.size, v.uuid)

    def _wait_served(self, vdisk: str) -> None:
        """Wait until the handler serves the new device (or has refused it)."""
        if self.device_state is None:
            return
        deadline = self._clock() + self.device_wait
        while True:
            state = self.device_state(vdisk)
            if state == "served":
                return
            if state.startswith("refused"):
                raise TargetvirtError(f"targetvirt-handler {state.replace(':', ' the LUN:', 1)}")
            if self._clock() >= deadline:
                raise TargetvirtError(
                    f"targetvirt-handler did not pick up the LUN of {vdisk} within "
                    f"{self.device_wait:g} s"
                )
            self._sleep(0.05)

    def export(
        self,
        vdisk: str,
        *,
        iqn: str | None = None,
        portals: Sequence[str] | None = None,
        acls: Sequence[str] | None = None,
        userid: str = "",
        password: str = "",
        mutual_userid: str = "",
        mutual_password: str = "",
        demo: bool = False,
        readonly: bool = False,
        lun: int | None = None,
    ) -> dict[str, Any]:
        check_ref(vdisk)
        norm_portals = [normalize_portal(p) for p in portals] if portals is not None else None
        if norm_portals is not None and not norm_portals:
            raise InvalidArgument("give at least one portal")
        if norm_portals is not None and len(set(norm_portals)) != len(norm_portals):
            raise InvalidArgument("a portal is given twice")
        norm_acls = [check_iscsi_name(a, "initiator name") for a in acls or []]
        if len(set(norm_acls)) != len(norm_acls):
            raise InvalidArgument("an initiator name is given twice in acl=")
        _check_chap(userid, password, mutual_userid, mutual_password)
        if lun is not None and not 0 <= lun <= 255:
            raise InvalidArgument(f"lun must be from 0 to 255, got {lun}")
        target_iqn = check_iscsi_name(iqn, "iqn") if iqn else None
        with self.lock:
            v = self._vdisk(vdisk)
            readonly = readonly or v.readonly
            self._not_busy(vdisk)
            found = self.exports.find(vdisk)
            if found:
                raise AlreadyExists(
                    f"{vdisk} is already exported as LUN {found[1].lun} of {found[0].iqn}"
                )
            check_block_multiple(v.size, f"{vdisk}'s size")
            lio = self._lio()
            target = self.exports.targets.get(target_iqn) if target_iqn else None
            new_target = target is None
            if target is not None:
                given = [k for k, val in (("portal", portals), ("acl", acls), ("userid", userid),
                         ("mutual_userid", mutual_userid), ("demo", demo)) if val]  # fmt: skip
                if given:
                    raise InvalidArgument(
                        f"target {target.iqn} exists: its {', '.join(given)} settings are made "
                        "already (give only vdisk=, iqn= and lun=)"
                    )
            else:
                if target_iqn is None:
                    target_iqn = default_iqn(vdisk, set(self.exports.targets), self.hostname)
                if lio.foreign_target(target_iqn):
                    raise AlreadyExists(
                        f"LIO already has a target {target_iqn} that targetvirt does not "
                        "manage; choose another iqn="
                    )
                target = Target(
                    target_iqn, norm_portals or ["0.0.0.0:3260"], norm_acls, userid, password,
                    mutual_userid, mutual_password, demo,
                )  # fmt: skip
            number = target.free_lun() if lun is None else lun
            if target.luns and any(x.lun == number for x in target.luns):
                raise AlreadyExists(f"target {target.iqn} already has a LUN {number}")
            new = Lun(vdisk, number, readonly)
            spec = LunSpec(new, v.size, v.uuid)
            conflict = lio.storage_object_conflict(spec)
            if conflict:
                raise AlreadyExists(conflict)
            created = lio.ensure_storage_object(spec)
            target.luns.append(new)
            try:
                self._wait_served(vdisk)
                lio.apply_target(target, [self._spec(x) for x in target.luns])
            except BaseException:
                target.luns.remove(new)
                self._undo_export(lio, target, new, new_target, created)
                raise
            self.exports.targets[target.iqn] = target
            self.exports.save()
        warn = ""
        if not target.acls and not target.demo:
            warn = "; no initiator may log in yet: give acl=IQN, or demo=true"
        return {
            "iqn": target.iqn, "lun": number, "portals": target.portals,
            "message": f"Exported {vdisk} as LUN {number} of {target.iqn} on "
            f"{', '.join(target.portals)}{' (read-only)' if readonly else ''}{warn}",
        }  # fmt: skip

    @staticmethod
    def _undo_export(lio: Exporter, target: Target, lun: Lun, new_target: bool, so: bool) -> None:
        try:
            if new_target:
                lio.remove_target(target)
            if so:
                lio.remove_lun(target, lun)
        except TargetvirtError:
            pass  # best effort: the error being reported matters more

    def unexport(self, vdisk: str) -> dict[str, Any]:
        check_ref(vdisk)
        with self.lock:
            found = self.exports.find(vdisk)
            if found is None:
                self._vdisk(vdisk)  # an unknown vdisk says so
                raise NotFound(f"{vdisk} is not exported")
            target, lun = found
            lio = self._lio()
            if len(target.luns) == 1:
                lio.remove_target(target)
                del self.exports.targets[target.iqn]
                gone = f"; target {target.iqn} removed"
            else:
                lio.remove_lun(target, lun)
                target.luns.remove(lun)
                gone = ""
            self.exports.save()
        return {"message": f"Unexported {vdisk} (LUN {lun.lun} of {target.iqn}){gone}"}

    def restore_exports(self) -> dict[str, Any]:
        """Apply every saved export to LIO again (after a reboot, or a cleared configfs).

        Idempotent: what exists is left alone.  A LUN whose vdisk is gone or whose
        device the handler refuses is reported and skipped; the rest is restored.
        """
        errors: list[str] = []
        restored = 0
        with self.lock:
            if not self.exports.targets:
                return {"restored": 0, "errors": [], "message": "No exports to restore"}
            lio = self._lio()
            for target in list(self.exports.targets.values()):
                good: list[LunSpec] = []
                for lun in target.luns:
                    where = f"LUN {lun.lun} ({lun.vdisk}) of {target.iqn}"
                    try:
                        spec = self._spec(lun)
                        conflict = lio.storage_object_conflict(spec)
                        if conflict:
                            raise AlreadyExists(conflict)
                        lio.ensure_storage_object(spec)
                        self._wait_served(lun.vdisk)
                        good.append(spec)
                    except TargetvirtError as e:
                        errors.append(f"{where}: {e}")
                if not good:
                    continue
                try:
                    kept = Target(**{**target.__dict__, "luns": [s.lun for s in good]})
                    lio.apply_target(kept, good)
                    restored += len(good)
                except TargetvirtError as e:
                    errors.append(f"target {target.iqn}: {e}")
        msg = f"Restored {restored} LUNs of {len(self.exports.targets)} targets"
        if errors:
            msg += f"; {len(errors)} failed: " + "; ".join(errors)
        return {"restored": restored, "errors": errors, "message": msg}

    # --- checker, jobs ---------------------------------------------------------------------------

    def check(self, *, repair: bool = False) -> Job:
        def body(progress: Progress) -> dict[str, Any]:
            report = checker.check(self.catalog, repair=repair)
            lines = report.lines()
            return {"clean": report.clean, "lines": lines, "message": "\n".join(lines)}

        return self.jobs.start(
            "check", "metadata", body, cancellable=False, locks=("catalog-check",)
        )

    def job(self, jid: int) -> dict[str, Any]:
        return self.jobs.get(jid).public()

    def cancel_job(self, jid: int) -> dict[str, Any]:
        job = self.jobs.cancel(jid)
        return {"message": f"Asked {job.describe()} to stop at its next step"}


def _job_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"a job is named by its number, not {text!r}") from None


def _check_timeout(timeout: float) -> None:
    if timeout <= 0:
        raise InvalidArgument(f"timeout must be positive, got {timeout}")
    if not timeout <= MAX_DURATION:  # inf and NaN too: D-Bus callers can send them
        raise InvalidArgument(f"timeout must be at most {MAX_DURATION:.0f} seconds, got {timeout}")


def _check_chap(userid: str, password: str, mutual_userid: str, mutual_password: str) -> None:
    if bool(userid) != bool(password):
        raise InvalidArgument("CHAP needs both userid= and password=")
    if bool(mutual_userid) != bool(mutual_password):
        raise InvalidArgument("mutual CHAP needs both mutual_userid= and mutual_password=")
    if mutual_userid and not userid:
        raise InvalidArgument("mutual CHAP needs one-way CHAP too (userid= and password=)")
    given = {"userid": userid, "password": password, "mutual_userid": mutual_userid,
             "mutual_password": mutual_password}  # fmt: skip
    for what, value in given.items():
        if len(value) > CHAP_MAX:
            raise InvalidArgument(f"{what} is longer than {CHAP_MAX} characters")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise InvalidArgument(f"{what} must not contain spaces or control characters")
    if mutual_password and mutual_password == password:
        raise InvalidArgument("mutual_password must differ from password")
