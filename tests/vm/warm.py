"""A warm interpreter for the test guest: ``python -m MODULE`` without the start-up cost.

    python -m tests.vm.warm SOCKET MODULE...

Under TCG a Python start with our imports costs seconds (the shell's one-shot form about
6 s before it does anything, tests/vm/lio.py about 3 s), and the real-stack suite runs
such commands a few hundred times.  This server imports MODULEs once, then for each
request forks a child that runs ``python -m``'s job: ``runpy.run_module(name,
run_name="__main__")`` with the request's argv, environment, folder and standard streams,
in a session of its own, and exits through the interpreter's normal shutdown.  Only the
imports are shared; the program, its arguments and its exit code are the real ones.

Protocol (a ``SOCK_SEQPACKET`` Unix socket, one connection per command, used by the
guest agent, tests/vm/agent.py):

- client -> server: one message, JSON ``{"module", "args", "cwd", "env"}``, carrying
  three file descriptors (stdin, stdout, stderr) as SCM_RIGHTS;
- server -> client: ``pid N`` once the child runs (its process group is N), then
  ``exit RC`` when it ends (``RC`` as subprocess reports it: -SIGNAL when killed), or
  ``error TEXT`` if the request could not be run.

The server stays single-threaded (children are watched through pidfds) so that forking
it is safe.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOCKET = "/run/warm.sock"  # where the harness starts it (tests/vm/guest.py)
MAX_REQUEST = 1 << 20  # bytes of JSON: argv and environment
REQUEST_TIMEOUT = 30.0  # seconds for a connected client to send its request


@dataclass
class Request:
    module: str
    args: list[str]
    cwd: str | None
    env: dict[str, str]
    fds: list[int]

    @classmethod
    def parse(cls, data: bytes, fds: list[int]) -> Request:
        """A client's message; ValueError when it is not one (the fds are closed then)."""
        try:
            req = json.loads(data)
            if len(fds) != 3:
                raise ValueError(f"{len(fds)} file descriptors, not 3 (stdin, stdout, stderr)")
            module, args, env = req["module"], req.get("args", []), req.get("env", {})
            cwd = req.get("cwd")
            if not (isinstance(module, str) and module):
                raise ValueError("no module")
            if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
                raise ValueError("args must be a list of strings")
            if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
                raise ValueError("env must map names to strings")
            if cwd is not None and not isinstance(cwd, str):
                raise ValueError("cwd must be a string")
        except (ValueError, KeyError, TypeError) as e:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"bad request: {e}") from None
        return cls(module, list(args), cwd, dict(env), fds)


class Server:
    """Accepts requests and forks; ``serve`` returns only in a child, with its request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path.unlink(missing_ok=True)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, client)

    def serve(self) -> Request:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    req = self._accept()
                    if req is not None:
                        return req  # we are the child
                else:
                    self._reap(int(key.fd))

    def _accept(self) -> Request | None:
        conn, _ = self.listener.accept()
        conn.settimeout(REQUEST_TIMEOUT)  # a client that never sends cannot stall the rest
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
            req = Request.parse(data, fds)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                conn.send(f"error {e}".encode())
            conn.close()
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_child(conn)
            return req
        for fd in req.fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ)
        with contextlib.suppress(OSError):
            conn.send(f"pid {pid}".encode())
        return None

    def _become_child(self, conn: socket.socket) -> None:
        self.selector.close()
        self.listener.close()
        conn.close()
        for pidfd, (_, other) in self.children.items():
            os.close(pidfd)
            other.close()
        self.children.clear()

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
        conn.close()

    def close(self) -> None:
        if os.getpid() == self.pid:
            self.path.unlink(missing_ok=True)


class Spawned:
    """A ``python -m MODULE`` process forked by the warm interpreter for a client in the
    guest, with the part of :class:`subprocess.Popen` the guest helpers use.  Its parent
    is the warm interpreter, which reaps it and reports its exit on our connection."""

    def __init__(self, sock: socket.socket, pid: int, args: list[str]) -> None:
        self._sock = sock
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._sock.setblocking(False)
            try:
                self._ended(self._sock.recv(64))
            except BlockingIOError:
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._sock.settimeout(timeout)
            try:
                self._ended(self._sock.recv(64))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this process's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, msg: bytes) -> None:
        text = msg.decode(errors="replace")
        self._sock.close()
        if not text.startswith("exit "):
            raise RuntimeError(f"warm interpreter: {text or 'lost the process'}")
        self.returncode = int(text.split()[1])


def start(
    module: str, args: list[str], *, files: tuple[int, int, int], cwd: str | Path | None,
    env: dict[str, str], socket_path: str = SOCKET,
) -> Spawned | None:  # fmt: skip
    """``python -m MODULE ARGS`` in its own session, forked by the warm interpreter with
    ``files`` as its stdin, stdout and stderr; None when no warm interpreter listens (start
    it the usual way); RuntimeError when one listens but does not run it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(socket_path)
    except OSError:
        sock.close()
        return None
    try:
        req = {"module": module, "args": args, "cwd": None if cwd is None else str(cwd),
               "env": env}  # fmt: skip
        socket.send_fds(sock, [json.dumps(req).encode()], list(files))
        sock.settimeout(REQUEST_TIMEOUT)
        first = sock.recv(4096).decode(errors="replace")
    except OSError as e:
        sock.close()
        raise RuntimeError(f"warm interpreter: {e}") from None
    if not first.startswith("pid "):
        sock.close()
        raise RuntimeError(f"warm interpreter: {first or 'no answer'}")
    return Spawned(sock, int(first.split()[1]), [module, *args])


def spawn(
    module: str, args: list[str], *, log: Path, cwd: Path, env: dict[str, str],
    socket_path: str = SOCKET,
) -> Spawned | None:  # fmt: skip
    """``start`` for a daemon: no input, its output appended to ``log``."""
    with open(os.devnull, "rb") as stdin, open(log, "ab") as out:
        files = (stdin.fileno(), out.fileno(), out.fileno())
        return start(module, args, files=files, cwd=cwd, env=env, socket_path=socket_path)


def run_child(req: Request) -> int:
    """What ``python -m MODULE ARGS`` does, in the forked child; returns the exit code."""
    os.setsid()
    for target, fd in enumerate(req.fds):
        os.dup2(fd, target)
    for fd in req.fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # undo the server's handler
    os.environ.clear()
    os.environ.update(req.env)
    if req.cwd is not None:
        os.chdir(req.cwd)
    sys.argv = [req.module, *req.args]
    # python -m executes the module once, as __main__: the preloaded copy must not be
    # found first (runpy would warn on stderr, and the program's state would be split)
    sys.modules.pop(req.module, None)
    try:
        runpy.run_module(req.module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - as python -m: the traceback, exit 1
        traceback.print_exc()
        return 1
    return 0


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"), as the interpreter does
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tests.vm.warm SOCKET MODULE...", file=sys.stderr)
        return 2
    for name in args[1:]:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a child that needs it will say why
            print(f"warm: not preloaded: {name}: {type(e).__name__}: {e}", flush=True)
    server = Server(Path(args[0]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"warm: {len(args) - 1} modules imported, serving on {args[0]}", flush=True)
    try:
        req = server.serve()
    finally:
        server.close()
    return run_child(req)


if __name__ == "__main__":
    sys.exit(main())
