"""What the daemon and its clients share, kept light: the shell imports only this, the
client and the value parsers (no numpy, no GLib), so that it starts fast."""

from __future__ import annotations

import os
from pathlib import Path

from targetvirt.errors import TargetvirtError

SERVICE = "org.targetvirt.Manager1"
PATH = "/org/targetvirt/Manager1"
IFACE = "org.targetvirt.Manager1"
ERROR_PREFIX = "org.targetvirt.Error."
BUS_ENV = "TARGETVIRT_BUS_ADDRESS"
BUS_FILE = "bus-address"  # in the run folder: the bus a daemon not on the system bus uses
AGENT_FILE = "agent-of"  # in the run folder: the controller an agent-only daemon serves


class NotAvailable(TargetvirtError):
    """The operation needs something this daemon does not have (the controller, LIO)."""


def bus_address(explicit: str | None, run_dir: str | Path | None) -> str | None:
    """The bus to use: ``explicit`` (option or $TARGETVIRT_BUS_ADDRESS), else the one a
    daemon recorded in ``<run-dir>/bus-address``, else None (the system bus)."""
    if explicit:
        return explicit
    env = os.environ.get(BUS_ENV)
    if env:
        return env
    if run_dir is not None:
        try:
            text = (Path(run_dir) / BUS_FILE).read_text().strip()
        except OSError:
            return None
        return text or None
    return None


def agent_of(run_dir: str | Path | None) -> str | None:
    """The controller endpoint an agent-only daemon recorded in ``<run-dir>/agent-of``
    (None: no such daemon here)."""
    if run_dir is None:
        return None
    try:
        return (Path(run_dir) / AGENT_FILE).read_text().strip() or None
    except OSError:
        return None
