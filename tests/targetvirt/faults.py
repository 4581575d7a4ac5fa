"""Faults for tests: container files that fail where told, and LUNs driven with CDB bytes
over the two real stacks the daemon can serve a LUN from (the engine's vdisk, or an
agent's vdisk beside a controller)."""

from __future__ import annotations

import errno as errnos
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

import targetvirt.agent
import targetvirt.container
from targetvirt import table as t
from targetvirt.agent import AgentVDisk
from targetvirt.catalog import Catalog
from targetvirt.container import Container
from targetvirt.pool import Pool
from targetvirt.vdisk import VDisk
from tcmu_handler.scsi import LunState, handle
from tcmu_handler.scsi.backend import BlockBackend
from tests.targetvirt.cluster import CONTAINER_SEGMENTS, Cluster
from tests.targetvirt.engine_model import SEG, open_catalog
from tests.tcmu_handler.scsi.helpers import GARBAGE, Result, cdb10, cdb16, unmap_cdb, unmap_list

READ, WRITE, SYNC = "read", "write", "sync"
GOOD = None
MEDIUM_READ = (0x03, 0x11, 0x00)  # UNRECOVERED READ ERROR
MEDIUM_WRITE = (0x03, 0x0C, 0x00)  # WRITE ERROR
SPACE_ALLOCATION_FAILED = (0x07, 0x27, 0x07)  # SPACE ALLOCATION FAILED WRITE PROTECT
SOFT_THRESHOLD = (0x06, 0x38, 0x07)  # THIN PROVISIONING SOFT THRESHOLD REACHED


def report_soft_threshold(pool: Pool, devices: Iterable[Any]) -> int:
    """Every device (``.backend``, ``.lun``) served from a vdisk of ``pool`` queues THIN
    PROVISIONING SOFT THRESHOLD REACHED for its initiators; returns how many did.  (The
    engine-only stack's wiring; the daemon's goes through the controller and agent.)"""
    told = 0
    for device in devices:
        backend = device.backend
        if isinstance(backend, VDisk) and backend.pool is pool:
            device.lun.report_soft_threshold()
            told += 1
    return told


@dataclass
class Rule:
    """One failing range of one file (``end`` exclusive), for some kinds of call."""

    ident: tuple[int, int]
    start: int
    end: int
    ops: frozenset[str]
    errno: int
    hits: int = 0


def _nbytes(bufs: Iterable[Any]) -> int:
    return sum(memoryview(b).nbytes for b in bufs)


