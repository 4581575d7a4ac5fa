"""The in-process transport: controller and agent in one process (the single-host daemon).

Requests are direct calls of :meth:`Controller.handle`.  Commands go through a queue to
one thread per agent session (the "stream"), which applies them in order and hands the
ack back, so a command that must drain I/O never blocks the controller's thread beyond
its ack timeout.

``encode=True`` round-trips every message, both ways, through the protocol codec: the
same code paths as the network transport without the network (tests use it).  Tests
can also cut the link (``partition``) or make the agent unresponsive (``crash``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from targetvirt import protocol as p
from targetvirt.errors import ControllerUnreachable, SessionLost
from targetvirt.transport import CommandHandler

if TYPE_CHECKING:
    from targetvirt.controller import Controller

M = TypeVar("M", bound=p.Message)


class InProcessLink:
    """An agent's :class:`~targetvirt.transport.ControllerLink` to a local controller."""

    def __init__(self, controller: Controller, *, encode: bool = False) -> None:
        self.controller = controller
        self.encode = encode
        self.partitioned = False
        self.crashed = False
        self._pump: CommandPump | None = None
        self._lock = threading.Lock()

    def through(self, msg: M) -> M:
        """The message as the other side sees it."""
        if not self.encode:
            return msg
        return p.decode_as(p.encode(msg), type(msg))

    def call(self, request: p.Request) -> p.Reply:
        if self.partitioned or self.crashed:
            raise ControllerUnreachable("the controller is unreachable (link cut)")
        return self.through(self.controller.handle(self.through(request)))

    def open_commands(
        self, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        if self.partitioned or self.crashed:
            lost()
            return
        pump = CommandPump(self, self.through(hello), handler, lost)
        with self._lock:
            old, self._pump = self._pump, pump
        if old is not None:
            old.close()
        try:
            self.controller.connect_commands(hello.agent_id, hello.session, pump)
        except SessionLost:
            pump.close()

    # --- test controls -------------------------------------------------------------------

    def partition(self, cut: bool = True) -> None:
        """Cut (or heal) the link: requests fail, commands are lost on the way."""
        self.partitioned = cut

    def crash(self) -> None:
        """The agent stops answering: no requests, no acks (its process is gone)."""
        self.crashed = True

    def retarget(self, controller: Controller) -> None:
        """Point at a new controller (a restart); the old stream dies with the old one."""
        self.controller = controller

    def close(self) -> None:
        with self._lock:
            pump, self._pump = self._pump, None
        if pump is not None:
            pump.close()


class CommandPump:
    """One session's command stream: a queue and the thread that applies it in order."""

    def __init__(
        self, link: InProcessLink, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        self.link = link
        self.controller = link.controller
        self.session = hello.session
        self.handler = handler
        self.lost = lost
        self._queue: queue.SimpleQueue[p.Command | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"{hello.agent_id}-commands", daemon=True
        )
        self._thread.start()

    def deliver(self, command: p.Command) -> bool:
        if self._closed:
            return False
        self._queue.put(command)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _run(self) -> None:
        while True:
            cmd = self._queue.get()
            if cmd is None or self._closed:
                break
            if self.link.partitioned or self.link.crashed:
                continue  # lost on the way: the controller's ack timeout notices
            ack = self.handler(self.link.through(cmd))
            if ack is not None and not self.link.crashed:
                self.controller.acknowledge(self.session, self.link.through(ack))
        self.controller.disconnected(self.session, self)
        if not self.link.crashed:
            self.lost()
