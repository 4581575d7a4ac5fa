"""Ceph plumbing shared by the RADOS container kind and the RADOS metadata store.

A *RADOS location* names a Ceph pool, an optional namespace in it, and how to reach and
authenticate to the cluster::

    rados:<pool>[/<namespace>][?conf=<file>&id=<client>&keyring=<file>&mon_host=<addrs>]

``conf`` is a ceph.conf (default: librados' search path, /etc/ceph/ceph.conf first);
``id`` the cephx user without its ``client.`` prefix (default ``admin``); ``keyring`` a
keyring file (default: what the conf file says); ``mon_host`` monitor addresses when no
conf file is wanted.  The location string is what the metadata store records, so a
container reopens with exactly the same settings; it never holds a secret (a keyring is
named by its path).

One librados handle per distinct cluster settings is shared by everything in the
process (a handle costs a dozen threads and a monitor session).  ``python3-rados`` is
imported on first use only: file-backed pools never need it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from targetvirt.errors import InvalidArgument, TargetvirtError

if TYPE_CHECKING:
    import rados

SCHEME = "rados:"
_OPTIONS = ("conf", "id", "keyring", "mon_host")
CONNECT_TIMEOUT = 30  # seconds to reach the monitors before giving up


def is_rados(location: str) -> bool:
    return location.startswith(SCHEME)


@dataclass(frozen=True)
class RadosLocation:
    """A Ceph pool (and namespace) and the client settings to reach it."""

    pool: str
    namespace: str = ""
    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None
    mon_host: str | None = None

    @classmethod
    def parse(cls, location: str) -> RadosLocation:
        if not is_rados(location):
            raise InvalidArgument(f"{location!r} is not a RADOS location (rados:<pool>[/<ns>])")
        body, _, query = location[len(SCHEME) :].partition("?")
        pool, _, namespace = body.partition("/")
        opts: dict[str, str] = {}
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            if not eq or key not in _OPTIONS or not value:
                raise InvalidArgument(
                    f"RADOS location option {part!r} is not one of "
                    f"{', '.join(o + '=...' for o in _OPTIONS)}"
                )
            if key in opts:
                raise InvalidArgument(f"RADOS location gives {key} twice")
            opts[key] = unquote(value)
        loc = cls(
            unquote(pool), unquote(namespace), opts.get("conf"), opts.get("id"),
            opts.get("keyring"), opts.get("mon_host"),
        )  # fmt: skip
        loc.validate()
        return loc

    def validate(self) -> None:
        if not self.pool or any(c in self.pool for c in "/?&"):
            raise InvalidArgument(f"Ceph pool name {self.pool!r} is empty or holds / ? &")
        if any(c in self.namespace for c in "/?&"):
            raise InvalidArgument(f"RADOS namespace {self.namespace!r} holds / ? &")
        if self.client_id is not None and self.client_id.startswith("client."):
            raise InvalidArgument(
                f"give the cephx user without its prefix: id={self.client_id[7:]}"
            )

    def __str__(self) -> str:
        def q(v: str) -> str:
            return quote(v, safe="/:._-@,[]")

        out = SCHEME + q(self.pool).replace("/", "%2F")
        if self.namespace:
            out += "/" + q(self.namespace).replace("/", "%2F")
        opts = [
            f"{key}={q(value)}"
            for key, value in zip(
                _OPTIONS, (self.conf, self.client_id, self.keyring, self.mon_host), strict=True
            )
            if value
        ]
        return out + ("?" + "&".join(opts) if opts else "")

    def with_namespace(self, namespace: str) -> RadosLocation:
        return replace(self, namespace=namespace)

    @property
    def cluster_key(self) -> tuple[str | None, ...]:
        return (self.conf, self.client_id, self.keyring, self.mon_host)

    @property
    def where(self) -> str:
        """The pool and namespace, for messages."""
        return f"{self.pool}/{self.namespace}" if self.namespace else self.pool


def import_rados() -> Any:
    try:
        import rados  # noqa: PLC0415 - optional: only RADOS locations need it
    except ImportError:
        raise InvalidArgument(
            "Ceph RADOS support needs python3-rados (apt install python3-rados)"
        ) from None
    return rados


def errno_of(e: BaseException) -> int | None:
    """The errno of a librados error (python-rados errors carry a positive one)."""
    n = getattr(e, "errno", None)
    return abs(n) if isinstance(n, int) else None


def describe(e: BaseException) -> str:
    """A librados error as a short phrase (no object names, no newlines)."""
    n = errno_of(e)
    if n == errno.ESHUTDOWN:
        return "the client was fenced (blocklisted) or shut down"
    if n == errno.ETIMEDOUT:
        return "timed out"
    if n:
        return os.strerror(n)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Cluster:
    """A shared, reference-counted librados handle for one set of client settings."""

    _shared: dict[tuple[str | None, ...], Cluster] = {}
    _lock = threading.Lock()
    _listeners: list[Callable[[Cluster], None]] = []

    def __init__(self, key: tuple[str | None, ...], handle: rados.Rados) -> None:
        self.key = key
        self.handle = handle
        self.refs = 0
        self.addr: str = handle.get_addrs()  # what a blocklist entry fences
        self.fsid: str = handle.get_fsid()

    @classmethod
    def get(cls, loc: RadosLocation, error: type[TargetvirtError]) -> Cluster:
        """The handle for ``loc``'s settings, connecting on first use.

        ``error`` is the class raised when the cluster cannot be reached (a container
        raises ContainerIOError, a store StoreError).  A new handle is announced to the
        listeners (a store holding the writer's role records its address, so that
        fencing this process fences every handle it uses) before anyone uses it.
        """
        with cls._lock:
            cluster = cls._shared.get(loc.cluster_key)
            new = cluster is None
            if cluster is None:
                cluster = cls(loc.cluster_key, _connect(loc, error))
                cls._shared[loc.cluster_key] = cluster
            cluster.refs += 1
            listeners = list(cls._listeners) if new else []
        try:
            for listener in listeners:
                listener(cluster)
        except BaseException:
            cluster.release()
            raise
        return cluster

    @classmethod
    def listen(cls, listener: Callable[[Cluster], None]) -> None:
        with cls._lock:
            cls._listeners.append(listener)

    @classmethod
    def unlisten(cls, listener: Callable[[Cluster], None]) -> None:
        with cls._lock:
            if listener in cls._listeners:
                cls._listeners.remove(listener)

    @classmethod
    def addrs(cls, fsid: str) -> list[str]:
        """Client addresses of this process's handles to the cluster ``fsid``."""
        with cls._lock:
            return sorted({c.addr for c in cls._shared.values() if c.fsid == fsid})

    @classmethod
    def sharing(cls, fsid: str) -> list[Cluster]:
        """This process's handles to the cluster ``fsid``."""
        with cls._lock:
            return [c for c in cls._shared.values() if c.fsid == fsid]

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if self._shared.get(self.key) is self:
                del self._shared[self.key]
        self.handle.shutdown()

    def ioctx(self, loc: RadosLocation, error: type[TargetvirtError]) -> rados.Ioctx:
        rados = import_rados()
        try:
            ioctx = self.handle.open_ioctx(loc.pool)
        except rados.ObjectNotFound:
            raise error(f"Ceph pool {loc.pool} does not exist") from None
        except rados.Error as e:
            raise error(f"cannot open Ceph pool {loc.pool}: {describe(e)}") from None
        ioctx.set_namespace(loc.namespace)
        return ioctx