class FaultyFiles:
    """Byte ranges of files that fail, through every descriptor open on them.

    For the test's duration the calls the data path makes -- ``os.preadv``,
    ``os.pwritev``, ``os.copy_file_range``, ``os.fdatasync``, the containers'
    ``fallocate`` and the agent's fast-path aliases -- go through wrappers that raise
    ``OSError(errno)`` when a call touches a failing range: what a disk with bad blocks
    (or device-mapper's error and flakey targets) does to a file or a device.  The real
    container code then meets the error exactly as it would meet a failing medium.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rules: list[Rule] = []
        real_preadv, real_pwritev = os.preadv, os.pwritev
        real_copy, real_sync = os.copy_file_range, os.fdatasync
        real_fallocate = targetvirt.container._fallocate

        def preadv(fd: int, bufs: Sequence[Any], offset: int, *rest: Any) -> int:
            self._check(fd, offset, _nbytes(bufs), READ)
            return real_preadv(fd, bufs, offset, *rest)

        def pwritev(fd: int, bufs: Sequence[Any], offset: int, *rest: Any) -> int:
            self._check(fd, offset, _nbytes(bufs), WRITE)
            return real_pwritev(fd, bufs, offset, *rest)

        def copy_file_range(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
            self._check(src, src_off, count, READ)
            self._check(dst, dst_off, count, WRITE)
            return real_copy(src, dst, count, src_off, dst_off)

        def fdatasync(fd: int) -> None:
            self._check(fd, 0, 1 << 62, SYNC)
            real_sync(fd)

        def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
            self._check(fd, offset, length, WRITE)
            real_fallocate(fd, mode, offset, length)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(targetvirt.container, "_fallocate", fallocate)
        monkeypatch.setattr(targetvirt.agent, "_preadv", preadv)
        monkeypatch.setattr(targetvirt.agent, "_pwritev", pwritev)

    def _check(self, fd: int, offset: int, length: int, op: str) -> None:
        if not self.rules or not length:
            return
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        for rule in self.rules:
            if (
                rule.ident == ident
                and op in rule.ops
                and offset < rule.end
                and rule.start < offset + length
            ):
                rule.hits += 1
                raise OSError(rule.errno, os.strerror(rule.errno))

    def fail(
        self,
        path: str,
        start: int = 0,
        length: int = 1 << 62,
        *,
        ops: Iterable[str] = (READ, WRITE),
        errno: int = errnos.EIO,
    ) -> Rule:
        st = os.stat(path)
        rule = Rule((st.st_dev, st.st_ino), start, start + length, frozenset(ops), errno)
        self.rules.append(rule)
        return rule

    def fail_segment(
        self, c: Container, pseg: int, *, ops: Iterable[str] = (READ, WRITE), part: int = 0
    ) -> Rule:
        """A whole physical segment fails (``part``: only its first ``part`` bytes)."""
        return self.fail(c.path, c.offset_of(pseg), part or c.segment_size, ops=ops)

    def heal(self) -> None:
        self.rules.clear()


class ScsiLun:
    """One LUN over a backend, driven with CDB bytes through ``handle()``; offsets and
    lengths in bytes (whole blocks)."""

    def __init__(
        self, backend: BlockBackend, uuid: str, segment_size: int, lun: LunState | None = None
    ) -> None:
        self.backend = backend
        self.lun = lun or LunState.for_vdisk(uuid, backend.size // 512, segment_size=segment_size)
        self.bs = 512

    def run(self, cdb: bytes, out: bytes = b"", in_len: int = 0) -> Result:
        buf = bytearray([GARBAGE]) * in_len
        data_in = [memoryview(buf)] if in_len else []
        data_out = [memoryview(bytearray(out))] if out else []
        done = handle(self.lun, cdb, data_out, data_in, self.backend)
        n = in_len if done.read_len is None else done.read_len
        return Result(done, bytes(buf[:n]), buf)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> Result:
        return self.run(cdb16(0x8A, offset // self.bs, len(data) // self.bs, 0x08 if fua else 0),
                        data)  # fmt: skip

    def read(self, offset: int, length: int) -> Result:
        return self.run(cdb16(0x88, offset // self.bs, length // self.bs), in_len=length)

    def sync(self) -> Result:
        return self.run(cdb10(0x35, 0, 0))

    def unmap(self, offset: int, length: int) -> Result:
        body = unmap_list((offset // self.bs, length // self.bs))
        return self.run(unmap_cdb(len(body)), body)


def outcome(r: Result) -> tuple[int, int, int] | None:
    """None for GOOD, else the sense triple."""
    return None if r.good else r.sense.triple


class Stack:
    """Vdisks of one pool ``p`` of ``SEG``-byte segments, as the SCSI layer sees them."""

    kind = ""
    catalog: Catalog

    def backend(self, name: str) -> BlockBackend:
        raise NotImplementedError

    def snapshot(self, source: str, snap: str) -> None:
        raise NotImplementedError

    def clone(self, source: str, name: str) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def lun(self, name: str, *, soft_threshold: bool = True) -> ScsiLun:
        """A LUN of a vdisk; it reports the soft threshold as the daemon's LUNs do
        (unless told not to: tests about something else)."""
        lun = ScsiLun(self.backend(name), self.catalog.vdisk(name).uuid, SEG)
        if soft_threshold:
            self._wire(lun)
        return lun

    def _wire(self, lun: ScsiLun) -> None:
        raise NotImplementedError

    @property
    def pool(self) -> Pool:
        return self.catalog.pool("p")

    def container_of(self, name: str, index: int) -> tuple[Container, int]:
        """The container and physical segment behind entry ``index`` of a vdisk."""
        e = self.catalog.vdisk(name).table[index]
        assert e & t.MAPPED, f"{name} entry {index} is not allocated"
        return self.pool.containers[t.cid_of(e)], t.pseg_of(e)

    def add_container(self, directory: str, segments: int) -> int:
        path = os.path.join(directory, f"extra{len(self.pool.containers)}")
        return self.catalog.add_container("p", path, (1 << 20) + segments * SEG).cid


class EngineStack(Stack):
    """The engine's vdisks straight (what the single-host daemon serves today)."""

    kind = "engine"

    def __init__(
        self, directory: str, vdisks: dict[str, int], *, containers: int = 1,
        segments: int = CONTAINER_SEGMENTS, cow: str | dict[str, str] = "redirect",
    ) -> None:  # fmt: skip
        self.catalog = open_catalog(os.path.join(directory, "meta.db"))
        size = (1 << 20) + segments * SEG
        path = os.path.join(directory, "c0")
        self.catalog.create_pool("p", path, size, segment_size=SEG, preallocate=True)
        for i in range(1, containers):
            self.catalog.add_container("p", os.path.join(directory, f"c{i}"), size)
        for name, vsize in vdisks.items():
            mode = cow if isinstance(cow, str) else cow[name]
            self.catalog.create_vdisk(name, "p", vsize, mode)  # type: ignore[arg-type]
        self.luns: list[ScsiLun] = []

    def backend(self, name: str) -> BlockBackend:
        return self.catalog.vdisk(name)

    def _wire(self, lun: ScsiLun) -> None:
        # as the daemon does: its catalog listener tells the LUNs of the pool's vdisks
        if not self.luns:
            self.catalog.threshold_listeners.append(
                lambda pool: report_soft_threshold(pool, self.luns)
            )
        self.luns.append(lun)

    def snapshot(self, source: str, snap: str) -> None:
        self.catalog.snapshot(source, snap)

    def clone(self, source: str, name: str) -> None:
        self.catalog.clone(source, name)

    def delete(self, name: str) -> None:
        self.catalog.delete(name)

    def close(self) -> None:
        self.catalog.close()


