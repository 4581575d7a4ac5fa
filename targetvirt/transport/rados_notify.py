"""Controller -> agent commands over RADOS watch/notify, fenced by the storage itself.

Requests (register, attach, fetch, fault, unmap, flush, lease renewal...) keep going
over a request link (:class:`~targetvirt.transport.network.NetworkLink`, or in-process):
they are unary calls answered by one controller, many at once, some long (a fault
copies a segment), and python3-rados runs every watch callback of a client on one
thread and acks when it returns -- fine for commands, which an agent applies in order
anyway, a bottleneck for requests.  Commands go through RADOS:

* every agent **watches the header object** ``<prefix>.vdisk.<name>`` of each vdisk it
  serves (created on first watch), from before it registers or attaches it;
* a command is a **notify** on that header, addressed to the sessions it is for (other
  watchers answer with an empty reply); commands queued together for one vdisk travel
  in one notify, identical ones for several agents once.  The agent applies its own in
  order (draining what they require) and **its notify reply carries the acks**;
* the agent opens its command channel (the ``Hello`` of a session) by notifying the
  controller's object ``<prefix>.controller`` with its RADOS client addresses (every
  librados handle of the process to that cluster, and again whenever it opens one);
* an addressed session that does not answer in time (``ack_timeout``), or whose watch
  is gone, is reported to the controller, which fences it: the bus **blocklists** every
  address the agent reported (``osd blocklist add``), brings this process's handles up
  to the new OSD map, and -- when every container of the vdisks it served is a RADOS
  container of that cluster -- the controller goes on at once instead of waiting for
  the agent's lease to run out.  A blocklisted client's reads and writes fail
  (``ESHUTDOWN``, Ceph's EBLOCKLISTED); its process must restart to serve again.

Frames (little-endian), around :mod:`targetvirt.protocol` messages::

    notify:  u32 groups; per group: u16 n, n x (u64 session, u64 seq), u32 len, command
    reply:   u32 n; n x (u64 session, u32 len, Ack)
    hello:   u16 n, n x (u16 len, address), then the Hello message (base64 on the wire:
             python3-rados notifies carry text)

The controller needs librados' notify replies even when a notify times out (who did
not answer): see :mod:`targetvirt.transport.librados_notify`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from targetvirt import protocol as p
from targetvirt.ceph import Cluster, RadosLocation, describe, import_rados, is_rados
from targetvirt.errors import (
    ControllerUnreachable,
    InvalidArgument,
    ProtocolError,
    TargetvirtError,
)
from targetvirt.transport import CommandHandler, ControllerLink
from targetvirt.transport.librados_notify import Notifier

if TYPE_CHECKING:
    from targetvirt.controller import Controller

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "targetvirt"
BLOCKLIST_SECONDS = 24 * 3600  # a fenced agent's handles stay fenced: it restarts meanwhile
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_SESSION_SEQ = struct.Struct("<QQ")


def header_object(prefix: str, vdisk: str) -> str:
    return f"{prefix}.vdisk.{vdisk}"


def control_object(prefix: str) -> str:
    return f"{prefix}.controller"


# --- frames ----------------------------------------------------------------------------


class _Frame:
    """Bounds-checked reading of a frame; anything malformed raises ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ProtocolError("notify frame truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, st: struct.Struct) -> int:
        value: int = st.unpack(self.take(st.size))[0]
        return value

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("notify frame has trailing bytes")


Group = tuple[dict[int, int], p.Command]  # recipients (session -> seq), command (seq 0)


def encode_batch(groups: Sequence[tuple[Sequence[tuple[int, int]], bytes]]) -> bytes:
    out = bytearray(_U32.pack(len(groups)))
    for recipients, body in groups:
        out += _U16.pack(len(recipients))
        for session, seq in recipients:
            out += _SESSION_SEQ.pack(session, seq)
        out += _U32.pack(len(body)) + body
    return bytes(out)


def decode_batch(data: bytes) -> list[Group]:
    f, groups = _Frame(data), []
    for _ in range(f.num(_U32)):
        recipients = dict(_SESSION_SEQ.unpack(f.take(16)) for _ in range(f.num(_U16)))
        groups.append((recipients, p.decode_as(f.take(f.num(_U32)), *p.COMMANDS)))
    f.end()
    return groups


def encode_acks(acks: Sequence[tuple[int, p.Ack]]) -> bytes:
    out = bytearray(_U32.pack(len(acks)))
    for session, ack in acks:
        raw = p.encode(ack)
        out += _U64.pack(session) + _U32.pack(len(raw)) + raw
    return bytes(out)


def decode_acks(data: bytes) -> list[tuple[int, p.Ack]]:
    f = _Frame(data)
    acks = []
    for _ in range(f.num(_U32)):
        session = f.num(_U64)
        acks.append((session, p.decode_as(f.take(f.num(_U32)), p.Ack)))
    f.end()
    return acks


def encode_hello(hello: p.Hello, addrs: Sequence[str]) -> str:
    out = bytearray(_U16.pack(len(addrs)))
    for addr in addrs:
        raw = addr.encode()
        out += _U16.pack(len(raw)) + raw
    return base64.b64encode(bytes(out) + p.encode(hello)).decode()


def decode_hello(data: bytes) -> tuple[p.Hello, list[str]]:
    try:
        f = _Frame(base64.b64decode(data, validate=True))
    except binascii.Error:
        raise ProtocolError("a hello notify is not base64") from None
    try:
        addrs = [str(f.take(f.num(_U16)), "utf-8") for _ in range(f.num(_U16))]
    except UnicodeDecodeError:
        raise ProtocolError("a hello notify carries an address that is not UTF-8") from None
    return p.decode_as(f.take(len(f.buf) - f.pos), p.Hello), addrs


def _create(ioctx: Any, obj: str) -> None:
    """Make ``obj`` exist (watches need an object); leaves an existing one alone."""
    rados = import_rados()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
        ioctx.operate_write_op(op, obj)


# --- controller side -------------------------------------------------------------------


class NotifySink:
    """The controller's end of one agent session: its commands go out as notifies."""

    def __init__(self, bus: RadosCommandBus, agent_id: str, session: int) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.session = session
        self.addrs: set[str] = set()
        self.closed = False

    def deliver(self, command: p.Command) -> bool:
        if self.closed:
            return False
        self.bus.enqueue(self, command)
        return True

    def close(self) -> None:
        self.closed = True
        self.bus.forget(self)

    def fence(self, vdisks: Sequence[str]) -> bool:
        return self.bus.fence(self, vdisks)


class RadosCommandBus:
    """Carries a controller's commands to its agents as notifies on vdisk headers.

    ``location``: the pool (and namespace) of the header objects, a RADOS location.
    The controller's client needs the ``osd blocklist`` monitor capability to fence.

    ``timeout``: how long a notify waits for replies, in whole seconds (librados counts
    no finer); default: the most that fits, ``(ack_timeout - 1) // 2``.  A notify returns
    every reply at once, so one silent watcher holds back the others' acks until it times
    out, and every notify on that header waits for it until it is fenced.  A command
    waits for at most the notify in flight on its vdisk (everything queued meanwhile goes
    out together in the next one), then for its own: its ack is in within two notify
    timeouts, which must end a second before the controller's ``ack_timeout``, or the
    controller would fence the agents that did answer.  Hence ``ack_timeout`` >= 3 s.
    """

    def __init__(
        self,
        controller: Controller,
        location: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: int | None = None,
    ) -> None:
        self.controller = controller
        self.loc = RadosLocation.parse(location)
        self.prefix = prefix
        fits = int((controller.ack_timeout - 1) // 2)
        self.timeout = fits if timeout is None else timeout
        if not 1 <= self.timeout <= fits:
            raise InvalidArgument(
                f"a notify timeout of whole seconds from 1 to (ack timeout - 1) / 2 = {fits} "
                f"is needed (ack timeout {controller.ack_timeout:g} s, notify {self.timeout})"
            )
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[NotifySink, p.Command]]] = {}
        self._senders: dict[str, threading.Thread] = {}
        self._sinks: dict[int, NotifySink] = {}
        self._closed = False
        self.notifies = 0  # sent so far (tests, benchmarks)
        self.blocklisted: dict[str, list[str]] = {}  # agent id -> addresses, last fence
        self._cluster = Cluster.get(self.loc, ControllerUnreachable)
        try:
            self._ioctx = self._cluster.ioctx(self.loc, ControllerUnreachable)
            self._notifier = Notifier(self.loc)
            self._rados = import_rados()
            _create(self._ioctx, control_object(prefix))
            self._watch = self._ioctx.watch(control_object(prefix), self._on_hello)
        except BaseException:
            self._cluster.release()
            raise

    # hello: an agent opens its command channel ------------------------------------------

    def _on_hello(self, notify_id: int, notifier: int, watch_id: int, data: bytes) -> bytes:
        try:
            hello, addrs = decode_hello(data)
            self._connect(hello, addrs)
            return p.encode(p.Done())
        except TargetvirtError as e:
            return p.encode(p.refusal(e))

    def _connect(self, hello: p.Hello, addrs: list[str]) -> None:
        with self._lock:
            sink = self._sinks.get(hello.session)
            if sink is not None and not sink.closed and sink.agent_id == hello.agent_id:
                sink.addrs.update(addrs)  # a handle it opened since: announced before use
                return
            sink = NotifySink(self, hello.agent_id, hello.session)
            sink.addrs.update(addrs)
            self._sinks[hello.session] = sink
        try:
            self.controller.connect_commands(hello.agent_id, hello.session, sink)
        except TargetvirtError:
            sink.close()
            raise
        log.info("agent %s watches for commands (addresses %s)", hello.agent_id, sorted(addrs))

    def forget(self, sink: NotifySink) -> None:
        with self._lock:
            if self._sinks.get(sink.session) is sink:
                del self._sinks[sink.session]

    # sending ------------------------------------------------------------------------------

    def enqueue(self, sink: NotifySink, command: p.Command) -> None:
        """Queue a command (never blocks: called under the controller's state lock)."""
        with self._lock:
            if self._closed:
                return
            self._queues.setdefault(command.vdisk, deque()).append((sink, command))
            if command.vdisk not in self._senders:
                t = threading.Thread(
                    target=self._send_loop, args=(command.vdisk,), daemon=True,
                    name=f"notify-{command.vdisk}",
                )  # fmt: skip
                self._senders[command.vdisk] = t
                t.start()

    def _send_loop(self, vdisk: str) -> None:
        """One sender per vdisk while it has work: its notifies go out one at a time, in
        order (an agent must apply a vdisk's commands in the order they were sent)."""
        while True:
            with self._lock:
                queue = self._queues.get(vdisk)
                if not queue or self._closed:
                    self._queues.pop(vdisk, None)
                    del self._senders[vdisk]
                    return
                batch = [(s, c) for s, c in queue if not s.closed]
                queue.clear()
            if batch:
                self._notify(vdisk, batch)

    def _notify(self, vdisk: str, batch: list[tuple[NotifySink, p.Command]]) -> None:
        groups = _group(batch)
        payload = encode_batch([([(s.session, seq) for s, seq in r], body) for r, body in groups])
        result = self._notifier.notify(header_object(self.prefix, vdisk), payload, self.timeout)
        self.notifies += 1
        expected = {(s.session, c.seq): s for s, c in batch}
        answered: set[tuple[int, int]] = set()
        for _, _, data in result.acks:
            for session, ack in self._acks_in(data):
                if (session, ack.seq) in expected:
                    answered.add((session, ack.seq))
                    self.controller.acknowledge(session, ack)
        silent = {s for key, s in expected.items() if key not in answered}
        for sink in silent:
            log.warning(
                "agent %s did not answer a command notify on %s (%s)",
                sink.agent_id, vdisk, describe_ret(result.ret),
            )  # fmt: skip
            self.controller.disconnected(sink.session, sink)

    @staticmethod
    def _acks_in(data: bytes) -> list[tuple[int, p.Ack]]:
        if not data:
            return []  # a watcher the notify did not address
        try:
            return decode_acks(data)
        except ProtocolError as e:
            log.warning("a malformed command notify reply: %s", e)
            return []

    # fencing ------------------------------------------------------------------------------

    def fence(self, sink: NotifySink, vdisks: Sequence[str]) -> bool:
        """Blocklist every client address the agent reported; True if that stops all it
        could do to the vdisks it served (they live in RADOS, on this cluster)."""
        mine = set(Cluster.addrs(self._cluster.fsid))  # never fence this very process
        with self._lock:
            targets = sorted(sink.addrs - mine)
        if not targets:
            return False
        try:
            for addr in targets:
                self._cluster.handle.blocklist_add(addr, BLOCKLIST_SECONDS)
            # our later operations carry the new map: an OSD applies the blocklist before
            # them, so nothing the fenced agent still sends lands after them
            for cluster in Cluster.sharing(self._cluster.fsid):
                cluster.handle.wait_for_latest_osdmap()
        except self._rados.Error as e:
            log.warning("cannot blocklist agent %s: %s", sink.agent_id, describe(e))
            return False
        self.blocklisted[sink.agent_id] = targets
        log.warning("agent %s fenced by the storage: blocklisted %s", sink.agent_id, targets)
        return self._covers(vdisks)

    def _covers(self, vdisks: Sequence[str]) -> bool:
        catalog = self.controller.catalog
        with catalog.lock:
            if any(name not in catalog.vdisks for name in vdisks):
                return False  # its containers are unknown now: let its lease run out
            paths = {
                c.path for name in vdisks for c in catalog.vdisks[name].pool.containers.values()
            }
        return all(is_rados(path) and self._same_cluster(path) for path in paths)

    def _same_cluster(self, path: str) -> bool:
        cluster = Cluster.get(RadosLocation.parse(path), ControllerUnreachable)
        try:
            return cluster.fsid == self._cluster.fsid
        finally:
            cluster.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            senders = list(self._senders.values())
        for t in senders:
            t.join(self.timeout + 5)
        self._watch.close()
        self._notifier.close()
        self._ioctx.close()
        self._cluster.release()


