"""The handler's state folder: one SQLite metadata store, ``targetvirt.db``.

``targetvirt-handler`` (in-process controller) and ``targetvirt-controller --store
file:DIR`` open the same layout, so a handler's folder can be served by a separate
controller process (the handler then runs as its agent: ``--controller``).
"""

from __future__ import annotations

import os

from targetvirt.catalog import Catalog
from targetvirt.store.sqlite import SqliteStore

STORE_FILE = "targetvirt.db"


def open_catalog(state_dir: str) -> Catalog:
    """The catalog of ``state_dir`` (made 0700 if absent; the store is created if absent)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    return Catalog.open(SqliteStore(os.path.join(state_dir, STORE_FILE), create=True))
