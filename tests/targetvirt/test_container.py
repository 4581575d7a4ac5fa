"""File containers (targetvirt/container.py)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from targetvirt.container import FileContainer


def test_a_new_file_container_is_durable_in_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync of a new file does not make its name durable: the folder is synced too, or a
    power cut could leave a store that names a container file that is not there."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "c0.img"
    c = FileContainer.create_at(
        str(path), pool_uuid=str(uuid.uuid4()), cid=0, segment_size=1 << 20, size=4 << 20
    )
    c.close()
    assert synced.index(str(path)) < synced.index(str(tmp_path))  # the file, then its name
