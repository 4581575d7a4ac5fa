"""The cluster model test (controller + three agents) with containers on RADOS.

The machine is the one of :mod:`tests.targetvirt.test_cluster_model`; container 0 is in
RADOS, container 1 a file, so the agents open both kinds from the controller's
ContainerInfo, and copy-on-write copies and live migrations cross kinds.  The metadata
store is in RADOS too: what a restarted controller finds there (freezes included) comes
from the RADOS store.  Each example
runs in a RADOS namespace of its own.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.ceph_cluster import CephCluster
from tests.targetvirt.test_cluster_model import CLUSTER_SETTINGS, ClusterMachine

pytestmark = pytest.mark.ceph
# every step reads every served vdisk back through every agent: fewer examples
EXAMPLES = int(os.environ.get("TV_CEPH_CLUSTER_EXAMPLES", "30"))


class RadosClusterMachine(ClusterMachine):
    def __init__(self, cluster: CephCluster) -> None:
        self.location = f"rados:{cluster.pool}/{uuid.uuid4().hex[:12]}?conf={cluster.client_conf}"
        super().__init__()

    def container_location(self, i: int) -> str | None:
        return self.location if i % 2 == 0 else None

    def metadata_location(self) -> str | None:
        return self.location


def test_cluster_model_on_rados(ceph: CephCluster) -> None:
    run_state_machine_as_test(
        lambda: RadosClusterMachine(ceph),  # type: ignore[arg-type]  # any factory will do
        settings=settings(CLUSTER_SETTINGS, max_examples=EXAMPLES),
    )
