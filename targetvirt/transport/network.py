"""The network transport: gRPC carrying :mod:`targetvirt.protocol` bytes.

No protobuf: two generic methods of the service ``targetvirt.v1.Controller`` move our own
encoded messages.

* ``Call`` (unary): one agent request -> its reply; every call has a deadline.
* ``Commands`` (bidirectional stream): the agent opens it after registering and sends
  ``Hello``; the controller pushes commands down it and the agent sends an ``Ack`` for
  each.  When the stream breaks, the agent registers again (a new session).

Listening: a Unix socket (file mode 0600, created in a private directory and renamed into
place, so nobody else can connect in between) and/or TCP, which requires mutual TLS
(:mod:`targetvirt.transport.tls`): the controller accepts only clients with an agent
certificate from its CA, and checks that the certificate's name is the agent id each
request claims.  A connection over the Unix socket is trusted as the socket's owner.

Hosting an agent in a process::

    link = NetworkLink("unix:/run/targetvirt/controller.sock")
    # or NetworkLink("ctl.example:7443", tls=Credentials.load(dir, "gw1"))
    agent = Agent("gw1", link)
    agent.connect(["vdisk1"])
    agent.start()  # lease keeper
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from targetvirt import protocol as p
from targetvirt.errors import (
    ControllerUnreachable,
    InvalidArgument,
    ProtocolError,
    SessionLost,
)
from targetvirt.transport import CommandHandler
from targetvirt.transport.tls import Credentials, agent_identity

if TYPE_CHECKING:
    from targetvirt.controller import Controller

log = logging.getLogger(__name__)

SERVICE = "targetvirt.v1.Controller"
_CALL = f"/{SERVICE}/Call"
_COMMANDS = f"/{SERVICE}/Commands"
MAX_MESSAGE = 64 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # notice a dead peer on an idle command stream
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS = [*_OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
# an agent reconnects to a restarted controller within a second or two (gRPC's default
# backoff grows to minutes, holding I/O that waits for the controller that long)
_CLIENT_OPTIONS = [
    *_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
_REPLIES = (
    p.Registered, p.VDiskInfo, p.TableRange, p.FaultReply, p.LeaseGrant, p.Done, p.Refused,
)  # fmt: skip
_REQUESTS: tuple[type[p.Request], ...] = (
    p.Register, p.Attach, p.Describe, p.Detach, p.Fetch, p.Fault, p.Unmap, p.Flush,
    p.LeaseRenew, p.ContainerFailure, p.Exclusive, p.EndExclusive,
)  # fmt: skip


# --- controller side -------------------------------------------------------------------


class ControllerServer:
    """Serves a controller to agents on a Unix socket and/or TCP with mutual TLS."""

    def __init__(
        self,
        controller: Controller,
        *,
        unix_path: str | None = None,
        tcp: str | None = None,
        tls: Credentials | None = None,
        workers: int = 64,
    ) -> None:
        if unix_path is None and tcp is None:
            raise InvalidArgument("the controller server needs a Unix socket path or a TCP address")
        if tcp is not None and tls is None:
            raise InvalidArgument("TCP needs TLS credentials: agents must prove who they are")
        self.controller = controller
        self.unix_path = unix_path
        self.port = 0
        self._identities: dict[bytes, str | None] = {}
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctl-rpc"),
            options=_SERVER_OPTIONS,
        )
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(self._call),
            "Commands": grpc.stream_stream_rpc_method_handler(self._commands),
        }
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)]
        )
        private = None
        if unix_path is not None:
            private = os.path.join(
                os.path.dirname(os.path.abspath(unix_path)), f".tv-{secrets.token_hex(6)}"
            )
            os.mkdir(private, 0o700)
            self._server.add_insecure_port(f"unix:{private}/sock")
        if tcp is not None and tls is not None:
            creds = grpc.ssl_server_credentials(
                [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem,
                require_client_auth=True,
            )  # fmt: skip
            self.port = self._server.add_secure_port(tcp, creds)
            if not self.port:
                raise InvalidArgument(f"cannot listen on {tcp}")
        self._server.start()
        if private is not None and unix_path is not None:
            os.chmod(f"{private}/sock", 0o600)
            os.replace(f"{private}/sock", unix_path)
            os.rmdir(private)

    def stop(self, grace: float = 0.5) -> None:
        self._server.stop(grace).wait()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    # identity ---------------------------------------------------------------------------

    def _check_identity(self, context: Any, agent_id: str) -> None:
        """Over TLS the certificate must name ``agent_id``; a Unix socket is trusted."""
        auth = context.auth_context()
        if auth.get("transport_security_type") != [b"ssl"]:
            return  # the Unix socket (0600): same user as the controller
        pem = b"".join(auth.get("x509_pem_cert", []))
        if pem not in self._identities:
            self._identities[pem] = agent_identity(pem)
        if self._identities[pem] != agent_id:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this certificate does not prove agent id {agent_id!r}",
            )

    # methods ----------------------------------------------------------------------------

    def _call(self, raw: bytes, context: Any) -> bytes:
        try:
            request = p.decode_as(raw, *_REQUESTS)
        except ProtocolError as e:
            return p.encode(p.refusal(e))
        self._check_identity(context, request.agent_id)  # type: ignore[attr-defined]
        return p.encode(self.controller.handle(request))

    def _commands(self, incoming: Iterator[bytes], context: Any) -> Iterator[bytes]:
        try:
            hello = p.decode_as(next(incoming), p.Hello)
        except (StopIteration, ProtocolError) as e:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a command stream starts with Hello: {e}"
            )
            return
        self._check_identity(context, hello.agent_id)
        sink = StreamSink()
        try:
            self.controller.connect_commands(hello.agent_id, hello.session, sink)
        except SessionLost as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return
        context.add_callback(sink.close)
        threading.Thread(
            target=self._read_acks, args=(incoming, hello.session, sink), daemon=True,
            name=f"acks-{hello.agent_id}",
        ).start()  # fmt: skip
        try:
            while True:
                cmd = sink.next()
                if cmd is None:
                    return
                yield p.encode(cmd)
        finally:
            self.controller.disconnected(hello.session, sink)

    def _read_acks(self, incoming: Iterator[bytes], session: int, sink: StreamSink) -> None:
        try:
            for raw in incoming:
                self.controller.acknowledge(session, p.decode_as(raw, p.Ack))
        except (grpc.RpcError, ProtocolError, ValueError) as e:
            log.info("command stream of session %#x ended: %s", session, e)
        finally:
            sink.close()
            self.controller.disconnected(session, sink)


class StreamSink:
    """The controller's end of one command stream."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[p.Command | None] = queue.SimpleQueue()
        self._closed = False

    def deliver(self, command: p.Command) -> bool:
        if self._closed:
            return False
        self._queue.put(command)
        return True

    def next(self) -> p.Command | None:
        return None if self._closed else self._queue.get()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)


