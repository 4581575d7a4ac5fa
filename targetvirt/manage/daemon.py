"""``targetvirt-handler``: the daemon that serves targetvirt LUNs on this host.

It composes the pieces: the catalog (metadata store in the state folder) under the
controller, an in-process agent that serves every LUN from its copies of the tables
(so snapshots, freezes and delays reach the data path through the table protocol), the
TCMU service (every ``user:targetvirt`` device of this host), the ``org.kernel.TCMUService1``
registration (so targetcli lists and validates ``user:targetvirt``), a periodic flush
(the durability contract's "at least every few seconds"), the thin-provisioning soft
threshold (a pool reaching it makes every LUN of its vdisks report THIN PROVISIONING SOFT
THRESHOLD REACHED to its initiators), systemd readiness and
watchdog, and a clean shutdown on SIGTERM: devices finish or fail back their in-flight
commands, then the metadata is committed.

With ``--controller ENDPOINT`` it is an agent only: the controller is another process
(``targetvirt-controller``, on this host's state folder or on RADOS) reached over a Unix
socket, TCP with mutual TLS, or whichever controller owns a RADOS store.  No catalog, no
controller, no management API here: the TCMU service serves every device from the agent's
copies of the tables, and the LUN identity (NAA) comes from the controller's description
of the vdisk.  Management (pools, vdisks, exports) is done where the controller runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dbus

from targetvirt.agent import Agent, AgentVDisk
from targetvirt.ceph import is_rados
from targetvirt.controller import Controller
from targetvirt.errors import ControllerUnreachable, InvalidArgument, NotFound, TargetvirtError
from targetvirt.manage.api import ManagerBusService
from targetvirt.manage.common import AGENT_FILE, BUS_ENV, BUS_FILE
from targetvirt.manage.lio import LioExporter
from targetvirt.manage.manager import Manager
from targetvirt.manage.state import open_catalog
from targetvirt.transport import ControllerLink
from targetvirt.transport.inprocess import InProcessLink
from tcmu_handler import uio
from tcmu_handler.modestate import ModeStore
from tcmu_handler.scsi.lun import LunState
from tcmu_handler.service import TcmuService
from tcmu_handler.tcmu_dbus import TcmuBusService

try:  # Debian's python3-systemd; without it (e.g. in a venv off Debian) no notifications
    from systemd.daemon import notify as _sd_notify
except ImportError:  # pragma: no cover
    _sd_notify = None

log = logging.getLogger("targetvirt.handler")

FLUSH_INTERVAL = 5.0  # seconds: the bound on unflushed data, as a disk cache would have


class LogfmtFormatter(logging.Formatter):
    """One event per line, ``key=value`` pairs (journald and grep friendly)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info).replace("\n", " | ")
        return " ".join(
            f"{k}={json.dumps(v) if ' ' in str(v) or not v else v}" for k, v in fields.items()
        )


def default_dir(env: str, fallback: str) -> str:
    return os.environ.get(env, fallback)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="targetvirt-handler", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        default=default_dir("TARGETVIRT_STATE_DIR", "/var/lib/targetvirt"),
        help="metadata store folder (env TARGETVIRT_STATE_DIR)",
    )
    parser.add_argument(
        "--run-dir",
        default=default_dir("TARGETVIRT_RUN_DIR", "/run/targetvirt"),
        help="runtime folder: sockets, pid (env TARGETVIRT_RUN_DIR)",
    )
    parser.add_argument("--workers", type=int, default=4, help="I/O threads per device")
    parser.add_argument(
        "--network-workers", type=int, default=16,
        help="I/O threads per device whose vdisk has RADOS containers (each waits a round "
        "trip per command)",
    )  # fmt: skip
    parser.add_argument(
        "--devices",
        default="*",
        metavar="GLOB",
        help="serve only the targetvirt devices whose LIO storage-object name matches (shell "
        "pattern; default all): several daemons on one host each serve their own",
    )
    parser.add_argument("--no-dbus", action="store_true", help="do not register on the system bus")
    parser.add_argument(
        "--bus-address",
        default=os.environ.get(BUS_ENV) or None,
        help=f"serve D-Bus on this bus instead of the system bus (env {BUS_ENV})",
    )
    parser.add_argument(
        "--lun-timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help="LIO's cmd_time_out for the LUNs this daemon creates: how long a command waits "
        "for the handler (e.g. across a restart) before it fails; default LIO's 30 s",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="agent lease: how long an agent that lost the controller may go on writing",
    )
    parser.add_argument(
        "--frozen-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a write waits on a frozen (no-write) vdisk before it fails as "
        "write-protected (keep it below the LUN's command timeout)",
    )
    parser.add_argument(
        "--no-restore",
        action="store_true",
        help="do not restore saved exports at start (the targetvirt-restore unit does it)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    agent = parser.add_argument_group(
        "agent only", "serve LUNs as an agent of a controller in another process or host"
    )
    agent.add_argument(
        "--controller",
        metavar="ENDPOINT",
        help="the controller: unix:PATH, HOST:PORT (mutual TLS, --tls-dir), or the RADOS "
        "store whose active controller to follow (rados:POOL[/NS][?conf=...])",
    )
    agent.add_argument(
        "--agent-id",
        default=None,
        help="this agent's id (default: the host name; with TLS, its certificate's name)",
    )
    agent.add_argument(
        "--tls-dir", metavar="DIR", help="CA certificate and this agent's <agent-id>.pem/.key (TCP)"
    )
    agent.add_argument(
        "--controller-wait",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="how long an I/O that needs the controller (a lease, a mapping) waits for an "
        "unreachable one before it fails; keep it below the LUNs' command timeout",
    )
    agent.add_argument(
        "--commands",
        metavar="RADOS",
        help="take the controller's commands as RADOS notifies on the headers of the vdisks "
        "served, at rados:POOL[/NS][?conf=...] (the controller's --commands); an agent that "
        "does not answer is blocklisted by the controller. Requests still go to --controller",
    )
    agent.add_argument(
        "--call-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="deadline of each request to the controller",
    )
    args = parser.parse_args(argv)
    if not args.devices.strip():
        parser.error("--devices needs a pattern (e.g. 'gw1_*'; '*' serves every device)")
    if args.workers < 1 or args.network_workers < 1:
        parser.error("--workers and --network-workers must be at least 1")
    _check_agent_args(parser, args)
    return args  # fmt: skip


