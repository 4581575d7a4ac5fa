"""Fixtures shared by every test folder: the single-node Ceph cluster (marker ``ceph``)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ceph_cluster import CephCluster


def _need_ceph() -> None:
    missing = [b for b in ("ceph-mon", "ceph-osd", "monmaptool") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (run tools/setup-host)")


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """One memstore cluster for the whole session (tests isolate by namespace)."""
    _need_ceph()
    from tests.ceph_cluster import CephCluster  # noqa: PLC0415 - python3-rados: only if used

    cluster = CephCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rados_location(ceph: CephCluster) -> str:
    """A RADOS location in a namespace of its own (nothing else of the session sees it)."""
    return f"rados:{ceph.pool}/{uuid.uuid4().hex[:12]}?conf={ceph.client_conf}"


@pytest.fixture(scope="module")
def ceph_bluestore() -> Iterator[CephCluster]:
    """A bluestore cluster (keeps its data when its OSD is killed), per test module."""
    _need_ceph()
    from tests.ceph_cluster import CephCluster  # noqa: PLC0415

    cluster = CephCluster(objectstore="bluestore").start()
    try:
        yield cluster
    finally:
        cluster.stop()