class AgentStack(Stack):
    """An agent's vdisks, the agent connected in-process to a controller."""

    kind = "agent"

    def __init__(
        self, directory: str, vdisks: dict[str, int], *, containers: int = 1,
        segments: int = CONTAINER_SEGMENTS, cow: str | dict[str, str] = "redirect",
    ) -> None:  # fmt: skip
        self.cluster = Cluster(
            directory, vdisks=vdisks, agents=1, containers=containers, segments=segments,
            cow=cow,
        )  # fmt: skip
        self.catalog = self.cluster.catalog

    def backend(self, name: str) -> BlockBackend:
        agent = self.cluster.agents[0]
        return agent.vdisks[name] if name in agent.vdisks else agent.serve(name)

    def _wire(self, lun: ScsiLun) -> None:
        # the controller pushes SoftThreshold to the agent, whose vdisk tells its LUNs
        assert isinstance(lun.backend, AgentVDisk)
        lun.backend.soft_threshold_listeners.append(lun.lun.report_soft_threshold)

    def snapshot(self, source: str, snap: str) -> None:
        self.cluster.controller.snapshot(source, snap)

    def clone(self, source: str, name: str) -> None:
        self.cluster.controller.clone(source, name)

    def delete(self, name: str) -> None:
        self.cluster.controller.delete(name)

    def close(self) -> None:
        self.cluster.close()


STACKS: dict[str, type[Stack]] = {"engine": EngineStack, "agent": AgentStack}
