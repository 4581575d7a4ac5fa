"""Storage containers: where physical segments live.

A container holds ``nsegments`` fixed-size physical segments.  Every container carries a
checksummed *label* naming its pool and its own identity, checked on open, so a swapped
or missing container is detected instead of being used.  All I/O errors become
:mod:`targetvirt.errors` errors that carry sense.

Kinds (one small interface, :class:`Container`; :meth:`Container.create` and
:meth:`Container.open` dispatch on the *location*):

* a path: a file (sparse or preallocated) or a block device, segments after a 1 MiB
  header area holding the label (:class:`FileContainer`, this module);
* ``rados:<pool>[/<namespace>][?options]``: one RADOS object per segment in a Ceph pool
  (:class:`targetvirt.container_rados.RadosContainer`).

Addresses are the same for every kind: segment ``p`` starts at byte
``DATA_OFFSET + p * segment_size`` of the container, and ``readv``/``writev``/``zero``
take such absolute offsets.  fd-backed containers expose ``fd`` so the data path can
``os.preadv``/``os.pwritev`` straight between the container and a caller's buffers;
kinds without a file descriptor have ``fd == -1``, which makes those calls fail at once
(EBADF) and the data path fall back to the container's own methods.

Failure: the first I/O that fails with EIO (or ENXIO/ENODEV: the device went away) marks
the container *failed* (:attr:`Container.failure` says why).  A failed container goes on
serving the segments it holds -- each command that meets a bad range fails with MEDIUM
ERROR, the others succeed, like a disk with bad blocks -- but takes no new segments
(see :mod:`targetvirt.pool`).  Its owner hears of every such error through
:attr:`Container.on_failure` (the catalog persists the mark; an agent tells the
controller).  ENOSPC/EDQUOT (the file system under a sparse file is full) is no medium
failure: it is reported as the pool being full.  A failed flush (``sync``) is counted in
:attr:`Container.sync_errors`, so the flushes of the vdisks with data there can report it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from targetvirt.errors import (
    ContainerIOError,
    ContainerWriteError,
    InvalidArgument,
    NotFound,
    PoolFull,
    StoreCorrupt,
)

DATA_OFFSET = 1 << 20  # segments start at 1 MiB; the header lives below
HEADER_MAGIC = b"TGVCONT1"
HEADER_VERSION = 1
# magic, version, kind, pool uuid, container uuid, cid, segment size, nsegments, data offset
_HEADER = struct.Struct("<8sHH16s16sIIQQ")
_CRC = struct.Struct("<I")
HEADER_BYTES = 4096

KIND_FILE = "file"
KIND_BLOCK = "block"
KIND_RADOS = "rados"
_KIND_CODES = {KIND_FILE: 1, KIND_BLOCK: 2, KIND_RADOS: 3}

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_SEEK_DATA = 3
# errnos that mean the medium failed (or went away): the container is failed from then on
MEDIUM_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# copy_file_range errors after which a plain read + write is tried (EIO too: the plain
# path tells which end failed, so the right container is marked)
_COPY_FALLBACK = frozenset({errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EIO})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ZERO_BUF = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class ContainerLabel:
    """What a container's header says about it, and what the store expects of it."""

    kind: str
    pool_uuid: str
    uuid: str
    cid: int
    segment_size: int
    nsegments: int

    def encode(self) -> bytes:
        body = _HEADER.pack(
            HEADER_MAGIC,
            HEADER_VERSION,
            _KIND_CODES[self.kind],
            uuidlib.UUID(self.pool_uuid).bytes,
            uuidlib.UUID(self.uuid).bytes,
            self.cid,
            self.segment_size,
            self.nsegments,
            DATA_OFFSET,
        )
        body += _CRC.pack(zlib.crc32(body))
        return body.ljust(HEADER_BYTES, b"\0")

    @classmethod
    def decode(cls, raw: bytes, where: str) -> ContainerLabel:
        size = _HEADER.size
        if len(raw) < size + _CRC.size or raw[:8] != HEADER_MAGIC:
            raise StoreCorrupt(f"{where} is not a targetvirt container (no header)")
        (crc,) = _CRC.unpack_from(raw, size)
        if zlib.crc32(raw[:size]) != crc:
            raise StoreCorrupt(f"{where}: container header checksum mismatch")
        _, version, kind, pool, cuuid, cid, segsize, nseg, data_off = _HEADER.unpack_from(raw)
        if version != HEADER_VERSION or data_off != DATA_OFFSET:
            raise StoreCorrupt(f"{where}: unsupported container header version {version}")
        kinds = {v: k for k, v in _KIND_CODES.items()}
        if kind not in kinds:
            raise StoreCorrupt(f"{where}: unknown container kind code {kind}")
        return cls(
            kinds[kind], str(uuidlib.UUID(bytes=pool)), str(uuidlib.UUID(bytes=cuuid)),
            cid, segsize, nseg,
        )  # fmt: skip


