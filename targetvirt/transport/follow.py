"""An agent link that follows the active controller through the metadata store.

With a standby controller (:mod:`targetvirt.standby`), the controller that agents must
talk to changes when the standby takes over.  The active controller publishes its
request endpoint in the RADOS metadata store's ``owner`` record, with the same
compare-and-set that makes it the owner (:func:`targetvirt.store.rados.active_endpoint`).
:class:`FollowingLink` reads it, connects there (a
:class:`~targetvirt.transport.network.NetworkLink`), and when a request finds its
controller unreachable, reads it again: if another controller owns the store now, the
request is retried there.  The new controller does not know the agent's session, so
it answers ``SessionLost`` and the agent registers again -- the same path as after a
controller restart (quiesce, register, reload every table).

The agent needs read access to the store's pool (one omap read per look-up, no lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from targetvirt import protocol as p
from targetvirt.errors import ControllerUnreachable, StoreError
from targetvirt.store.rados import DEFAULT_NAME, active_endpoint
from targetvirt.transport import CommandHandler, ControllerLink
from targetvirt.transport.network import NetworkLink

log = logging.getLogger(__name__)


class FollowingLink:
    """A :class:`~targetvirt.transport.ControllerLink` to whichever controller owns the
    RADOS metadata store ``location`` (store ``name``).

    ``connect(endpoint)`` makes the link to one controller (default: a
    :class:`NetworkLink` with ``call_timeout``; pass one for TLS).  ``lookup`` replaces
    the store read (tests).
    """

    def __init__(
        self,
        location: str,
        *,
        name: str = DEFAULT_NAME,
        connect: Callable[[str], ControllerLink] | None = None,
        lookup: Callable[[], str | None] | None = None,
        call_timeout: float = 10.0,
    ) -> None:
        self.location = location
        self.name = name
        self._connect = connect or (lambda ep: NetworkLink(ep, call_timeout=call_timeout))
        self._lookup = lookup or (lambda: active_endpoint(location, name=name))
        self._lock = threading.Lock()
        self._link: ControllerLink | None = None
        self.endpoint: str | None = None
        self.follows = 0  # times it moved to another controller

    def _current(self) -> ControllerLink:
        with self._lock:
            if self._link is not None:
                return self._link
        self._refresh(None)
        with self._lock:
            if self._link is None:
                raise ControllerUnreachable(
                    f"no controller has published an endpoint in rados:{self.location}#{self.name}"
                )
            return self._link

    def _refresh(self, failed: ControllerLink | None) -> bool:
        """Look the endpoint up again after ``failed`` did not answer; True if there is
        another link to try (someone moved already, or the endpoint changed)."""
        with self._lock:
            if self._link is not failed:
                return True  # another thread followed already
        try:
            endpoint = self._lookup()
        except StoreError as e:
            raise ControllerUnreachable(f"cannot look up the active controller: {e}") from None
        with self._lock:
            if self._link is not failed:
                return True
            if endpoint is None or endpoint == self.endpoint:
                return False
            old, self._link = self._link, self._connect(endpoint)
            if old is not None:
                self.follows += 1
                log.warning("the active controller moved: %s -> %s", self.endpoint, endpoint)
            self.endpoint = endpoint
        if old is not None:
            old.close()
        return True

    def call(self, request: p.Request) -> p.Reply:
        link = self._current()
        try:
            reply = link.call(request)
        except ControllerUnreachable:
            if not self._refresh(link):
                raise
            return self._current().call(request)
        if _unreachable(reply) and self._refresh(link):
            # a fenced controller refuses everything: its successor may have published
            return self._current().call(request)
        return reply

    def open_commands(
        self, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        self._current().open_commands(hello, handler, lost)

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()


def _unreachable(reply: p.Reply) -> bool:
    return (
        isinstance(reply, p.Refused)
        and reply.code < len(p.ERRORS)
        and p.ERRORS[reply.code] is ControllerUnreachable
    )
