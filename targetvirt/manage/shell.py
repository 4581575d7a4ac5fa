"""``targetvirt``: the targetcli-style shell of targetvirt.

Interactive (``targetvirt``) or one command at a time
(``targetvirt /vdisks create name=db size=10G pool=p1``); either way it talks to the
running ``targetvirt-handler`` through its D-Bus API.  The tree::

    /pools              pools; their containers beneath them (/pools/P/0, ...)
    /vdisks             vdisks; their snapshots beneath them (/vdisks/V/S)
    /exports            iSCSI targets (/exports/<iqn>)
    /agents             agents serving vdisks
    /jobs               long operations (flatten, evacuate, rollback, delete, check)

``help`` in any node lists its commands; ``help COMMAND`` explains one.  Sizes take
K, M, G, T suffixes (binary).  A failed one-shot command prints one line on stderr and
exits 1; the shell never prints a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import readline
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from functools import partial
from typing import IO, Any, NoReturn

from configshell_fb import ConfigNode, ConfigShell, ExecutionError
from configshell_fb.log import Log
from configshell_fb.prefs import Prefs
from pyparsing import ParseBaseException

from targetvirt import __version__
from targetvirt.errors import InvalidArgument, TargetvirtError
from targetvirt.manage import values as val
from targetvirt.manage.common import NotAvailable, agent_of, bus_address

PROG = "targetvirt"
DEFAULT_STATE = "/var/lib/targetvirt"
DEFAULT_RUN = "/run/targetvirt"
POLL = 0.2  # seconds between job polls


class CommandFailed(TargetvirtError):
    """A command ran but its outcome is a failure (e.g. the checker found damage)."""


# --- rendering ------------------------------------------------------------------------------

_SIZE_KEYS = ("size", "bytes", "segment_size")


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and (key.endswith(_SIZE_KEYS) or key == "size"):
        return f"{val.format_size(value)} ({value} bytes)"
    if isinstance(value, float) and key in ("created", "started", "finished"):
        return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    if value is None or value in ("", []):
        return "-"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(str(v) for v in value)
    return str(value)


def render(data: dict[str, Any], indent: str = "") -> list[str]:
    """A dict as ``key: value`` lines; nested dicts and lists of dicts are indented."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += render(value, indent + "  ") if value else [f"{indent}  -"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            for item in value:
                sub = render(item, indent + "    ")
                lines.append(f"{indent}  - {sub[0].strip()}")
                lines += sub[1:]
        else:
            lines.append(f"{indent}{key}: {_fmt_value(key, value)}")
    return lines