def segments_for(size: int, segment_size: int) -> int:
    """How many segments fit in a container of ``size`` bytes."""
    return max(0, (size - DATA_OFFSET) // segment_size)


class Container:
    """One container of a pool: the interface every kind implements.

    ``path`` is the container's location as given at creation (a file or device path,
    or a RADOS location string): with the label it is all the store records to reopen
    the container.
    """

    fd: int = -1  # a file descriptor for the data path's preadv/pwritev, or -1

    def __init__(self, label: ContainerLabel, path: str, preallocated: bool) -> None:
        self.label = label
        self.path = path
        self.preallocated = preallocated
        self.segment_size = label.segment_size
        self.nsegments = label.nsegments
        self.io_errors = 0  # medium errors met (EIO and friends)
        self.failure = ""  # why the container is failed; "" while it is not
        self.last_error = ""
        self.sync_errors = 0  # failed flushes: data written before them may be lost
        self.sync_error = ""  # why the last one failed
        self.sync_failing = False  # the last flush failed
        # told of every medium error: (container, whether it is the one that failed it)
        self.on_failure: Callable[[Container, bool], None] | None = None

    # --- identity ------------------------------------------------------------------

    @property
    def cid(self) -> int:
        return self.label.cid

    @property
    def kind(self) -> str:
        return self.label.kind

    @property
    def uuid(self) -> str:
        return self.label.uuid

    @property
    def failed(self) -> bool:
        return bool(self.failure)

    def fail(self, why: str) -> None:
        """Mark the container failed (the first reason stays) and tell its owner."""
        first = not self.failure
        if first:
            self.failure = why
        if self.on_failure is not None:
            self.on_failure(self, first)

    def offset_of(self, pseg: int) -> int:
        return DATA_OFFSET + pseg * self.segment_size

    def start_io(
        self, bufs: Sequence[memoryview], offset: int, write: bool, done: Callable[[bool], None]
    ) -> bool:
        """Start reading into (or writing from) ``bufs``, one range inside one segment,
        without waiting; ``done(ok)`` is called from another thread when it ends.  False,
        with nothing started, when this kind has no asynchronous I/O (a file's preadv is
        already as quick as starting one) or cannot start this one now."""
        return False

    def __repr__(self) -> str:
        return f"<Container {self.cid} {self.kind} {self.path} {self.nsegments} segments>"

    # --- creation and opening, by location -------------------------------------------

    @staticmethod
    def create(
        location: str,
        *,
        pool_uuid: str,
        cid: int,
        segment_size: int,
        size: int | None,
        preallocate: bool = False,
    ) -> Container:
        """Create (and label) a container of the kind ``location`` names.

        ``size``: the container's size in bytes (a file's includes its 1 MiB header); a
        block device brings its own (None).
        """
        return kind_for(location).create_at(
            location, pool_uuid=pool_uuid, cid=cid, segment_size=segment_size, size=size,
            preallocate=preallocate,
        )  # fmt: skip

    @staticmethod
    def open(location: str, expected: ContainerLabel, preallocated: bool) -> Container:
        """Open a container and check that its label is the one the store describes."""
        return kind_for(location).open_at(location, expected, preallocated)

    @classmethod
    def create_at(
        cls,
        location: str,
        *,
        pool_uuid: str,
        cid: int,
        segment_size: int,
        size: int | None,
        preallocate: bool,
    ) -> Container:
        raise NotImplementedError

    @classmethod
    def open_at(cls, location: str, expected: ContainerLabel, preallocated: bool) -> Container:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- I/O: absolute offsets (``offset_of``), never across the container's end ---------

    def readv(self, bufs: Sequence[memoryview | bytearray], offset: int) -> None:
        """Fill ``bufs`` from ``offset``."""
        raise NotImplementedError

    def writev(self, bufs: Sequence[memoryview | bytes | bytearray], offset: int) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        """Make a byte range read as zeros, as cheaply as the medium allows."""
        raise NotImplementedError

    def discard(self, pseg: int) -> None:
        """Give a free segment's space back to the medium (best effort)."""
        raise NotImplementedError

    def holds_data(self, pseg: int) -> bool:
        """Whether a segment occupies space on the medium (for the leak report)."""
        raise NotImplementedError

    def segments_holding_data(self, psegs: Sequence[int]) -> list[int]:
        """Which of ``psegs`` occupy space (kinds may answer in bulk)."""
        return [p for p in psegs if self.holds_data(p)]

    def copy_segment_to(self, pseg: int, dst: Container, dst_pseg: int) -> None:
        """Copy one whole segment to a segment of ``dst`` (of any kind)."""
        buf = bytearray(self.segment_size)
        self.readv([buf], self.offset_of(pseg))
        dst.writev([buf], dst.offset_of(dst_pseg))

    def sync(self) -> None:
        """Make every write so far durable."""
        raise NotImplementedError


ContainerKind = type[Container]
# location scheme -> loader of the kind's class (imported on first use); "" is a path
_KINDS: dict[str, Callable[[], ContainerKind]] = {}


def register_kind(scheme: str, loader: Callable[[], ContainerKind]) -> None:
    """Make locations starting with ``scheme`` (e.g. "rados:") open containers of a kind."""
    _KINDS[scheme] = loader


def kind_for(location: str) -> ContainerKind:
    for scheme, loader in _KINDS.items():
        if scheme and location.startswith(scheme):
            return loader()
    return FileContainer


def _rados_kind() -> ContainerKind:
    from targetvirt.container_rados import RadosContainer  # noqa: PLC0415 - optional kind

    return RadosContainer


register_kind("rados:", _rados_kind)


class FileContainer(Container):
    """One file or block device holding ``nsegments`` physical segments after a header."""

    def __init__(self, label: ContainerLabel, path: str, fd: int, preallocated: bool) -> None:
        super().__init__(label, path, preallocated)
        self.fd = fd

    # --- creation and opening ----------------------------------------------------

    @classmethod
    def create_at(
        cls,
        path: str,
        *,
        pool_uuid: str,
        cid: int,
        segment_size: int,
        size: int | None,
        preallocate: bool = False,
    ) -> FileContainer:
        """Create a file container (``size`` given) or label a block device (``size`` None)."""
        is_block = os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)
        if is_block:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL)
            size = _block_size(fd)
            kind = KIND_BLOCK
        else:
            if size is None:
                raise InvalidArgument(f"{path} is not a block device; give a size for a file")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise InvalidArgument(f"{path} already exists; refusing to overwrite it") from None
            except OSError as e:
                raise InvalidArgument(f"cannot create {path}: {e.strerror}") from None
            kind = KIND_FILE
        nseg = segments_for(size, segment_size)
        if nseg < 1:
            os.close(fd)
            if kind == KIND_FILE:
                os.unlink(path)
            raise InvalidArgument(
                f"{path}: {size} bytes hold no {segment_size}-byte segment after the 1 MiB header"
            )
        label = ContainerLabel(kind, pool_uuid, str(uuidlib.uuid4()), cid, segment_size, nseg)
        try:
            if kind == KIND_FILE:
                os.ftruncate(fd, DATA_OFFSET + nseg * segment_size)
                if preallocate:
                    os.posix_fallocate(fd, DATA_OFFSET, nseg * segment_size)
            os.pwrite(fd, label.encode(), 0)
            os.fsync(fd)
            if kind == KIND_FILE:
                _fsync_folder(path)  # the new name too, or a power cut may lose the file
        except OSError as e:
            os.close(fd)
            if kind == KIND_FILE:
                os.unlink(path)
            raise InvalidArgument(f"cannot prepare container {path}: {e.strerror}") from None
        return cls(label, path, fd, preallocate)

    @classmethod
    def open_at(cls, path: str, expected: ContainerLabel, preallocated: bool) -> FileContainer:
        """Open a file or device and check that it is the container the store describes."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"container {expected.cid} is missing: {path} does not exist") from None
        except OSError as e:
            raise ContainerIOError(f"cannot open container {path}: {e.strerror}") from None
        try:
            raw = os.pread(fd, HEADER_BYTES, 0)
            label = ContainerLabel.decode(raw, path)
            if label != expected:
                raise StoreCorrupt(
                    f"{path} holds container {label.uuid} of pool {label.pool_uuid}, "
                    f"not container {expected.uuid} of pool {expected.pool_uuid}"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(label, path, fd, preallocated)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- I/O -----------------------------------------------------------------------

    def _error(self, e: OSError, what: str, write: bool) -> ContainerIOError | PoolFull:
        """The error to raise for a failed I/O; a medium error marks the container failed."""
        self.last_error = f"{what}: {e.strerror}"
        where = f"container {self.cid} ({self.path}) {what}"
        if e.errno in _FULL_ERRNOS:
            return PoolFull(f"{where}: the file system holding it is full ({e.strerror})")
        if e.errno in MEDIUM_ERRNOS:
            self.io_errors += 1
            self.fail(self.last_error)
        cls = ContainerWriteError if write else ContainerIOError
        return cls(f"{where}: {e.strerror}")

    def readv(self, bufs: Sequence[memoryview | bytearray], offset: int) -> None:
        """Fill ``bufs`` from ``offset`` (absolute within the container)."""
        want = sum(len(b) for b in bufs)
        try:
            got = os.preadv(self.fd, bufs, offset)
        except OSError as e:
            raise self._error(e, f"read at {offset}", False) from None
        if got != want:
            self.last_error = f"short read at {offset}"
            raise ContainerIOError(f"container {self.cid} ({self.path}) short read at {offset}")

    def writev(self, bufs: Sequence[memoryview | bytes | bytearray], offset: int) -> None:
        want = sum(len(b) for b in bufs)
        try:
            got = os.pwritev(self.fd, bufs, offset)
        except OSError as e:
            raise self._error(e, f"write at {offset}", True) from None
        if got != want:  # pwritev on files/devices is all-or-error unless the medium is full
            raise ContainerWriteError(f"container {self.cid} ({self.path}) short write")

    def zero(self, offset: int, length: int) -> None:
        """Make a byte range read as zeros, as cheaply as the medium allows."""
        try:
            if self.kind == KIND_BLOCK:
                self._block_zero(offset, length)
            else:
                self._file_zero(offset, length)
        except OSError as e:
            raise self._error(e, f"zeroing {length} bytes at {offset}", True) from None

    def _file_zero(self, offset: int, length: int) -> None:
        modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
        if not self.preallocated:  # a hole is free space given back to the host
            modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        self._write_zeros(offset, length)

    def _block_zero(self, offset: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("<QQ", offset, length))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_BUF), end - offset)
            os.pwrite(self.fd, memoryview(_ZERO_BUF)[:n], offset)
            offset += n

    def discard(self, pseg: int) -> None:
        """Give a free segment's space back to the medium (best effort)."""
        offset, length = self.offset_of(pseg), self.segment_size
        try:
            if self.kind == KIND_BLOCK:
                fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
            elif not self.preallocated:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass  # discard is advisory: the segment is free whether or not space returns

    def holds_data(self, pseg: int) -> bool:
        """Whether a segment occupies space on a sparse file (for the leak report)."""
        if self.kind != KIND_FILE or self.preallocated:
            return False
        offset = self.offset_of(pseg)
        try:
            return os.lseek(self.fd, offset, _SEEK_DATA) < offset + self.segment_size
        except OSError:
            return False  # ENXIO: no data after offset

    def copy_segment_to(self, pseg: int, dst: Container, dst_pseg: int) -> None:
        """Copy one whole segment, in the kernel when both ends allow it."""
        if not isinstance(dst, FileContainer):  # another kind: through a buffer
            super().copy_segment_to(pseg, dst, dst_pseg)
            return
        src_off, dst_off = self.offset_of(pseg), dst.offset_of(dst_pseg)
        left = self.segment_size
        try:
            while left:
                n = os.copy_file_range(self.fd, dst.fd, left, src_off, dst_off)
                if n == 0:
                    break
                src_off, dst_off, left = src_off + n, dst_off + n, left - n
        except OSError as e:
            if e.errno not in _COPY_FALLBACK:
                what = f"copying segment {pseg} of container {self.cid}"
                raise dst._error(e, what, True) from None
        if left:
            buf = bytearray(left)
            self.readv([buf], src_off)
            dst.writev([buf], dst_off)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
            self.sync_failing = False
        except OSError as e:
            self.sync_failing = True
            self.sync_errors += 1
            self.sync_error = f"{e.strerror} (errno {e.errno})"
            raise self._error(e, "flush", True) from None


def _fsync_folder(path: str) -> None:
    fd = os.open(
        os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _block_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])