def _check_agent_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Agent-only options need --controller; an endpoint must be one we can reach."""
    if args.controller is None:
        if args.tls_dir or args.agent_id or args.commands:
            parser.error("--tls-dir, --agent-id and --commands need --controller")
        return
    if args.commands is not None and not is_rados(args.commands):
        parser.error(f"--commands {args.commands!r}: give rados:POOL[/NS][?conf=...]")
    if args.controller_wait < 0 or args.call_timeout <= 0:
        parser.error("--controller-wait must be >= 0 and --call-timeout > 0")
    target = args.controller
    if target.startswith("unix:"):
        if len(target) == len("unix:"):
            parser.error("--controller unix: needs a socket path")
    elif not is_rados(target):
        host, sep, port = target.rpartition(":")
        if not (sep and host and port.isdigit()):
            parser.error(f"--controller {target!r}: give unix:PATH, HOST:PORT or rados:POOL[/NS]")
        if not args.tls_dir:
            parser.error("--controller HOST:PORT needs --tls-dir (mutual TLS)")


def _vdisk_name(cfg: Any) -> str:
    return str(cfg.vdisk) + (f"@{cfg.snapshot}" if cfg.snapshot else "")


class Serving:
    """What both modes share: the agent and the TCMU service that serves devices from it
    (and the ``org.kernel.TCMUService1`` registration)."""

    def __init__(self, args: argparse.Namespace, agent: Agent) -> None:
        self.args = args
        self.agent = agent
        self._stop = threading.Event()
        self.tcmu: Any = None
        self.bus: Any = None

    def _known(self, name: str) -> None:
        """Raise NotFound now if ``name`` is surely no vdisk (before serving it)."""

    def check_vdisk(self, cfg: Any) -> None:
        raise NotImplementedError

    def open_lun(self, cfg: Any, info: Any) -> tuple[AgentVDisk, LunState]:
        """A new device: the agent serves its vdisk; the LUN's identity is the vdisk's."""
        name = _vdisk_name(cfg)
        self._known(name)
        if info.block_size <= 0:
            info = dataclasses.replace(info, block_size=self._hw_block_size(info))
        served = self.agent.serve(name)
        if info.size > served.size:
            if not self.tcmu.devices_of(name):
                self.agent.release(name)
            raise InvalidArgument(
                f"LUN size {info.size} is larger than {name} ({served.size} bytes)"
            )
        lun = LunState.for_vdisk(
            served.uuid, info.size // info.block_size, block_size=info.block_size,
            segment_size=served.segment_size, read_only=served.readonly or cfg.read_only,
        )  # fmt: skip
        # the controller tells the agent when the pool reaches its soft threshold
        served.soft_threshold_listeners.append(lun.report_soft_threshold)
        return served, lun

    def close_lun(self, vdisk: str) -> None:
        """The last device of ``vdisk`` is gone: the agent stops serving it."""
        self.agent.release(vdisk)

    @staticmethod
    def _hw_block_size(info: Any) -> int:
        """The kernel sends ADDED_DEVICE before it copies hw_block_size into the block size
        that ``info`` shows (and does not wait for us: nl_reply_supported=-1), so a fast
        reader sees ``SectorSize: 0``.  The attribute has been set since before enable."""
        attrib = uio.CONFIGFS_ROOT / "target/core" / f"user_{info.hba}" / info.name / "attrib"
        try:
            size = int((attrib / "hw_block_size").read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"cannot read the block size of {info.name}: {e}") from None
        if size <= 0:
            raise InvalidArgument(f"{info.name} has no block size yet")
        return size

    def device_state(self, vdisk: str) -> str:
        """What the TCMU service does with the device of ``vdisk`` (for the manager)."""
        if self.tcmu is None:
            return "absent"
        if self.tcmu.devices_of(vdisk):
            return "served"
        for key, why in list(self.tcmu.refused.items()):
            if key.partition("/")[2] == vdisk:
                return f"refused: {why}"
        return "absent"

    def _start_tcmu(self) -> None:
        self.tcmu = TcmuService(
            self.open_lun, close_lun=self.close_lun, workers=self.args.workers,
            network_workers=self.args.network_workers,
            modes=ModeStore(Path(self.args.run_dir) / "modes"), devices=self.args.devices,
        )  # fmt: skip
        self.tcmu.start()

    def _start_dbus(self) -> None:
        try:
            self.bus = TcmuBusService(self.check_vdisk, address=self.args.bus_address)
            self.bus.start()
        except Exception as e:  # noqa: BLE001 - the data path runs without D-Bus
            log.warning("not registered on the system bus: %s", e)
            self.bus = None
            return
        if self.bus.mode == "registered":
            self.tcmu.set_reply_mode(False)
            log.info("tcmu-runner runs: the kernel no longer waits for answers to device "
                     "events (tcmu-runner would refuse ours first)")  # fmt: skip

    def _stop_serving(self) -> None:
        if self.tcmu is not None:
            self.tcmu.stop()
        if self.bus is not None:
            self.bus.stop()
        self.agent.close()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def ready_line(self) -> str:
        raise NotImplementedError


class Handler(Serving):
    """The single-host daemon: controller, agent, TCMU service, D-Bus, flusher."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.catalog = open_catalog(args.state_dir)
        self.controller = Controller(self.catalog, lease_seconds=args.lease)
        # The agent id is the host name: stable across restarts, so a restarted
        # controller sees its agent back at once instead of waiting out the old lease.
        super().__init__(args, Agent(
            socket.gethostname(), InProcessLink(self.controller),
            frozen_timeout=args.frozen_timeout,
        ))  # fmt: skip
        self.manager: Manager | None = None
        self.api: ManagerBusService | None = None

    def _known(self, name: str) -> None:
        self.catalog.vdisk(name)

    def check_vdisk(self, cfg: Any) -> None:
        name = _vdisk_name(cfg)
        if name not in self.catalog.vdisks:
            raise NotFound(f"no vdisk named {name!r} in targetvirt")

    def ready_line(self) -> str:
        return f"state={self.args.state_dir}"

    def start(self) -> None:
        self.controller.start()  # timers: freeze timeouts, leases
        self.agent.connect()
        self.agent.start()  # lease keeper
        self._start_tcmu()
        # no longer an agent-only daemon here (the shell would look elsewhere)
        (Path(self.args.run_dir) / AGENT_FILE).unlink(missing_ok=True)
        # The handler serves devices from here on: exports may be (re)created.
        self.manager = Manager(
            self.catalog, self.args.state_dir,
            exporter=LioExporter(cmd_time_out=self.args.lun_timeout),
            ops=self.controller, device_state=self.device_state,
        )  # fmt: skip
        if not self.args.no_restore:
            self._restore()
        if not self.args.no_dbus:
            self._start_dbus()
            self._start_api()
        threading.Thread(target=self._flusher, name="flusher", daemon=True).start()

    def _restore(self) -> None:
        assert self.manager is not None
        if not self.manager.exports.targets:
            return
        try:
            result = self.manager.restore_exports()
        except TargetvirtError as e:
            log.error("exports not restored: %s", e)
            return
        (log.warning if result["errors"] else log.info)("%s", result["message"])

    def _start_api(self) -> None:
        assert self.manager is not None
        self.api = ManagerBusService(self.manager, self.args.bus_address)
        try:
            self.api.start()  # without it the shell cannot reach us: a failure is fatal
        except dbus.DBusException as e:
            self.api = None
            raise TargetvirtError(f"cannot serve the management API on D-Bus: {e}") from None
        bus_file = Path(self.args.run_dir) / BUS_FILE
        if self.args.bus_address:
            bus_file.write_text(self.args.bus_address + "\n")
        else:
            bus_file.unlink(missing_ok=True)

    def _flusher(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.catalog.flush()  # data written in place too, not only new mappings
            except TargetvirtError as e:
                log.error("periodic flush failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self.api is not None:
            self.api.stop()
            (Path(self.args.run_dir) / BUS_FILE).unlink(missing_ok=True)
        if self.manager is not None:
            self.manager.stop()
        self._stop_serving()
        self.controller.close()  # and the catalog, committed


class AgentHandler(Serving):
    """``--controller``: the agent and the TCMU service only; the controller is elsewhere."""

    def __init__(self, args: argparse.Namespace) -> None:
        agent_id = args.agent_id or socket.gethostname()
        super().__init__(args, Agent(
            agent_id, controller_link(args, agent_id), frozen_timeout=args.frozen_timeout,
            controller_wait=args.controller_wait,
        ))  # fmt: skip

    def check_vdisk(self, cfg: Any) -> None:
        self.agent.describe(_vdisk_name(cfg))  # NotFound from the controller

    def ready_line(self) -> str:
        return f"controller={self.args.controller} agent={self.agent.agent_id}"

    def start(self) -> None:
        self._connect()
        self.agent.start()  # lease keeper: renews, re-registers after a controller restart
        self._start_tcmu()
        self.mark_agent()
        if not self.args.no_dbus:
            self._start_dbus()

    def mark_agent(self) -> None:
        """Say where management is: once in the log, and to the shell (run folder)."""
        # the shell's API belongs with the catalog, in the controller's process
        log.info("management API not served: this handler is an agent of the controller "
                 "at %s; manage targetvirt where the controller runs",
                 self.args.controller)  # fmt: skip
        (Path(self.args.run_dir) / AGENT_FILE).write_text(self.args.controller + "\n")
        (Path(self.args.run_dir) / BUS_FILE).unlink(missing_ok=True)

    def _connect(self) -> None:
        """Register with the controller, waiting for it at most --controller-wait."""
        first, said = self.agent.clock.now(), False
        while True:
            try:
                self.agent.connect()
                return
            except ControllerUnreachable as e:
                if not said:  # once: it retries every half second
                    log.warning("waiting for the controller: %s", e)
                    said = True
                self.agent.await_controller(first, e)

    def stop(self) -> None:
        self._stop.set()
        (Path(self.args.run_dir) / AGENT_FILE).unlink(missing_ok=True)
        self._stop_serving()


def controller_link(args: argparse.Namespace, agent_id: str) -> ControllerLink:
    """The agent's link to ``--controller`` (parse_args checked its form)."""
    # Imported here: gRPC and cryptography serve only agent-only handlers, and the
    # package leaves them optional (Suggests) for the default single-host daemon.
    from targetvirt.transport.network import NetworkLink  # noqa: PLC0415
    from targetvirt.transport.tls import Credentials  # noqa: PLC0415

    tls = Credentials.load(args.tls_dir, agent_id) if args.tls_dir else None
    timeout = args.call_timeout

    def connect(endpoint: str) -> ControllerLink:
        return NetworkLink(endpoint, tls=tls, call_timeout=timeout)

    link: ControllerLink
    if is_rados(args.controller):
        from targetvirt.transport.follow import FollowingLink  # noqa: PLC0415 - librados

        link = FollowingLink(args.controller, connect=connect, call_timeout=timeout)
    else:
        link = connect(args.controller)
    if args.commands is not None:
        from targetvirt.transport.rados_notify import RadosNotifyLink  # noqa: PLC0415

        link = RadosNotifyLink(link, args.commands)
    return link


def make_handler(args: argparse.Namespace) -> Serving:
    return Handler(args) if args.controller is None else AgentHandler(args)


def _notify(state: str) -> None:
    if _sd_notify is not None:
        _sd_notify(state)


def _watchdog(stop: threading.Event) -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if not usec:
        return
    while not stop.wait(usec / 2e6):
        _notify("WATCHDOG=1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler_ = logging.StreamHandler()
    handler_.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler_])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        Path(args.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = make_handler(args)
    except (TargetvirtError, OSError) as e:
        print(f"targetvirt-handler: {e}", file=sys.stderr)
        return 1
    try:
        handler.start()
    except (TargetvirtError, OSError) as e:
        print(f"targetvirt-handler: {e}", file=sys.stderr)
        handler.stop()
        return 1
    (Path(args.run_dir) / "handler.pid").write_text(f"{os.getpid()}\n")
    _notify("READY=1")
    log.info("ready: %s devices=%d", handler.ready_line(), len(handler.tcmu.devices))
    threading.Thread(target=_watchdog, args=(stop,), daemon=True).start()
    while not stop.wait(1.0):
        pass
    _notify("STOPPING=1")
    t0 = time.monotonic()
    handler.stop()
    log.info("stopped in %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
