"""The RADOS container kind: one RADOS object per physical segment, in a Ceph pool.

Location: ``rados:<pool>[/<namespace>][?conf=..&id=..&keyring=..&mon_host=..]`` (see
:mod:`targetvirt.ceph`).  A container of ``nsegments`` segments is a set of objects named
after its uuid::

    tvc.<container uuid>.label          the label (the file header's bytes), checked on open
    tvc.<container uuid>.<pseg, 12 hex> segment pseg; absent until written

An absent object, and any byte past the end of a short one, reads as zeros: a fresh or
unmapped segment costs nothing, zeroing a whole segment removes its object, and zeroing
its tail truncates it.  RADOS acknowledges a write once it is durable on every replica,
so :meth:`sync` only waits for the removals still in flight.

I/O goes through librados without a file descriptor (``fd == -1``): the vdisk fast path's
``os.preadv`` fails at once and falls back to :meth:`readv`/:meth:`writev`.  A range that
spans several segments is one asynchronous operation per object, all in flight at once;
removals of freed segments (:meth:`discard`) are asynchronous and tracked, and any later
operation on the same object waits for them first.  python3-rados has no server-side
copy (``copy_from``), so a copy-on-write or migration copy reads the source object and
writes it whole (a missing source removes the destination).

Two python3-rados 16.2 pitfalls are avoided on purpose: ``WriteOp.zero`` passes offset
and length swapped (a zero length crashes the OSD), and ``aio_read`` hands a callback the
whole uninitialised buffer when it read nothing.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import uuid as uuidlib
from collections.abc import Callable, Sequence
from typing import Any

from targetvirt.ceph import Cluster, RadosLocation, describe, errno_of, import_rados
from targetvirt.container import (
    DATA_OFFSET,
    HEADER_BYTES,
    KIND_RADOS,
    Container,
    ContainerLabel,
)
from targetvirt.errors import (
    ContainerIOError,
    ContainerWriteError,
    InvalidArgument,
    NotFound,
    StoreCorrupt,
)

OBJECT_PREFIX = "tvc."


def object_prefix(container_uuid: str) -> str:
    return f"{OBJECT_PREFIX}{container_uuid}."


class RadosContainer(Container):
    """A container whose segments are RADOS objects."""

    def __init__(
        self, label: ContainerLabel, loc: RadosLocation, cluster: Cluster, ioctx: Any
    ) -> None:
        super().__init__(label, str(loc), preallocated=False)
        self.loc = loc
        self._cluster = cluster
        self._ioctx = ioctx
        self._rados = import_rados()
        self._prefix = object_prefix(label.uuid)
        self._end = label.nsegments * label.segment_size
        self._shift = label.segment_size.bit_length() - 1
        self._mask = label.segment_size - 1
        self._pending: dict[str, Any] = {}  # object name -> its removal in flight
        self._cond = threading.Condition()

    def name_of(self, pseg: int) -> str:
        return f"{self._prefix}{pseg:012x}"

    # --- creation and opening ----------------------------------------------------

    @classmethod
    def create_at(
        cls,
        location: str,
        *,
        pool_uuid: str,
        cid: int,
        segment_size: int,
        size: int | None,
        preallocate: bool = False,
    ) -> RadosContainer:
        """Label a new container in a Ceph pool (objects are thin: nothing is preallocated)."""
        loc = RadosLocation.parse(location)
        if size is None:
            raise InvalidArgument(f"give a size for a RADOS container ({loc})")
        nseg = size // segment_size
        if nseg < 1:
            raise InvalidArgument(f"{loc}: {size} bytes hold no {segment_size}-byte segment")
        label = ContainerLabel(KIND_RADOS, pool_uuid, str(uuidlib.uuid4()), cid, segment_size, nseg)
        cluster = Cluster.get(loc, ContainerIOError)
        try:
            ioctx = cluster.ioctx(loc, ContainerIOError)
            container = cls(label, loc, cluster, ioctx)
        except BaseException:
            cluster.release()
            raise
        rados = container._rados
        op = ioctx.create_write_op()
        try:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(label.encode())
            ioctx.operate_write_op(op, container._prefix + "label")
        except rados.Error as e:
            container.close()
            raise InvalidArgument(f"cannot label a container in {loc}: {describe(e)}") from None
        finally:
            ioctx.release_write_op(op)
        return container

    @classmethod
    def open_at(cls, location: str, expected: ContainerLabel, preallocated: bool) -> RadosContainer:
        loc = RadosLocation.parse(location)
        cluster = Cluster.get(loc, ContainerIOError)
        try:
            ioctx = cluster.ioctx(loc, ContainerIOError)
        except BaseException:
            cluster.release()
            raise
        container = cls(expected, loc, cluster, ioctx)
        rados = container._rados
        name = container._prefix + "label"
        try:
            raw = ioctx.read(name, HEADER_BYTES, 0)
            label = ContainerLabel.decode(raw, f"{loc.where}:{name}")
            if label != expected:
                raise StoreCorrupt(
                    f"{loc.where}:{name} labels container {label.uuid} of pool "
                    f"{label.pool_uuid}, not container {expected.uuid} of pool "
                    f"{expected.pool_uuid}"
                )
        except rados.ObjectNotFound:
            container.close()
            raise NotFound(
                f"container {expected.cid} is missing: {loc.where} has no object {name}"
            ) from None
        except rados.Error as e:
            container.close()
            raise ContainerIOError(f"cannot open container {loc}: {describe(e)}") from None
        except BaseException:
            container.close()
            raise
        return container

    def close(self) -> None:
        if self._ioctx is None:
            return
        self._drain()
        self._ioctx.close()
        self._ioctx = None
        self._cluster.release()

    # --- helpers -------------------------------------------------------------------

    def _error(self, e: BaseException, what: str, write: bool) -> ContainerIOError:
        if errno_of(e) == errno.EIO:
            self.io_errors += 1
        self.last_error = f"{what}: {describe(e)}"
        cls = ContainerWriteError if write else ContainerIOError
        return cls(f"container {self.cid} ({self.loc.where}) {what}: {describe(e)}")

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(segment, offset in it, length) of each object a byte range touches."""
        rel = offset - DATA_OFFSET
        if rel < 0 or rel + length > self._end:
            raise ContainerIOError(
                f"container {self.cid} ({self.loc.where}): {length} bytes at {offset} "
                "are outside its segments"
            )
        seg = self.segment_size
        out = []
        while length:
            pseg, intra = divmod(rel, seg)
            n = min(length, seg - intra)
            out.append((pseg, intra, n))
            rel += n
            length -= n
        return out

    def _one_object(self, offset: int, n: int) -> tuple[str, int] | None:
        """The object and the offset in it of ``n`` bytes at ``offset``, when they lie
        inside one segment (the data path's case); None otherwise."""
        rel = offset - DATA_OFFSET
        intra = rel & self._mask
        if rel < 0 or intra + n > self.segment_size or rel + n > self._end:
            return None
        return f"{self._prefix}{rel >> self._shift:012x}", intra

    def _settle(self, name: str) -> None:
        """Wait for a removal of ``name`` still in flight (ops on it must come after)."""
        if self._pending:
            completion = self._pending.get(name)
            if completion is not None:
                completion.wait_for_complete_and_cb()

    def _drain(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()

    def _remove(self, name: str) -> None:
        self._settle(name)
        with contextlib.suppress(self._rados.ObjectNotFound):
            self._ioctx.remove_object(name)

    # --- I/O -----------------------------------------------------------------------

    def readv(self, bufs: Sequence[memoryview | bytearray], offset: int) -> None:
        if len(bufs) == 1:  # the data path's case: one buffer within one segment
            mv = memoryview(bufs[0])
            n = mv.nbytes
            one = self._one_object(offset, n)
            if one is not None:
                name, intra = one
                if self._pending:
                    self._settle(name)
                try:
                    data = self._ioctx.read(name, n, intra)
                except self._rados.ObjectNotFound:
                    data = b""
                except self._rados.Error as e:
                    what = f"read of segment {(offset - DATA_OFFSET) >> self._shift}"
                    raise self._error(e, what, False) from None
                if len(data) == n and mv.format == "B":
                    mv[:] = data
                else:
                    _scatter([mv], data)
                return
        length = sum(memoryview(b).nbytes for b in bufs)
        pieces = self._pieces(offset, length)
        if len(pieces) == 1:
            pseg, intra, n = pieces[0]
            name = self.name_of(pseg)
            self._settle(name)
            try:
                data = self._ioctx.read(name, n, intra)
            except self._rados.ObjectNotFound:
                data = b""
            except self._rados.Error as e:
                raise self._error(e, f"read of segment {pseg}", False) from None
        else:
            data = b"".join(self._read_many(pieces))
        _scatter(bufs, data)

    def start_io(
        self, bufs: Sequence[memoryview], offset: int, write: bool, done: Callable[[bool], None]
    ) -> bool:
        """One asynchronous operation on one object; ``done`` runs in librados's
        callback thread.  A failure reports ``done(False)`` and counts nothing: the
        caller's slow path does the I/O again and names the error."""
        n = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        one = self._one_object(offset, n)
        if one is None:
            return False
        name, intra = one
        if self._pending and name in self._pending:
            return False  # its removal must land first: a wait the caller cannot afford
        try:
            if not write:
                self._ioctx.aio_read(name, n, intra, _read_into(bufs, done))
                return True
            data = bytes(bufs[0]) if len(bufs) == 1 else b"".join(bufs)
            if n == self.segment_size:
                self._ioctx.aio_write_full(name, data, oncomplete=_wrote(done))
            else:
                self._ioctx.aio_write(name, data, intra, oncomplete=_wrote(done))
        except self._rados.Error:
            return False
        return True

    def _read_many(self, pieces: list[tuple[int, int, int]]) -> list[bytes]:
        """Every piece read with all reads in flight at once; short or absent: zeros."""
        results: list[bytes] = [b""] * len(pieces)

        def done(i: int, n: int) -> Any:
            def cb(completion: Any, data: bytes | None) -> None:
                ret = completion.get_return_value()
                # pad to n: the piece after a short object must not shift into this one
                results[i] = (data[:ret] if data is not None and ret > 0 else b"").ljust(n, b"\0")

            return cb

        completions = []
        for i, (pseg, intra, n) in enumerate(pieces):
            name = self.name_of(pseg)
            self._settle(name)
            completions.append(self._ioctx.aio_read(name, n, intra, done(i, n)))
        for (pseg, _, _), completion in zip(pieces, completions, strict=True):
            completion.wait_for_complete_and_cb()
            ret = completion.get_return_value()
            if ret < 0 and -ret != errno.ENOENT:
                raise self._error(OSError(-ret, ""), f"read of segment {pseg}", False)
        return results

    def writev(self, bufs: Sequence[memoryview | bytes | bytearray], offset: int) -> None:
        if len(bufs) == 1:
            data = bufs[0] if isinstance(bufs[0], bytes) else bytes(bufs[0])
        else:
            data = b"".join(bufs)
        pieces = self._pieces(offset, len(data))
        seg = self.segment_size
        if len(pieces) == 1:
            pseg, intra, n = pieces[0]
            name = self.name_of(pseg)
            self._settle(name)
            try:
                if n == seg:
                    self._ioctx.write_full(name, data)
                else:
                    self._ioctx.write(name, data, intra)
            except self._rados.Error as e:
                raise self._error(e, f"write of segment {pseg}", True) from None
            return
        view = memoryview(data)
        completions = []
        pos = 0
        for pseg, intra, n in pieces:
            name = self.name_of(pseg)
            self._settle(name)
            part = bytes(view[pos : pos + n])
            if n == seg:
                completions.append((pseg, self._ioctx.aio_write_full(name, part)))
            else:
                completions.append((pseg, self._ioctx.aio_write(name, part, intra)))
            pos += n
        for pseg, completion in completions:
            completion.wait_for_complete()
            ret = completion.get_return_value()
            if ret < 0:
                raise self._error(OSError(-ret, ""), f"write of segment {pseg}", True)

    def zero(self, offset: int, length: int) -> None:
        seg = self.segment_size
        for pseg, intra, n in self._pieces(offset, length):
            name = self.name_of(pseg)
            try:
                if n == seg:
                    self._remove(name)
                elif intra + n == seg:
                    self._settle(name)
                    self._ioctx.trunc(name, intra)
                else:
                    self._settle(name)
                    self._ioctx.write(name, bytes(n), intra)
            except self._rados.ObjectNotFound:
                pass  # absent: it reads as zeros already
            except self._rados.Error as e:
                raise self._error(e, f"zeroing segment {pseg}", True) from None

    def discard(self, pseg: int) -> None:
        """Remove a free segment's object, asynchronously (best effort)."""
        name = self.name_of(pseg)
        self._settle(name)

        def done(completion: Any) -> None:
            with self._cond:
                if self._pending.get(name) is completion:
                    del self._pending[name]
                self._cond.notify_all()

        # discard is advisory: the segment is free whether or not its space returns
        with self._cond, contextlib.suppress(self._rados.Error):
            self._pending[name] = self._ioctx.aio_remove(name, oncomplete=done)

    def holds_data(self, pseg: int) -> bool:
        name = self.name_of(pseg)
        self._settle(name)
        try:
            self._ioctx.stat(name)
        except self._rados.ObjectNotFound:
            return False
        except self._rados.Error as e:
            raise self._error(e, f"looking at segment {pseg}", False) from None
        return True

    def segments_holding_data(self, psegs: Sequence[int]) -> list[int]:
        """One listing of the namespace rather than a stat per segment."""
        self._drain()
        prefix, wanted, found = self._prefix, set(psegs), []
        try:
            for obj in self._ioctx.list_objects():
                key = obj.key
                if key.startswith(prefix) and key != prefix + "label":
                    try:
                        pseg = int(key[len(prefix) :], 16)
                    except ValueError:
                        continue
                    if pseg in wanted:
                        found.append(pseg)
        except self._rados.Error as e:
            raise self._error(e, "listing segments", False) from None
        return sorted(found)

    def copy_segment_to(self, pseg: int, dst: Container, dst_pseg: int) -> None:
        if not isinstance(dst, RadosContainer):
            super().copy_segment_to(pseg, dst, dst_pseg)
            return
        src_name, dst_name = self.name_of(pseg), dst.name_of(dst_pseg)
        self._settle(src_name)
        try:
            data = self._ioctx.read(src_name, self.segment_size, 0)
        except self._rados.ObjectNotFound:
            data = b""
        except self._rados.Error as e:
            raise self._error(e, f"copying segment {pseg}", False) from None
        try:
            if data:
                dst._settle(dst_name)
                dst._ioctx.write_full(dst_name, data)
            else:
                dst._remove(dst_name)
        except self._rados.Error as e:
            raise dst._error(e, f"copying into segment {dst_pseg}", True) from None

    def sync(self) -> None:
        """Writes are durable when acknowledged; wait for the removals in flight."""
        self._drain()


def _wrote(done: Callable[[bool], None]) -> Callable[[Any], None]:
    def cb(completion: Any) -> None:
        done(completion.get_return_value() >= 0)

    return cb


def _read_into(
    bufs: Sequence[memoryview], done: Callable[[bool], None]
) -> Callable[[Any, Any], None]:
    """An aio_read callback that fills ``bufs``: an absent object or the part past a
    short one reads as zeros.  (python3-rados hands over its whole buffer when it read
    nothing: only the return value says how much is data.)"""

    def cb(completion: Any, data: bytes | None) -> None:
        ret = completion.get_return_value()
        if ret == -errno.ENOENT:
            ret = 0
        elif ret < 0 or (ret and data is None):
            done(False)
            return
        mv = bufs[0]
        if len(bufs) == 1 and ret == mv.nbytes and mv.format == "B":
            mv[:] = data  # type: ignore[assignment]
        else:
            _scatter(bufs, data[:ret] if ret and data is not None else b"")
        done(True)

    return cb


def _scatter(bufs: Sequence[memoryview | bytearray], data: bytes) -> None:
    """Copy ``data`` into ``bufs`` in order; bytes past its end become zeros."""
    src = memoryview(data)
    pos, have = 0, len(data)
    for buf in bufs:
        mv = memoryview(buf).cast("B")
        k = len(mv)
        take = min(k, max(0, have - pos))
        if take:
            mv[:take] = src[pos : pos + take]
        if take < k:
            mv[take:] = bytes(k - take)
        pos += k
