"""Controller <-> agent transports (in-process, network).

A transport carries :mod:`targetvirt.protocol` messages both ways; the roles only see
these two interfaces:

* :class:`ControllerLink` -- what an agent holds: unary requests to the controller and a
  command stream it opens after registering;
* :class:`CommandSink` -- what the controller holds per agent session: where commands
  go.  Acks come back through :meth:`targetvirt.controller.Controller.acknowledge`.
  A :class:`FencingSink` can also fence the agent through the storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from targetvirt.protocol import Ack, Command, Hello, Reply, Request

# An agent's command handler: the ack, or None for a command of a session it has left.
CommandHandler = Callable[[Command], Ack | None]


class ControllerLink(Protocol):
    def call(self, request: Request) -> Reply:
        """Send one request and return its reply (a :class:`~targetvirt.protocol.Refused`
        for a failure the controller reports).

        Raises :class:`~targetvirt.errors.ControllerUnreachable` when no reply came in time.
        """
        ...

    def open_commands(
        self, hello: Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        """Open the command stream of a session: every command goes to ``handler`` in
        order and its ack goes back; ``lost`` is called once if the stream breaks.
        Opening a new stream closes the previous one.
        """
        ...

    def close(self) -> None: ...


class CommandSink(Protocol):
    def deliver(self, command: Command) -> bool:
        """Queue a command for the agent (never blocks); False if the stream is gone."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class FencingSink(Protocol):
    """A sink whose transport can cut the agent off the storage itself (RADOS blocklist)."""

    def fence(self, vdisks: Sequence[str]) -> bool:
        """Fence the agent; True if nothing it still sends can reach the containers of
        ``vdisks`` any more (the controller then need not wait for its lease)."""
        ...