def describe_ret(ret: int) -> str:
    """Why an addressed agent has no reply in a notify that returned ``ret``."""
    if ret == 0:
        return "it no longer watches"
    return "timed out" if ret == -errno.ETIMEDOUT else os.strerror(-ret)


def _group(
    batch: list[tuple[NotifySink, p.Command]],
) -> list[tuple[list[tuple[NotifySink, int]], bytes]]:
    """Consecutive identical commands (but for their seq) to distinct sessions travel
    once; every session keeps the order of its own commands."""
    groups: list[tuple[list[tuple[NotifySink, int]], bytes]] = []
    for sink, cmd in batch:
        body = p.encode(dataclasses.replace(cmd, seq=0))
        if groups and groups[-1][1] == body and all(s is not sink for s, _ in groups[-1][0]):
            groups[-1][0].append((sink, cmd.seq))
        else:
            groups.append(([(sink, cmd.seq)], body))
    return groups


# --- agent side ------------------------------------------------------------------------


@dataclass
class _Stream:
    hello: p.Hello
    handler: CommandHandler
    lost: Callable[[], None]


class RadosNotifyLink:
    """An agent's :class:`~targetvirt.transport.ControllerLink`: requests through
    ``requests`` (another link), commands from notifies on the headers it watches.

    ``location`` names the pool (and namespace) of the headers, as the controller's
    :class:`RadosCommandBus` does; ``hello_timeout``: how long opening the command
    channel waits for the controller.
    """

    def __init__(
        self,
        requests: ControllerLink,
        location: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        hello_timeout: float = 10.0,
    ) -> None:
        self.requests = requests
        self.loc = RadosLocation.parse(location)
        self.prefix = prefix
        self.hello_timeout = hello_timeout
        self._rados = import_rados()
        self._cluster = Cluster.get(self.loc, ControllerUnreachable)
        self._ioctx = self._cluster.ioctx(self.loc, ControllerUnreachable)
        self._lock = threading.RLock()
        self._wanted: set[str] = set()
        self._watches: dict[str, Any] = {}
        self._broken: list[Any] = []
        self._stream: _Stream | None = None
        Cluster.listen(self._handle_added)

    # requests -----------------------------------------------------------------------------

    def call(self, request: p.Request) -> p.Reply:
        # watch first: a command may follow the registration or attachment at once
        if isinstance(request, p.Register):
            self._probe()
            for name in request.vdisks:
                self._watch(name)
        elif isinstance(request, p.Attach):
            self._watch(request.vdisk)
        return self.requests.call(request)

    def _probe(self) -> None:
        """A fenced (blocklisted) process must not register: it could not hear commands."""
        try:
            _create(self._ioctx, control_object(self.prefix))
        except self._rados.Error as e:
            raise ControllerUnreachable(
                f"this agent cannot reach {self.loc.where} for commands: {describe(e)}"
            ) from None

    def _watch(self, name: str) -> None:
        with self._lock:
            self._wanted.add(name)
            if name in self._watches:
                return
            obj = header_object(self.prefix, name)
            try:
                _create(self._ioctx, obj)
                self._watches[name] = self._ioctx.watch(
                    obj, self._on_notify, lambda *err: self._on_watch_error(name, err)
                )
            except self._rados.Error as e:
                raise ControllerUnreachable(
                    f"cannot watch {obj} in {self.loc.where} for commands: {describe(e)}"
                ) from None

    def _on_watch_error(self, name: str, err: tuple[Any, ...]) -> None:
        """The watch broke (disconnected, or this client was blocklisted): commands may
        have been missed, so the stream is lost (the agent asks the controller)."""
        log.warning("the command watch on %s broke: %s", name, err)
        with self._lock:
            watch = self._watches.pop(name, None)
            if watch is not None:
                self._broken.append(watch)
            stream = self._stream
        if stream is not None:
            stream.lost()

    # commands -----------------------------------------------------------------------------

    def open_commands(
        self, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        stream = _Stream(hello, handler, lost)
        with self._lock:
            self._stream = stream
        try:
            for name in sorted(self._wanted):
                self._watch(name)
            self._announce(stream)
        except TargetvirtError as e:
            log.warning("cannot open the command channel: %s", e)
            with self._lock:
                if self._stream is stream:
                    self._stream = None
            lost()

    def _announce(self, stream: _Stream) -> None:
        """Tell the controller this session listens, and every client address of this
        process on the cluster (what fencing it must blocklist)."""
        payload = encode_hello(stream.hello, Cluster.addrs(self._cluster.fsid))
        done = threading.Event()
        result: list[tuple[int, list[Any] | None]] = []

        def complete(_: Any, ret: int, acks: list[Any] | None, timeouts: Any) -> None:
            result.append((ret, acks))
            done.set()

        try:
            completion = self._ioctx.aio_notify(
                control_object(self.prefix), complete, msg=payload,
                timeout_ms=int(self.hello_timeout * 1000),
            )  # fmt: skip
        except self._rados.Error as e:
            raise ControllerUnreachable(f"cannot notify the controller: {describe(e)}") from None
        replies = (
            [a[2] for a in (result[0][1] or []) if a[2]]
            if done.wait(self.hello_timeout + 5)
            else []
        )
        del completion  # held until it completed (or we gave up on it)
        if not replies:
            raise ControllerUnreachable("the controller did not answer this agent's hello")
        reply = p.decode_as(replies[0], p.Done, p.Refused)
        if isinstance(reply, p.Refused):
            p.raise_refused(reply)

    def _on_notify(self, notify_id: int, notifier: int, watch_id: int, data: bytes) -> bytes:
        """A command notify (librados' callback thread): apply ours in order, reply acks."""
        stream = self._stream
        if stream is None:
            return b""
        session = stream.hello.session
        acks: list[tuple[int, p.Ack]] = []
        try:
            for recipients, cmd in decode_batch(data):
                seq = recipients.get(session)
                if seq is not None:
                    ack = stream.handler(dataclasses.replace(cmd, seq=seq))
                    if ack is not None:
                        acks.append((session, ack))
        except ProtocolError as e:
            log.warning("a malformed command notify: %s", e)
        except Exception:  # librados' thread must get its reply: a missing ack fences us
            log.exception("applying a command notify failed")
        return encode_acks(acks) if acks else b""

    def _handle_added(self, cluster: Cluster) -> None:
        """A new librados handle in this process: the controller learns its address
        before anything uses it (or the handle is refused: fencing must cover it)."""
        with self._lock:
            stream = self._stream
        if stream is not None and cluster.fsid == self._cluster.fsid:
            self._announce(stream)

    def close(self) -> None:
        Cluster.unlisten(self._handle_added)
        with self._lock:
            self._stream = None
            watches = list(self._watches.values()) + self._broken
            self._watches.clear()
            self._broken.clear()
        for watch in watches:
            try:
                watch.close()
            except self._rados.Error as e:
                log.info("closing a command watch: %s", describe(e))
        self._ioctx.close()
        self._cluster.release()
        self.requests.close()