@contextlib.contextmanager
def reachable(loc: RadosLocation, error: type[TargetvirtError]) -> Iterator[Cluster]:
    """Connect to ``loc``'s cluster and check that its pool opens; the handle stays
    shared while the block runs (so a caller can connect before it takes its locks,
    and what it creates inside reuses the connection)."""
    cluster = Cluster.get(loc, error)
    try:
        cluster.ioctx(loc, error).close()
        yield cluster
    finally:
        cluster.release()


def _connect(loc: RadosLocation, error: type[TargetvirtError]) -> rados.Rados:
    rados = import_rados()
    who = f"client.{loc.client_id or 'admin'}"
    try:
        handle = rados.Rados(rados_id=loc.client_id or "admin")
        if loc.conf:
            handle.conf_read_file(loc.conf)
        elif not loc.mon_host:
            handle.conf_read_file()  # librados' default search path
        if loc.mon_host:
            handle.conf_set("mon_host", loc.mon_host)
        if loc.keyring:
            handle.conf_set("keyring", loc.keyring)
        handle.conf_set("client_mount_timeout", str(CONNECT_TIMEOUT))
    except rados.Error as e:
        raise error(f"cannot configure Ceph client {who} for {loc}: {describe(e)}") from None
    try:
        handle.connect(timeout=CONNECT_TIMEOUT)
    except rados.Error as e:
        handle.shutdown()
        raise error(f"cannot connect to Ceph as {who} ({loc}): {describe(e)}") from None
    return handle
