"""``targetvirt-controller``: a controller serving agents of other processes or hosts,
on a RADOS metadata store (active or standby) or on a state folder of this host.

With ``--store file:DIR`` (or ``--state-dir DIR``) it serves the SQLite store that
``targetvirt-handler`` keeps in its state folder (the same layout): the handlers of this
host run as its agents (``targetvirt-handler --controller unix:PATH``).  One host, one
writer (the store's lock file), no standby; mapping changes are journaled before they are
answered, so a controller killed and restarted finds every segment an agent was given.

The controller holds the store as its only writer (RADOS lock with a lease) and serves
agent requests on a Unix socket and/or TCP with mutual TLS; its endpoint is published
in the store, where agents look it up (:class:`~targetvirt.transport.follow.FollowingLink`).
With ``--standby`` it first waits for the store (:class:`~targetvirt.standby.Standby`):
when the active controller's lease lapses or its process dies, the standby fences it
(Ceph blocklist), opens the store as writer, starts serving and publishes its endpoint;
the agents re-register with it.

Every data-path mapping change is committed before it is answered
(``Catalog.durable_mappings``): a standby may take over at any instant and must find
every segment an agent wrote to.  Data written in place is durable when RADOS
acknowledges it; the periodic flush makes the rest durable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from targetvirt.catalog import Catalog
from targetvirt.ceph import Cluster, RadosLocation, is_rados
from targetvirt.clock import Clock, MonotonicClock
from targetvirt.controller import Controller
from targetvirt.errors import Cancelled, InvalidArgument, StoreError, TargetvirtError
from targetvirt.manage.state import open_catalog
from targetvirt.standby import Standby
from targetvirt.store.rados import DEFAULT_LEASE, DEFAULT_NAME, RadosStore
from targetvirt.transport.network import ControllerServer
from targetvirt.transport.tls import Credentials

log = logging.getLogger("targetvirt.controller")

FLUSH_INTERVAL = 5.0
FILE = "file:"  # a store in a state folder of this host


@dataclass
class Settings:
    store: str  # RADOS location of the metadata store, or file:DIR (a state folder)
    store_name: str = DEFAULT_NAME
    unix: str | None = None  # Unix socket path to serve on
    tcp: str | None = None  # host:port to serve on (mutual TLS)
    tls_dir: str | None = None  # folder of the server credentials (with tcp)
    tls_name: str = "controller"
    endpoint: str | None = None  # what agents connect to (default: from unix / tcp)
    standby: bool = False
    store_lease: int = DEFAULT_LEASE  # seconds the store lock outlives a hung controller
    poll: float = 1.0  # seconds between a standby's attempts
    lease: float = 15.0  # agent lease
    ack_timeout: float = 5.0
    commands: str | None = None  # RADOS location: commands by watch/notify there
    create: bool = False  # create the store if absent
    flush_interval: float = FLUSH_INTERVAL  # seconds between periodic flushes

    def agent_endpoint(self) -> str:
        if self.endpoint:
            return self.endpoint
        if self.unix:
            return f"unix:{self.unix}"
        if self.tcp and not self.tcp.startswith(("0.0.0.0:", "[::]:", ":")):
            return self.tcp
        raise InvalidArgument("--endpoint is needed: agents cannot connect to a wildcard address")

    @property
    def state_dir(self) -> str | None:
        """The state folder of a file store (None: RADOS)."""
        return self.store[len(FILE) :] if self.store.startswith(FILE) else None

    def check(self) -> None:
        """Refuse what cannot work, before anything is opened."""
        if self.unix is None and self.tcp is None:
            raise InvalidArgument("the controller needs --unix PATH or --tcp HOST:PORT")
        if self.tcp is not None and not self.tls_dir:
            raise InvalidArgument("--tcp needs --tls-dir: agents and controller prove who they are")
        if self.state_dir is None and not is_rados(self.store):
            raise InvalidArgument(
                f"--store {self.store!r}: give file:DIR (a state folder) or rados:POOL[/NS]"
            )
        if self.state_dir is not None:
            if not self.state_dir:
                raise InvalidArgument("--store file: needs a folder (file:/var/lib/targetvirt)")
            if self.standby:
                raise InvalidArgument(
                    "--standby needs a RADOS store: a state folder has one host, one writer"
                )
            if self.commands is not None:
                raise InvalidArgument("--commands needs a RADOS store")


class ControllerService:
    """The controller of one RADOS store: waits for it (standby), serves, flushes."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        on_wait: Callable[[StoreError], None] | None = None,
    ) -> None:
        settings.check()
        self.settings = settings
        self.endpoint = settings.agent_endpoint()
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.standby: Standby[RadosStore] | None = None
        if settings.standby:
            self.standby = Standby(
                self._open_store, poll=settings.poll, clock=self.clock, on_wait=on_wait
            )
        self.store: RadosStore | None = None  # None with a file store
        self.catalog: Catalog | None = None
        self.controller: Controller | None = None
        self.server: ControllerServer | None = None
        self.bus: object | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def _open_store(self) -> RadosStore:
        s = self.settings
        return RadosStore(
            s.store, name=s.store_name, lease=s.store_lease, create=s.create,
            endpoint=self.endpoint, clock=self.clock,
        )  # fmt: skip

    def start(self) -> Controller:
        """Become the active controller (as a standby: wait for it), then serve."""
        s = self.settings
        if s.state_dir is not None:
            # journaled mapping changes survive this process (the same boot replays them)
            self.catalog = open_catalog(s.state_dir)
            self.controller = Controller(
                self.catalog, clock=self.clock, lease_seconds=s.lease, ack_timeout=s.ack_timeout
            )
            where = f"file:{s.state_dir}"
        else:
            self.controller = self._start_rados()
            assert self.store is not None
            where = self.store.path
        if s.commands is not None:
            from targetvirt.transport.rados_notify import RadosCommandBus  # noqa: PLC0415

            # before agents can register: the hello an agent sends right after its
            # registration must find the bus watching, or its command channel stays shut
            self.bus = RadosCommandBus(self.controller, s.commands)
        tls = Credentials.load(s.tls_dir, s.tls_name) if s.tcp and s.tls_dir else None
        try:
            self.server = ControllerServer(self.controller, unix_path=s.unix, tcp=s.tcp, tls=tls)
        except (OSError, RuntimeError) as e:  # a folder missing, an address in use
            raise InvalidArgument(f"cannot serve agents at {self.endpoint}: {e}") from None
        self.controller.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="flusher", daemon=True)
        self._flusher.start()
        log.info("active: serving agents at %s (store %s)", self.endpoint, where)
        return self.controller

    def _start_rados(self) -> Controller:
        s = self.settings
        if self.standby is not None:
            # one librados handle for every attempt (each opens and drops a store)
            keep = Cluster.get(RadosLocation.parse(s.store), StoreError)
            try:
                self.store = self.standby.run()
            finally:
                keep.release()
        else:
            self.store = self._open_store()
        self.catalog = Catalog.open(self.store)
        self.catalog.durable_mappings = True
        store = self.store
        return Controller(
            self.catalog, clock=self.clock, lease_seconds=s.lease, ack_timeout=s.ack_timeout,
            authority=lambda: store.holds_lease,
        )  # fmt: skip

    @property
    def lease_lost(self) -> str:
        """Why this controller lost the store ("" while it holds it)."""
        return self.store.lease_lost if self.store is not None else ""

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.flush_interval):
            if self.catalog is None:
                return
            try:
                self.catalog.flush()
            except TargetvirtError as e:
                log.error("periodic flush failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self.standby is not None:
            self.standby.stop()
        if self.server is not None:
            self.server.stop()
        if self.bus is not None:
            self.bus.close()  # type: ignore[attr-defined]
        if self.controller is not None:
            self.controller.close()  # and the catalog, committed, and the store
        elif self.catalog is not None:
            self.catalog.close()
        elif self.store is not None:
            self.store.close()


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="targetvirt-controller", description=__doc__.split("\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--store", help="the metadata store: rados:POOL[/NS][?conf=...], or file:DIR (the "
        "state folder of targetvirt-handler, this host only)",
    )  # fmt: skip
    where.add_argument("--state-dir", metavar="DIR", help="the same as --store file:DIR")
    parser.add_argument("--store-name", default=DEFAULT_NAME)
    parser.add_argument("--unix", metavar="PATH", help="serve agents on this Unix socket")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve agents on TCP (mutual TLS)")
    parser.add_argument("--tls-dir", metavar="DIR", help="server credentials folder (--tcp)")
    parser.add_argument("--tls-name", default="controller")
    parser.add_argument(
        "--endpoint", help="what agents connect to, published in the store (default: --unix "
        "as unix:PATH, or --tcp)",
    )  # fmt: skip
    parser.add_argument(
        "--standby", action="store_true",
        help="wait until the active controller's store lease lapses (or its process dies), "
        "fence it and take over",
    )  # fmt: skip
    parser.add_argument("--store-lease", type=int, default=DEFAULT_LEASE, metavar="SECONDS")
    parser.add_argument("--poll", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--lease", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument("--ack-timeout", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--commands", metavar="RADOS", help="commands by watch/notify there")
    parser.add_argument("--create", action="store_true", help="create the store if absent")
    parser.add_argument(
        "--flush-interval", type=float, default=FLUSH_INTERVAL, metavar="SECONDS",
        help="periodic flush: the bound on data written in place but not yet flushed",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info")
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr)
    store = a.store if a.store is not None else FILE + a.state_dir
    return Settings(
        store=store, store_name=a.store_name, unix=a.unix, tcp=a.tcp, tls_dir=a.tls_dir,
        tls_name=a.tls_name, endpoint=a.endpoint, standby=a.standby, store_lease=a.store_lease,
        poll=a.poll, lease=a.lease, ack_timeout=a.ack_timeout, commands=a.commands,
        create=a.create, flush_interval=a.flush_interval,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        service = ControllerService(parse_args(argv))
    except TargetvirtError as e:
        print(f"targetvirt-controller: {e}", file=sys.stderr)
        return 1
    failed: list[str] = []
    starter = threading.Thread(target=_start, args=(service, stop, failed), daemon=True)
    starter.start()
    while not stop.wait(1.0):
        if service.lease_lost:
            # fenced or superseded: another controller serves; never write again
            print(f"targetvirt-controller: lost the store: {service.lease_lost}", file=sys.stderr)
            return 3
    service.stop()
    return 1 if failed else 0


def _start(service: ControllerService, stop: threading.Event, failed: list[str]) -> None:
    """Wait for the store (standby) and serve; a failure ends the process."""
    try:
        service.start()
    except Cancelled:
        pass  # stopped while a standby: nothing failed
    except (TargetvirtError, OSError) as e:  # a state folder that cannot be made, say
        print(f"targetvirt-controller: {e}", file=sys.stderr)
        failed.append(str(e))
        stop.set()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
