"""Fixtures shared by every test folder: the single-node Ceph cluster (marker ``ceph``)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
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


Layout = Callable[[int], str | None]


@pytest.fixture(
    params=["file", pytest.param("rados", marks=pytest.mark.ceph),
            pytest.param("mixed", marks=pytest.mark.ceph)],
)  # fmt: skip
def layout(request: pytest.FixtureRequest) -> Layout:
    """Where container ``i`` of a test pool lives: None (a file) or a RADOS location.

    ``file``: every container a file; ``rados``: every one in RADOS; ``mixed``: the
    even ones in RADOS, the odd ones files (copies and migrations cross kinds).
    A test that takes this fixture runs once per layout (the RADOS ones marked ``ceph``).
    """
    if request.param == "file":
        return lambda i: None
    location: str = request.getfixturevalue("rados_location")
    if request.param == "rados":
        return lambda i: location
    return lambda i: location if i % 2 == 0 else None
