"""``rados_notify2`` through ctypes: a notify that tells who answered and who did not.

python3-rados 16.2 cannot do this: ``Ioctx.notify`` returns only True or raises, and
``Ioctx.aio_notify`` hands its callback the replies on success but ``None`` when the
notify timed out -- exactly when the controller must know *which* watcher failed to
answer.  librados' C call returns the reply buffer in both cases (the acks with their
payloads, and the watchers that timed out), so the controller's notifier is this small
binding over its own librados client.  It only notifies: watches use python3-rados.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass

from targetvirt.ceph import CONNECT_TIMEOUT, RadosLocation
from targetvirt.errors import ControllerUnreachable

_c_p = ctypes.c_void_p


class _Ack(ctypes.Structure):
    _fields_ = [
        ("notifier_id", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("payload", ctypes.c_void_p),
        ("payload_len", ctypes.c_uint64),
    ]


class _Timeout(ctypes.Structure):
    _fields_ = [("notifier_id", ctypes.c_uint64), ("cookie", ctypes.c_uint64)]


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _librados() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _declare(ctypes.CDLL("librados.so.2", use_errno=True))
        return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    size_p, acks_pp = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.POINTER(_Ack))
    sigs: dict[str, tuple[list[type], type | None]] = {
        "rados_create2": ([ctypes.POINTER(_c_p), ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_uint64], ctypes.c_int),
        "rados_conf_read_file": ([_c_p, ctypes.c_char_p], ctypes.c_int),
        "rados_conf_set": ([_c_p, ctypes.c_char_p, ctypes.c_char_p], ctypes.c_int),
        "rados_connect": ([_c_p], ctypes.c_int),
        "rados_shutdown": ([_c_p], None),
        "rados_ioctx_create": ([_c_p, ctypes.c_char_p, ctypes.POINTER(_c_p)], ctypes.c_int),
        "rados_ioctx_set_namespace": ([_c_p, ctypes.c_char_p], None),
        "rados_ioctx_destroy": ([_c_p], None),
        "rados_get_instance_id": ([_c_p], ctypes.c_uint64),
        "rados_notify2": ([_c_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64,
                           ctypes.POINTER(_c_p), size_p], ctypes.c_int),
        "rados_buffer_free": ([_c_p], None),
        "rados_decode_notify_response": ([_c_p, ctypes.c_size_t, acks_pp, size_p,
                                          ctypes.POINTER(ctypes.POINTER(_Timeout)), size_p],
                                         ctypes.c_int),
        "rados_free_notify_response": ([ctypes.POINTER(_Ack), ctypes.c_size_t,
                                        ctypes.POINTER(_Timeout)], None),
    }  # fmt: skip
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@dataclass(frozen=True)
class NotifyResult:
    """What one notify came back with: -errno (0: every watcher answered in time), the
    replies as ``(watcher gid, watch cookie, payload)``, the silent ``(gid, cookie)``."""

    ret: int
    acks: tuple[tuple[int, int, bytes], ...]
    timeouts: tuple[tuple[int, int], ...]


class Notifier:
    """One librados client that sends notifies in one pool and namespace."""

    def __init__(self, loc: RadosLocation) -> None:
        self._lib = _librados()
        self._loc = loc
        self._cluster = _c_p()
        self._ioctx = _c_p()
        self._busy = 0  # notifies under way: close waits for them (they use the ioctx)
        self._cond = threading.Condition()
        self._connect()

    def _check(self, ret: int, what: str) -> None:
        if ret < 0:
            self.close()
            raise ControllerUnreachable(
                f"command notifier on {self._loc.where}: {what}: {os.strerror(-ret)}"
            )

    def _connect(self) -> None:
        lib, loc = self._lib, self._loc
        who = f"client.{loc.client_id or 'admin'}".encode()
        self._check(lib.rados_create2(ctypes.byref(self._cluster), b"ceph", who, 0), "create")
        conf = loc.conf.encode() if loc.conf else None
        if loc.conf or not loc.mon_host:
            self._check(lib.rados_conf_read_file(self._cluster, conf), "read the conf file")
        for key, value in (("mon_host", loc.mon_host), ("keyring", loc.keyring),
                           ("client_mount_timeout", str(CONNECT_TIMEOUT))):  # fmt: skip
            if value:
                self._check(lib.rados_conf_set(self._cluster, key.encode(), value.encode()), key)
        self._check(lib.rados_connect(self._cluster), "connect")
        pool = loc.pool.encode()
        self._check(lib.rados_ioctx_create(self._cluster, pool, ctypes.byref(self._ioctx)), "pool")
        lib.rados_ioctx_set_namespace(self._ioctx, loc.namespace.encode())

    @property
    def gid(self) -> int:
        return int(self._lib.rados_get_instance_id(self._cluster))

    def notify(self, obj: str, payload: bytes, timeout: float) -> NotifyResult:
        """Notify every watcher of ``obj`` and wait (GIL released) for the replies.

        librados counts the timeout in whole seconds (rounded down; 0 means its 30 s
        default), so ``timeout`` is rounded down to whole seconds, at least one.
        """
        with self._cond:
            if not self._ioctx:
                return NotifyResult(-errno.ESHUTDOWN, (), ())
            self._busy += 1
        buf, n = _c_p(), ctypes.c_size_t()
        try:
            ret = self._lib.rados_notify2(
                self._ioctx, obj.encode(), payload, len(payload), max(1, int(timeout)) * 1000,
                ctypes.byref(buf), ctypes.byref(n),
            )  # fmt: skip
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()
        if not buf.value:
            return NotifyResult(ret, (), ())
        try:
            return self._decode(ret, buf, n)
        finally:
            self._lib.rados_buffer_free(buf)

    def _decode(self, ret: int, buf: ctypes.c_void_p, n: ctypes.c_size_t) -> NotifyResult:
        acks, nacks = ctypes.POINTER(_Ack)(), ctypes.c_size_t()
        silent, nsilent = ctypes.POINTER(_Timeout)(), ctypes.c_size_t()
        lib = self._lib
        r = lib.rados_decode_notify_response(
            buf, n, ctypes.byref(acks), ctypes.byref(nacks), ctypes.byref(silent),
            ctypes.byref(nsilent),
        )  # fmt: skip
        if r < 0:
            return NotifyResult(ret if ret < 0 else r, (), ())
        try:
            got = tuple(
                (int(a.notifier_id), int(a.cookie),
                 ctypes.string_at(a.payload, a.payload_len) if a.payload else b"")
                for a in acks[: nacks.value]
            )  # fmt: skip
            late = tuple((int(t.notifier_id), int(t.cookie)) for t in silent[: nsilent.value])
        finally:
            lib.rados_free_notify_response(acks, nacks, silent)
        return NotifyResult(ret, got, late)

    def close(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()
        if self._ioctx:
            self._lib.rados_ioctx_destroy(self._ioctx)
            self._ioctx = _c_p()
        if self._cluster:
            self._lib.rados_shutdown(self._cluster)
            self._cluster = _c_p()