class ProgressBar:
    """One status line on a terminal (nothing when the stream is not a terminal)."""

    WIDTH = 30

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self._spin = itertools.cycle("|/-\\")
        self._shown = False

    def show(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        what = f"{job['kind']} {job['target']}"
        total, done = int(job.get("total") or 0), int(job.get("done") or 0)
        if total > 0:
            fill = min(self.WIDTH, self.WIDTH * done // total)
            bar = "#" * fill + "." * (self.WIDTH - fill)
            line = f"{what}: [{bar}] {100 * done // total:3d}% {done}/{total} {job['unit']}"
        else:
            elapsed = time.time() - float(job.get("started") or time.time())
            line = f"{what}: {next(self._spin)} {elapsed:.0f} s"
        self.stream.write("\r" + line[:120].ljust(60) + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


# --- the shell ------------------------------------------------------------------------------


class QuietDebugLog(Log):  # type: ignore[misc]
    """configshell's log, but ``debug`` walks the stack only when debug output is wanted.

    configshell's ``Log.debug`` calls ``inspect.stack()`` (which reads every caller's
    source file) before it looks at the level, a dozen times a command: about 10 ms on a
    host, seconds on a slow machine such as a TCG guest.  A one-shot has no log file and
    logs ``info`` to the console, so it never wants them."""

    def debug(self, msg: str) -> None:
        console = str(self.prefs["loglevel_console"])
        to_file = bool(self.prefs["logfile"]) and str(self.prefs["loglevel_file"])
        if console.startswith("debug") or (to_file and to_file.startswith("debug")):
            super().debug(msg)


class JsonPrefs(Prefs):  # type: ignore[misc]
    """The interactive shell's preferences (``set global``, bookmarks, path history) in a
    JSON file.  configshell keeps them as a pickle, which would run whatever code a
    planted ``prefs.bin`` holds at every start: JSON holds only data."""

    filename: str | None  # configshell's attributes, kept in its shared (Borg) state
    autosave: bool

    def save(self, filename: str | None = None) -> None:
        path = filename or self.filename
        if path is None:
            return
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._prefs, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # whole or not at all: a crash leaves the old file

    def load(self, filename: str | None = None, defaults: dict[str, Any] | None = None) -> None:
        """Read the file; with ``defaults``, a setting whose value is not of its default's
        type makes the whole file rejected (InvalidArgument), as a damaged one does."""
        path = filename or self.filename
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path) as f:
                prefs = json.load(f)
            if not isinstance(prefs, dict):
                raise ValueError("not a JSON object")
            wrong = sorted(
                k
                for k, v in (defaults or {}).items()
                if v is not None and k in prefs and type(prefs[k]) is not type(v)
            )
            if wrong:
                raise ValueError(f"wrong type for {', '.join(wrong)}")
        except (OSError, ValueError) as e:
            # leave the file for the user to look at; this session keeps its own settings
            self.filename, self.autosave = None, False
            raise InvalidArgument(
                f"ignoring the shell preferences in {path} ({_one_line(str(e))}); "
                "fix or remove the file to keep settings between sessions"
            ) from None
        self._prefs.update(prefs)


class TvShell(ConfigShell):  # type: ignore[misc]
    """configshell's shell, with the client and streams of this run.

    With ``prefs_dir`` (interactive use) it keeps history, preferences and a debug log
    there; without, it starts from the defaults and writes nothing."""

    default_prefs = {**ConfigShell.default_prefs, "tree_round_nodes": True}

    def __init__(self, client: Any, prefs_dir: str | None, out: IO[str], err: IO[str]) -> None:
        # configshell's preferences are shared by every shell in the process (a Borg):
        # start each shell from the defaults, and never let configshell read its pickle
        shared = Prefs()
        shared._prefs, shared.filename, shared.autosave = {}, None, False
        super().__init__(None)
        self.tv_client = client
        self.tv_out = out
        self.tv_err = err
        self.tv_interactive = False
        if prefs_dir is not None:
            self._keep_in(os.path.expanduser(prefs_dir), err)
        self.prefs["color_mode"] = out.isatty()
        self.log = QuietDebugLog()  # before the console is pointed: both are shared (Borg)
        self.con._stdout = out  # configshell's console writes (ls, help) go where ours go

    def _keep_in(self, folder: str, err: IO[str]) -> None:
        """History, preferences and the debug log of an interactive shell, in ``folder``."""
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.prefs = JsonPrefs(os.path.join(folder, "prefs.json"))
        try:
            self.prefs.load(defaults=self.default_prefs)
        except InvalidArgument as e:
            err.write(f"{PROG}: {e}\n")
        for pref, value in self.default_prefs.items():
            if pref not in self.prefs:
                self.prefs[pref] = value
        if self.prefs["logfile"] is None:
            self.prefs["logfile"] = os.path.join(folder, "log.txt")
        self.prefs.autosave = self.prefs.filename is not None
        self._cmd_history = os.path.join(folder, "history.txt")
        self._save_history = True
        if os.path.isfile(self._cmd_history) and sys.stdin.isatty():
            with suppress(OSError):
                readline.read_history_file(self._cmd_history)

    def run_cmdline(self, cmdline: str) -> None:
        if cmdline.strip():
            check_cmdline(self._parser, cmdline)
        try:
            super().run_cmdline(cmdline)
        finally:
            root = self._root_node
            if self.tv_interactive and getattr(root, "changed", False):
                root.refresh_keeping_place()


def check_cmdline(parser: Any, cmdline: str) -> None:
    """Refuse what configshell would silently drop: trailing junk (it parses a prefix and
    ignores the rest) and a parameter given twice (the last one would win)."""
    try:
        parser.parseString(cmdline, parseAll=True)
    except ParseBaseException as e:
        loc = int(getattr(e, "loc", 0))
        raise InvalidArgument(
            f"cannot parse the command line at {cmdline[loc : loc + 20]!r} (character "
            f"{loc + 1}): use [PATH] COMMAND [PARAMETER=VALUE...]"
        ) from None
    seen: set[str] = set()
    for word in cmdline.split()[1:]:
        key, eq, _ = word.partition("=")
        if eq and key:
            if key in seen:
                raise InvalidArgument(f"parameter {key}= is given twice")
            seen.add(key)


def build_tree(shell: TvShell) -> Root:
    root = Root(shell)
    root.refresh()
    return root


class Node(ConfigNode):  # type: ignore[misc]
    help_intro = "targetvirt shell: type help COMMAND for details, ls to see the tree."

    def __init__(self, name: str, parent: Any = None, shell: Any = None) -> None:
        super().__init__(name, parent, shell)

    # -- plumbing ------------------------------------------------------------
    @property
    def client(self) -> Any:
        return self.shell.tv_client

    @property
    def root(self) -> Any:
        return self.get_root()

    @property
    def data(self) -> dict[str, Any]:
        listing: dict[str, Any] = self.root.listing
        return listing

    def say(self, text: str) -> None:
        self.shell.tv_out.write(text.rstrip("\n") + "\n")
        self.shell.tv_out.flush()

    def done(self, result: dict[str, Any]) -> None:
        self.say(result.get("message", "ok"))
        self.root.changed = True

    def run_job(self, job: dict[str, Any], background: str | None) -> None:
        self.root.changed = True
        if background is not None and val.parse_bool(background, "background"):
            jid = job["id"]
            self.say(
                f"Started job {jid}: {job['kind']} {job['target']} (progress: "
                f"targetvirt /jobs/{jid} info; stop: targetvirt /jobs cancel id={jid})"
            )
            return
        result = wait_job(self.client, job, self.shell.tv_err)
        self.say(result.get("message", "done"))
        if result.get("clean") is False:
            raise CommandFailed("the metadata check found problems (listed above)")

    def __getattr__(self, name: str) -> Any:
        prefix = "ui_complete_"
        if name.startswith(prefix) and hasattr(type(self), "ui_command_" + name[len(prefix) :]):
            return partial(self._complete, name[len(prefix) :])
        raise AttributeError(name)

    def candidates(self, command: str, param: str) -> list[str]:
        """Values offered by tab completion for ``param`` of ``command``."""
        if param in ("background", "recursive", "repair", "preallocate", "demo",
                     "readonly"):  # fmt: skip
            return ["true", "false"]
        if param == "cow":
            return ["redirect", "copy"]
        if param == "mode":
            return ["nowrite", "invalid"]
        if param == "pool":
            return [p["name"] for p in self.data["pools"]]
        if param in ("vdisk", "vdisks") or (param == "name" and command == "delete"
                                           and self.name == "vdisks"):  # fmt: skip
            return [v["name"] for v in self.data["vdisks"]]
        return []

    def _complete(self, command: str, parameters: dict[str, str], text: str,
                  current_param: str) -> list[str]:  # fmt: skip
        if not current_param:
            return []
        prefix, sep, last = text.rpartition(",") if current_param in (
            "vdisks", "acl", "portal") else ("", "", text)  # fmt: skip
        found = [prefix + sep + c for c in self.candidates(command, current_param)
                 if c.startswith(last)]  # fmt: skip
        return [found[0] + " "] if len(found) == 1 and not sep else found

    def ui_command_cd(self, path: str | None = None) -> Any:
        if path is None and not (self.shell.tv_interactive and sys.stdin.isatty()):
            # configshell would open its full-screen tree browser on a pipe (a traceback)
            raise ExecutionError("cd needs a PATH here; without one it browses the tree, "
                                 "which needs the interactive shell on a terminal")  # fmt: skip
        return super().ui_command_cd(path)

    ui_command_cd.__doc__ = ConfigNode.ui_command_cd.__doc__

    def ui_command_info(self) -> None:
        """Shows everything about this node."""
        for line in render(self.info_data()):
            self.say(line)

    def info_data(self) -> dict[str, Any]:
        return {}


# -- root -----------------------------------------------------------------------


class Root(Node):
    def __init__(self, shell: Any) -> None:
        super().__init__("/", shell=shell)
        self.listing: dict[str, Any] = {}
        self.changed = False

    def refresh(self) -> None:
        self.listing = self.client.listing()
        for child in list(self.children):
            self.remove_child(child)
        Pools(self)
        Vdisks(self)
        Exports(self)
        Agents(self)
        Jobs(self)
        self.changed = False

    def refresh_keeping_place(self) -> None:
        """Re-read the tree; stay in the same node, or the closest one that is left."""
        path = self.shell._current_node.path
        self.refresh()
        node = self
        for part in [p for p in path.split("/") if p]:
            try:
                node = node.get_child(part)
            except ValueError:
                break
        self.shell._current_node = node

    def summary(self) -> tuple[str, bool | None]:
        d = self.listing.get("daemon", {})
        return f"targetvirt-handler {d.get('version', '?')}, {d.get('controller', '')}", None

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.status())

    def ui_command_check(self, repair: str = "false", background: str | None = None) -> None:
        """Runs the metadata checker in the daemon: every mapped entry inside its
        pool, no segment shared across families, and leaked space (free segments
        still holding data).  repair=true gives leaked space back; it never touches a
        mapped segment.  Exits non-zero when it finds problems."""
        job = self.client.check(repair=val.parse_bool(repair, "repair"))
        self.run_job(job, background)

    def ui_command_refresh(self) -> None:
        """Reads the tree from the daemon again."""
        self.refresh()

    def ui_command_version(self) -> None:
        """Shows the versions of this shell and of the daemon."""
        self.say(f"targetvirt {__version__}; daemon {self.client.status()['version']}")


# -- pools ----------------------------------------------------------------------


class Pools(Node):
    def __init__(self, parent: Any) -> None:
        super().__init__("pools", parent)
        for pool in self.data["pools"]:
            Pool(self, pool)

    def summary(self) -> tuple[str, bool | None]:
        pools = self.data["pools"]
        free = sum(p["free_bytes"] for p in pools)
        total = sum(p["total_bytes"] for p in pools)
        return (f"{len(pools)} pools, {val.format_size(free)} free of "
                f"{val.format_size(total)}", None)  # fmt: skip

    def info_data(self) -> dict[str, Any]:
        return {"pools": self.data["pools"]}

    def ui_command_create(  # noqa: PLR0917 - configshell passes parameters by position
        self, name: str, path: str | None = None, size: str | None = None,
        device: str | None = None, segment: str | None = None,
        preallocate: str = "false", rados: str | None = None, conf: str | None = None,
        id: str | None = None, keyring: str | None = None, threshold: str | None = None,
    ) -> None:  # fmt: skip
        """Creates a pool with its first container: a file (path=FILE size=SIZE,
        created sparse unless preallocate=true), a whole block device
        (device=BLOCKDEV), or objects in a Ceph pool (rados=CEPHPOOL[/NAMESPACE]
        size=SIZE, one RADOS object per segment, made when first written; conf=FILE
        names the ceph.conf, default /etc/ceph/ceph.conf; id=CLIENT the cephx user,
        default admin; keyring=FILE its keyring if the conf file does not name it).
        segment=SIZE sets the pool's segment size (a power of two from 64K to 64M,
        default 1M); every vdisk of the pool uses it.  threshold=PERCENT sets its soft
        threshold (default 80; see set in a pool)."""
        seg = val.parse_size(segment, "segment") if segment else None
        src = _source(path, size, device, preallocate, rados, conf, id, keyring)
        pct = val.parse_percent(threshold, "threshold") if threshold is not None else None
        self.done(self.client.create_pool(name, **src, segment_size=seg, threshold=pct))

    def ui_command_delete(self, name: str) -> None:
        """Deletes an empty pool (no vdisks). Its container files (and RADOS objects)
        are left in place."""
        self.done(self.client.delete_pool(name))


class Pool(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(info["name"], parent)
        self.pool = info
        for c in info["containers"]:
            Container(self, c)

    def summary(self) -> tuple[str, bool | None]:
        p = self.pool
        pct = 100 * p["used_bytes"] // p["total_bytes"] if p["total_bytes"] else 0
        failed = sum(1 for c in p["containers"] if c["state"] == "failed")
        return (f"{val.format_size(p['total_bytes'])}, {pct}% used, "
                f"{len(p['containers'])} containers, "
                f"{val.format_size(p['segment_size'])} segments"
                + (f", {failed} failed" if failed else ""),
                False if failed else None)  # fmt: skip

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.info("pool", self.name))

    def candidates(self, command: str, param: str) -> list[str]:
        if param == "container":
            return [str(c["cid"]) for c in self.pool["containers"]]
        return super().candidates(command, param)

    def ui_command_add(  # noqa: PLR0917 - configshell passes parameters by position
        self, path: str | None = None, size: str | None = None, device: str | None = None,
        preallocate: str = "false", rados: str | None = None, conf: str | None = None,
        id: str | None = None, keyring: str | None = None,
    ) -> None:  # fmt: skip
        """Adds a container to the pool: a file (path=FILE size=SIZE), a block
        device (device=BLOCKDEV), or objects in a Ceph pool
        (rados=CEPHPOOL[/NAMESPACE] size=SIZE [conf=FILE] [id=CLIENT]
        [keyring=FILE], as for /pools create). New segments go to the container with
        the most free space."""
        src = _source(path, size, device, preallocate, rados, conf, id, keyring)
        self.done(self.client.add_container(self.name, **src))

    def ui_command_evacuate(self, container: str, background: str | None = None) -> None:
        """Moves every segment out of a container into the others (a job: progress
        bar, Ctrl-C stops it cleanly, background=true returns at once). Then remove
        the container with: remove container=N."""
        cid = val.parse_int(container, "container", high=65535)
        self.run_job(self.client.evacuate(self.name, cid), background)

    def ui_command_remove(self, container: str) -> None:
        """Removes an empty (evacuated) container from the pool."""
        cid = val.parse_int(container, "container", high=65535)
        self.done(self.client.remove_container(self.name, cid))

    def ui_command_clear(self, container: str) -> None:
        """Clears the failed mark of a container (its medium was repaired, or the error
        was transient): new segments may go to it again.  A container is marked
        failed at its first medium error (EIO); it keeps serving the segments it holds
        but takes no new ones.  To retire it instead: evacuate, then remove."""
        cid = val.parse_int(container, "container", high=65535)
        self.done(self.client.clear_container(self.name, cid))

    def ui_command_set(self, group: str | None = None, **parameter: str) -> None:
        """Changes the pool's settings: threshold=PERCENT, its soft threshold (1 to 100,
        default 80).  When the share of the pool that new data cannot take reaches it,
        every LUN of the pool's vdisks tells its initiators once (THIN PROVISIONING
        SOFT THRESHOLD REACHED); it is told again after usage has fallen below it.
        set GROUP ... sets the shell's own preferences (e.g. set global color_mode=true)."""
        if group is not None:
            super().ui_command_set(group, **parameter)
            return
        if not parameter:
            raise InvalidArgument("give threshold=PERCENT: the pool's soft threshold")
        unknown = sorted(set(parameter) - {"threshold"})
        if unknown:
            raise InvalidArgument(
                f"a pool has no setting {unknown[0]}= (settings: threshold=PERCENT)"
            )
        pct = val.parse_percent(parameter["threshold"], "threshold")
        self.done(self.client.set_pool(self.name, threshold=pct))


class Container(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(str(info["cid"]), parent)
        self.c = info

    def summary(self) -> tuple[str, bool | None]:
        c = self.c
        pct = 100 * c["used_bytes"] // c["bytes"] if c["bytes"] else 0
        return (f"{c['kind']} {c['path']}, {val.format_size(c['bytes'])}, {pct}% used, "
                f"{c['state']}", c["state"] != "failed")  # fmt: skip

    def info_data(self) -> dict[str, Any]:
        return dict(self.c)

    def ui_command_evacuate(self, background: str | None = None) -> None:
        """Moves every segment of this container into the pool's other containers."""
        self.parent.ui_command_evacuate(self.name, background)

    def ui_command_remove(self) -> None:
        """Removes this container (it must be empty: evacuate it first)."""
        self.parent.ui_command_remove(self.name)

    def ui_command_clear(self) -> None:
        """Clears this container's failed mark: new segments may go to it again."""
        self.parent.ui_command_clear(self.name)


# -- vdisks ---------------------------------------------------------------------


class Vdisks(Node):
    def __init__(self, parent: Any) -> None:
        super().__init__("vdisks", parent)
        by_name = {v["name"]: v for v in self.data["vdisks"]}
        for v in self.data["vdisks"]:
            if not v["readonly"]:
                Vdisk(self, v, [by_name[s] for s in v["snapshots"] if s in by_name])

    def summary(self) -> tuple[str, bool | None]:
        vd = [v for v in self.data["vdisks"] if not v["readonly"]]
        return f"{len(vd)} vdisks, {len(self.data['vdisks']) - len(vd)} snapshots", None

    def info_data(self) -> dict[str, Any]:
        return {"vdisks": [v["name"] for v in self.data["vdisks"]]}

    def ui_command_create(
        self, name: str, size: str, pool: str, segment: str | None = None,
        cow: str = "redirect",
    ) -> None:  # fmt: skip
        """Creates a thin vdisk of size=SIZE in pool=P. cow=redirect (default: a
        write to a shared segment goes to a new segment) or cow=copy (the old data is
        copied out and the vdisk keeps its layout). segment=SIZE, if given, must be
        the pool's segment size."""
        self.done(self.client.create_vdisk(
            name, pool, val.parse_size(size),
            cow=cow, segment_size=val.parse_size(segment, "segment") if segment else None,
        ))  # fmt: skip

    def ui_command_delete(
        self, name: str, recursive: str = "false", background: str | None = None
    ) -> None:
        """Deletes a vdisk or a snapshot (name=V or name=V@S). recursive=true also
        deletes the vdisk's snapshots. Exported vdisks must be unexported first."""
        rec = val.parse_bool(recursive, "recursive")
        job = self.client.delete_vdisk(name, recursive=rec)
        self.run_job(job, background)

    def ui_command_group_snapshot(self, name: str, vdisks: str, mode: str = "nowrite") -> None:
        """Snapshots several vdisks at one instant (a consistency group):
        vdisks=V1,V2,... each get the snapshot V@name."""
        names = val.parse_list(vdisks, "vdisks")
        self.done(self.client.group_snapshot(names, name, mode=mode))


class Vdisk(Node):
    def __init__(self, parent: Any, info: dict[str, Any], snaps: list[dict[str, Any]]) -> None:
        super().__init__(info["name"], parent)
        self.v = info
        for s in snaps:
            Snapshot(self, s)

    def summary(self) -> tuple[str, bool | None]:
        return _vdisk_summary(self.v)

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.info("vdisk", self.v["name"]))

    def candidates(self, command: str, param: str) -> list[str]:
        if param == "snapshot":
            return [s.partition("@")[2] for s in self.v["snapshots"]]
        return super().candidates(command, param)

    def ui_command_snapshot(self, name: str, mode: str = "nowrite") -> None:
        """Takes a read-only snapshot V@name (instant: the table is copied). mode is
        how writes are held while it is taken: nowrite or invalid."""
        self.done(self.client.snapshot(self.v["name"], name, mode=mode))

    def ui_command_clone(self, name: str, snapshot: str | None = None,
                         mode: str = "nowrite") -> None:  # fmt: skip
        """Makes a writable vdisk from this vdisk, or from its snapshot=S."""
        self.done(self.client.clone(self.v["name"], name, snapshot=snapshot, mode=mode))

    def ui_command_rollback(self, snapshot: str, background: str | None = None) -> None:
        """Makes the vdisk equal to its snapshot S again (size included)."""
        self.run_job(self.client.rollback(self.v["name"], snapshot), background)

    def ui_command_flatten(self, background: str | None = None) -> None:
        """Gives the vdisk private copies of every segment it shares with snapshots
        and clones (a job: progress bar, Ctrl-C stops it cleanly and a new flatten
        resumes, background=true returns at once)."""
        self.run_job(self.client.flatten(self.v["name"]), background)

    def ui_command_resize(self, size: str) -> None:
        """Sets the vdisk's size. An exported vdisk may grow (the initiator is told:
        capacity data has changed) but not shrink."""
        self.done(self.client.resize(self.v["name"], val.parse_size(size)))

    def ui_command_freeze(self, mode: str = "nowrite", timeout: str | None = None) -> None:
        """Holds writes (mode=nowrite) or all I/O (mode=invalid) to the vdisk until
        thaw, or until timeout=SECONDS have passed."""
        t = val.parse_duration(timeout) if timeout is not None else None
        self.done(self.client.freeze(self.v["name"], mode=mode, timeout=t))

    def ui_command_thaw(self) -> None:
        """Lets writes to a frozen vdisk proceed."""
        self.done(self.client.thaw(self.v["name"]))

    def ui_command_delay(self, timeout: str) -> None:
        """Holds all I/O to the vdisk for at most timeout=SECONDS (resume ends it)."""
        self.done(self.client.delay(self.v["name"], val.parse_duration(timeout)))

    def ui_command_resume(self) -> None:
        """Releases I/O held by delay at once."""
        self.done(self.client.resume(self.v["name"]))

    def ui_command_export(  # noqa: PLR0917 - configshell passes parameters by position
        self, iqn: str | None = None, portal: str | None = None, acl: str | None = None,
        userid: str | None = None, password: str | None = None,
        mutual_userid: str | None = None, mutual_password: str | None = None,
        demo: str = "false", readonly: str = "false", lun: str | None = None,
    ) -> None:  # fmt: skip
        """Exports this vdisk as an iSCSI LUN; the parameters are those of
        /exports create (see help there)."""
        self.root.get_child("exports").ui_command_create(
            self.v["name"], iqn, portal, acl, userid, password, mutual_userid,
            mutual_password, demo, readonly, lun,
        )  # fmt: skip

    def ui_command_unexport(self) -> None:
        """Removes this vdisk's LUN (and its target when it was the last LUN)."""
        self.done(self.client.unexport(self.v["name"]))


class Snapshot(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(info["name"].partition("@")[2], parent)
        self.v = info

    def summary(self) -> tuple[str, bool | None]:
        return _vdisk_summary(self.v)

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.info("vdisk", self.v["name"]))

    def ui_command_clone(self, name: str, mode: str = "nowrite") -> None:
        """Makes a writable vdisk from this snapshot."""
        self.done(self.client.clone(self.v["name"], name, mode=mode))

    def ui_command_export(  # noqa: PLR0917 - configshell passes parameters by position
        self, iqn: str | None = None, portal: str | None = None, acl: str | None = None,
        userid: str | None = None, password: str | None = None,
        mutual_userid: str | None = None, mutual_password: str | None = None,
        demo: str = "false", lun: str | None = None,
    ) -> None:  # fmt: skip
        """Exports this snapshot as a read-only LUN; the parameters are those of
        /exports create (see help there)."""
        self.root.get_child("exports").ui_command_create(
            self.v["name"], iqn, portal, acl, userid, password, mutual_userid,
            mutual_password, demo, "true", lun,
        )  # fmt: skip

    def ui_command_unexport(self) -> None:
        """Removes this snapshot's LUN."""
        self.done(self.client.unexport(self.v["name"]))

    def ui_command_delete(self, background: str | None = None) -> None:
        """Deletes this snapshot."""
        self.run_job(self.client.delete_vdisk(self.v["name"]), background)


# -- exports --------------------------------------------------------------------


class Exports(Node):
    def __init__(self, parent: Any) -> None:
        super().__init__("exports", parent)
        for t in self.data["exports"]:
            Export(self, t)

    def summary(self) -> tuple[str, bool | None]:
        luns = sum(len(t["luns"]) for t in self.data["exports"])
        return f"{len(self.data['exports'])} targets, {luns} LUNs", None

    def info_data(self) -> dict[str, Any]:
        return {"targets": [t["iqn"] for t in self.data["exports"]]}

    def ui_command_create(  # noqa: PLR0917 - configshell passes parameters by position
        self, vdisk: str, iqn: str | None = None, portal: str | None = None,
        acl: str | None = None, userid: str | None = None, password: str | None = None,
        mutual_userid: str | None = None, mutual_password: str | None = None,
        demo: str = "false", readonly: str = "false", lun: str | None = None,
    ) -> None:  # fmt: skip
        """Exports a vdisk (vdisk=V) or a snapshot (vdisk=V@S, always read-only) as
        an iSCSI LUN. iqn= names the target (generated if absent; an existing target
        of ours gets another LUN); portal=ADDR:PORT[,...] (default 0.0.0.0:3260);
        acl=IQN[,...] lets those initiators in; userid= password= set CHAP, plus
        mutual_userid= mutual_password= for mutual CHAP; demo=true lets any initiator
        in (no ACLs); readonly=true exports a vdisk read-only."""
        self.done(self.client.export(
            vdisk,
            iqn=iqn,
            portals=val.parse_list(portal, "portal") if portal is not None else None,
            acls=val.parse_list(acl, "acl") if acl is not None else None,
            userid=userid, password=password, mutual_userid=mutual_userid,
            mutual_password=mutual_password, demo=val.parse_bool(demo, "demo"),
            readonly=val.parse_bool(readonly, "readonly"),
            lun=val.parse_int(lun, "lun", high=255) if lun is not None else None,
        ))  # fmt: skip

    def ui_command_delete(self, vdisk: str) -> None:
        """Removes the LUN of vdisk=V (or V@S); the target goes with its last LUN."""
        self.done(self.client.unexport(vdisk))

    def ui_command_restore(self) -> None:
        """Applies every saved export to LIO again (what exists is left alone): what
        the targetvirt-restore unit runs at boot."""
        result = self.client.restore_exports()
        self.done(result)
        if result.get("errors"):
            raise CommandFailed(f"{len(result['errors'])} LUNs could not be restored")


class Export(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(info["iqn"], parent)
        self.t = info

    def summary(self) -> tuple[str, bool | None]:
        t = self.t
        luns = ", ".join(f"{x['lun']}:{x['vdisk']}" for x in t["luns"])
        access = "demo" if t["demo"] else f"{len(t['acls'])} ACLs"
        return (f"LUNs {luns}; {', '.join(t['portals'])}; {access}; auth {t['auth']}",
                None)  # fmt: skip

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.info("export", self.t["iqn"]))


# -- agents, jobs -----------------------------------------------------------------


class Agents(Node):
    def __init__(self, parent: Any) -> None:
        super().__init__("agents", parent)
        for a in self.data["agents"]:
            Agent(self, a)

    def summary(self) -> tuple[str, bool | None]:
        return f"{len(self.data['agents'])} agents", None

    def info_data(self) -> dict[str, Any]:
        return {"agents": self.data["agents"]}


class Agent(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(info["id"], parent)
        self.a = info

    def summary(self) -> tuple[str, bool | None]:
        a = self.a
        return f"{a['kind']}, lease {a['lease']}, {len(a['vdisks'])} vdisks", None

    def info_data(self) -> dict[str, Any]:
        return dict(self.a)


class Jobs(Node):
    def __init__(self, parent: Any) -> None:
        super().__init__("jobs", parent)
        for j in self.data["jobs"]:
            Job(self, j)

    def summary(self) -> tuple[str, bool | None]:
        running = sum(1 for j in self.data["jobs"] if j["state"] == "running")
        return f"{running} running, {len(self.data['jobs']) - running} finished", None

    def info_data(self) -> dict[str, Any]:
        return {"jobs": self.data["jobs"]}

    def candidates(self, command: str, param: str) -> list[str]:
        if param == "id":
            return [str(j["id"]) for j in self.data["jobs"] if j["state"] == "running"]
        return super().candidates(command, param)

    def ui_command_cancel(self, id: str) -> None:
        """Stops a running job at its next step; what it did so far stays consistent,
        and running the operation again resumes it."""
        self.done(self.client.cancel_job(val.parse_int(id, "id", low=1, high=2**32 - 1)))


class Job(Node):
    def __init__(self, parent: Any, info: dict[str, Any]) -> None:
        super().__init__(str(info["id"]), parent)
        self.j = info

    def summary(self) -> tuple[str, bool | None]:
        j = self.j
        progress = f" {j['done']}/{j['total']} {j['unit']}" if j["total"] else ""
        return f"{j['kind']} {j['target']}: {j['state']}{progress}", j["state"] != "failed"

    def info_data(self) -> dict[str, Any]:
        return dict(self.client.job(int(self.name)))

    def ui_command_cancel(self) -> None:
        """Stops this job at its next step."""
        self.done(self.client.cancel_job(int(self.name)))


def _source(  # noqa: PLR0917
    path: str | None, size: str | None, device: str | None, preallocate: str,
    rados: str | None = None, conf: str | None = None, client_id: str | None = None,
    keyring: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A container's source as the API takes it (files named relative to this shell)."""
    return {
        "path": os.path.abspath(path) if path else None,
        "device": os.path.abspath(device) if device else None,
        "rados": rados or None,
        "conf": os.path.abspath(conf) if conf else None,
        "client_id": client_id or None,
        "keyring": os.path.abspath(keyring) if keyring else None,
        "size": val.parse_size(size) if size is not None else None,
        "preallocate": val.parse_bool(preallocate, "preallocate"),
    }


def _vdisk_summary(v: dict[str, Any]) -> tuple[str, bool | None]:
    parts = [val.format_size(v["size"]), f"{val.format_size(v['allocated_bytes'])} allocated"]
    if not v["readonly"]:
        parts.append(v["cow"])
    if v["parent"] and not v["readonly"]:
        parts.append(f"clone of {v['parent']}")
    if v["export"]:
        parts.append(f"LUN {v['export']['lun']} of {v['export']['iqn']}")
    if v["state"] != "normal":
        parts.append(v["state"])
    if v["served_by"]:
        parts.append(f"served by {', '.join(v['served_by'])}")
    return ", ".join(parts), None


def _raise_job_error(job: dict[str, Any]) -> None:
    from targetvirt.manage.client import _KINDS  # noqa: PLC0415

    cls = _KINDS.get(job.get("error_name") or "", TargetvirtError)
    raise cls(job.get("error") or f"job {job['id']} {job['state']}")


def wait_job(client: Any, job: dict[str, Any], err: IO[str]) -> dict[str, Any]:
    """Follow a job to its end, with a progress bar on a terminal; Ctrl-C cancels it
    (a second Ctrl-C leaves it running in the background).  Returns its result."""
    bar = ProgressBar(err)
    jid = job["id"]
    try:
        while job["state"] == "running":
            bar.show(job)
            time.sleep(POLL)
            job = client.job(jid)
    except KeyboardInterrupt:
        bar.clear()
        if not job.get("cancellable"):
            raise CommandFailed(
                f"job {jid} ({job['kind']} {job['target']}) cannot be stopped half-way; it "
                f"goes on in the background (targetvirt /jobs/{jid} info)"
            ) from None
        client.cancel_job(jid)
        err.write(f"stopping job {jid} at its next step (Ctrl-C again to leave it running)\n")
        try:
            while job["state"] == "running":
                time.sleep(POLL)
                job = client.job(jid)
        except KeyboardInterrupt:
            raise CommandFailed(
                f"job {jid} goes on in the background until it stops (targetvirt /jobs/{jid} info)"
            ) from None
    bar.clear()
    if job["state"] != "done":
        _raise_job_error(job)
    result = job.get("result") or {}
    return result if isinstance(result, dict) else {"message": str(result)}


# --- entry point --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog=PROG,
        description="The targetvirt shell: pools, vdisks, snapshots, clones and iSCSI exports "
        "of the running targetvirt-handler. Without COMMAND it is interactive.",
        epilog="examples: targetvirt ls | targetvirt /vdisks create name=db size=10G pool=p1 | "
        "targetvirt /exports create vdisk=db acl=iqn.1994-05.com.redhat:client",
    )
    parser.add_argument("--state-dir", default=None,
                        help="the daemon's state folder, checked against the daemon's "
                        f"(env TARGETVIRT_STATE_DIR, default {DEFAULT_STATE})")  # fmt: skip
    parser.add_argument("--run-dir", default=os.environ.get("TARGETVIRT_RUN_DIR", DEFAULT_RUN),
                        help="the daemon's runtime folder, where it records the bus it uses "
                        f"when not the system bus (env TARGETVIRT_RUN_DIR, default "
                        f"{DEFAULT_RUN})")  # fmt: skip
    parser.add_argument("--bus-address", default=None,
                        help="D-Bus address of the daemon's bus (env TARGETVIRT_BUS_ADDRESS; "
                        "default: the system bus)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="[PATH] COMMAND [PARAM=VALUE...], e.g. /vdisks create name=db "
                        "size=10G pool=p1; 'help' lists commands")  # fmt: skip
    return parser.parse_args(argv)


def _cmdline(words: list[str]) -> str:
    """The one-shot command line; ``/vdisks/V@S ...`` addresses the snapshot node."""
    if words and words[0].startswith("/vdisks/") and "@" in words[0]:
        words = [words[0].replace("@", "/", 1), *words[1:]]
    return " ".join(words)


def _check_state_dir(client: Any, state_dir: str | None) -> None:
    wanted = state_dir or os.environ.get("TARGETVIRT_STATE_DIR")
    if not wanted:
        return
    have = client.status()["state_dir"]
    if os.path.realpath(have) != os.path.realpath(wanted):
        raise InvalidArgument(
            f"the targetvirt-handler on this bus keeps its state in {have}, not {wanted}"
        )


@contextmanager
def _errors(err: IO[str], code: list[int]) -> Iterator[None]:
    """Every failure becomes one line on ``err`` and a non-zero exit code, never a traceback."""
    try:
        yield
    except TargetvirtError as e:
        err.write(f"{PROG}: {_one_line(str(e))}\n")
        code[0] = 1
    except ExecutionError as e:
        err.write(f"{PROG}: {_one_line(str(e))}\n")
        code[0] = 1
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        code[0] = 130
    except Exception as e:  # noqa: BLE001 - pyparsing and friends: one line, no traceback
        name = type(e).__name__
        text = _one_line(str(e))
        if name.startswith("Parse"):
            err.write(f"{PROG}: cannot parse the command line: {text}\n")
        else:
            err.write(f"{PROG}: internal error: {name}: {text}\n")
        code[0] = 1 if name.startswith("Parse") else 2


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "failed"


def main(
    argv: list[str] | None = None,
    *,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    client_factory: Callable[[str | None], Any] | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_args(argv)
    code = [0]
    with _errors(err, code), ExitStack() as stack:
        if client_factory is None:
            from targetvirt.manage.client import ManagerClient  # noqa: PLC0415

            client_factory = ManagerClient
        client = _connect(client_factory, args)
        stack.callback(getattr(client, "close", lambda: None))
        _check_state_dir(client, args.state_dir)
        interactive = not args.command
        prefs = None
        if interactive:
            prefs = os.environ.get("TARGETVIRT_HOME", os.path.expanduser("~/.targetvirt"))
        shell = TvShell(client, prefs, out, err)
        build_tree(shell)
        if not interactive:
            shell.run_cmdline(_cmdline(args.command))
            return code[0]
        _interactive(shell, out, err)
    return code[0]


def _connect(factory: Callable[[str | None], Any], args: argparse.Namespace) -> Any:
    try:
        return factory(bus_address(args.bus_address, args.run_dir))
    except TargetvirtError:
        endpoint = agent_of(args.run_dir)
        if endpoint is None:
            raise
        # the daemon here serves LUNs only: the catalog is with the controller
        raise NotAvailable(
            f"targetvirt-handler on this host is an agent of the controller at {endpoint}: "
            "manage targetvirt where the controller runs"
        ) from None


def _interactive(shell: Any, out: IO[str], err: IO[str]) -> None:
    out.write(f"targetvirt shell {__version__}: type help for commands, exit to leave.\n")
    shell.tv_interactive = True
    while not shell._exit:
        with _errors(err, [0]):
            shell.run_interactive()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