# --- agent side ------------------------------------------------------------------------


class NetworkLink:
    """An agent's :class:`~targetvirt.transport.ControllerLink` over gRPC.

    ``target``: ``unix:/path`` or ``host:port`` (TCP, which needs ``tls``: the agent's
    credentials; ``server_name`` overrides the name checked in the controller's
    certificate).  ``call_timeout`` is the deadline of every request.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: Credentials | None = None,
        server_name: str | None = None,
        call_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.call_timeout = call_timeout
        options: list[tuple[str, int | str]] = list(_CLIENT_OPTIONS)
        if target.startswith("unix:"):
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if tls is None:
                raise InvalidArgument(f"{target}: TCP needs this agent's TLS credentials")
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.ca_pem, private_key=tls.key_pem,
                certificate_chain=tls.cert_pem,
            )  # fmt: skip
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._call = self._channel.unary_unary(_CALL)
        self._stream_method = self._channel.stream_stream(_COMMANDS)
        self._stream: AgentStream | None = None
        self._lock = threading.Lock()

    def call(self, request: p.Request) -> p.Reply:
        try:
            raw = self._call(p.encode(request), timeout=self.call_timeout)
        except grpc.RpcError as e:
            raise ControllerUnreachable(
                f"controller at {self.target}: {e.code().name}: {e.details()}"
            ) from None
        return p.decode_as(raw, *_REPLIES)

    def open_commands(
        self, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        stream = AgentStream(self._stream_method, hello, handler, lost)
        with self._lock:
            old, self._stream = self._stream, stream
        if old is not None:
            old.close()
        stream.start()

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        self._channel.close()


class AgentStream:
    """The agent's end of its command stream: applies commands in order, acks each."""

    def __init__(
        self, method: Any, hello: p.Hello, handler: CommandHandler, lost: Callable[[], None]
    ) -> None:
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._out.put(p.encode(hello))
        self._handler = handler
        self._lost = lost
        self._closed = False
        self._call = method(self._outgoing())
        self._thread = threading.Thread(
            target=self._run, name=f"{hello.agent_id}-commands", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _outgoing(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        try:
            for raw in self._call:
                ack = self._handler(p.decode_as(raw, *p.COMMANDS))
                if ack is not None:
                    self._out.put(p.encode(ack))
        except grpc.RpcError as e:
            if not self._closed:
                log.warning("command stream lost: %s: %s", e.code().name, e.details())
        except ProtocolError as e:
            log.warning("command stream carried a bad message: %s", e)
            self._call.cancel()
        finally:
            self._out.put(None)
            if not self._closed:
                self._lost()

    def close(self) -> None:
        self._closed = True
        self._call.cancel()
        self._out.put(None)
