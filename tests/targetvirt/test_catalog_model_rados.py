"""The engine model test on Ceph: RADOS metadata store, RADOS containers mixed with files.

The machine is the one of :mod:`tests.targetvirt.test_catalog_model`; only where the
metadata and the containers live changes.  Containers alternate between RADOS (the
first, the third...) and preallocated-or-not files, so copy-on-write copies, migrations
and evacuations cross kinds.  Each example runs in a namespace of its own.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from targetvirt.catalog import Catalog
from targetvirt.store.rados import RadosStore
from tests.ceph_cluster import CephCluster
from tests.targetvirt.engine_model import SEG
from tests.targetvirt.test_catalog_model import CONTAINER_SEGMENTS, MODEL_SETTINGS, EngineMachine

pytestmark = pytest.mark.ceph
# each step reads every vdisk back (one RADOS read per mapped segment): fewer examples
EXAMPLES = int(os.environ.get("TV_CEPH_MODEL_EXAMPLES", "30"))


class RadosEngineMachine(EngineMachine):
    def __init__(self, cluster: CephCluster) -> None:
        self.location = f"rados:{cluster.pool}/{uuid.uuid4().hex[:12]}?conf={cluster.client_conf}"
        self.containers = 0
        super().__init__()

    def open_catalog(self) -> Catalog:
        return Catalog.open(RadosStore(self.location, create=True))

    def new_container(self) -> tuple[str, int]:
        self.containers += 1
        if self.containers % 2:
            return self.location, CONTAINER_SEGMENTS * SEG
        return super().new_container()


def test_engine_model_on_rados(ceph: CephCluster) -> None:
    run_state_machine_as_test(
        lambda: RadosEngineMachine(ceph),  # type: ignore[arg-type]  # any factory will do
        settings=settings(MODEL_SETTINGS, max_examples=EXAMPLES),
    )
