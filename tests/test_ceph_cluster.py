"""The test cluster helper itself: a daemon that dies says why in the error."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import _need_ceph


@pytest.mark.ceph
def test_a_dead_osd_is_reported_with_its_last_words() -> None:
    _need_ceph()
    from tests.ceph_cluster import CephCluster, CephError  # noqa: PLC0415 - python3-rados

    cluster = CephCluster().start()
    try:
        assert cluster.osd is not None
        os.kill(cluster.osd.pid, signal.SIGABRT)  # what a failed ceph_assert ends in
        deadline = time.monotonic() + 60
        while cluster.osd.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(CephError) as err:
            cluster._check_alive()
        # the folder (and its logs) goes when the cluster stops: the message keeps them
        assert "ceph-osd exited with -6" in str(err.value)
        assert "Aborted" in str(err.value) or "Caught signal" in str(err.value)
    finally:
        cluster.stop()
