"""Pools on Ceph from the shell (issue 7): ``/pools create name=P rados=CEPHPOOL [conf=FILE]
[id=CLIENT]`` and ``/pools/P add rados=...``, against the test cluster, through the D-Bus
API and a real catalog; and the one-line errors the cluster itself causes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from targetvirt.ceph import RadosLocation
from targetvirt.manage.manager import Manager
from tests.ceph_cluster import CephCluster
from tests.targetvirt.manage.conftest import MIB, Shell, open_manager
from tests.targetvirt.manage.fakes import FakeLio

pytestmark = pytest.mark.ceph


def ok(tv: Shell, *argv: str) -> str:
    r = tv(*argv)
    assert (r.rc, r.err) == (0, ""), (argv, r)
    return r.out


def objects(ceph: CephCluster, namespace: str) -> set[str]:
    return {o.key for o in ceph.open_ioctx(ceph.pool, namespace).list_objects()}


def test_pools_on_rados_from_the_shell(
    tv: Shell, manager: Manager, ceph: CephCluster, tmp_path: Path, state: Path, lio: FakeLio
) -> None:
    ns, ns2 = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    conf = ceph.client_conf
    where = f"rados:{ceph.pool}/{ns}?conf={conf}"
    assert ok(tv, "/pools", "create", "name=P", f"rados={ceph.pool}/{ns}", f"conf={conf}",
              "size=16M") == f"Created pool P: 16MiB in {where} (1MiB segments)\n"  # fmt: skip
    # a cephx user of its own, allowed into one namespace only
    user = f"tv{ns2}"
    keyring = ceph.add_client(
        user, {"mon": "allow r", "osd": f"allow rwx pool={ceph.pool} namespace={ns2}"}
    )
    where2 = f"rados:{ceph.pool}/{ns2}?conf={conf}&id={user}&keyring={keyring}"
    assert ok(tv, "/pools/P", "add", f"rados={ceph.pool}/{ns2}", f"conf={conf}", f"id={user}",
              f"keyring={keyring}", "size=8M") == (
        f"Added container 1 to pool P: 8MiB in {where2}\n")  # fmt: skip
    ok(tv, "/pools/P", "add", f"path={tmp_path / 'c2.img'}", "size=9M")
    tree = ok(tv, "ls", "/pools/P")
    assert "[32MiB, 0% used, 3 containers, 1MiB segments]" in tree
    assert "o- 0 " in tree and "o- 1 " in tree and "[rados rados:" in tree
    assert f"kind: rados\npath: {where2}\n" in ok(tv, "/pools/P/1", "info")
    info = manager.info("pool", "P")
    assert [(c["kind"], c["path"]) for c in info["containers"]] == [
        ("rados", where), ("rados", where2), ("file", str(tmp_path / "c2.img"))]  # fmt: skip
    assert str(RadosLocation.parse(where2)) == where2  # what the store records reopens as given

    ok(tv, "/vdisks", "create", "name=V", "size=12M", "pool=P")
    data = bytes(range(256)) * (12 * MIB // 256)
    manager.catalog.vdisk("V").write(0, data)
    manager.catalog.commit()
    segments = {n for n in objects(ceph, ns) if not n.endswith(".label")}
    assert len(segments) == 10  # the emptiest container gets each new segment (16, 8, 8 free)
    assert ok(tv, "/vdisks/V", "snapshot", "name=S") == "Created snapshot V@S\n"
    out = ok(tv, "/pools/P", "evacuate", "container=0")
    assert out.startswith("Evacuated container 0 of pool P: 10 segments moved")
    assert ok(tv, "/pools/P", "remove", "container=0") == "Removed container 0 from pool P\n"
    assert not {n for n in objects(ceph, ns) if not n.endswith(".label")}  # space given back
    assert ok(tv, "check") == "checked 2 vdisks, 24 mapped entries\nclean\n"

    # the daemon restarts: every container reopens from the location the store recorded
    manager.catalog.close()
    again = open_manager(state, lio)
    manager.catalog = again.catalog  # the fixture closes it
    try:
        assert again.catalog.vdisk("V").read(0, len(data)) == data
        assert again.catalog.vdisk("V@S").read(0, len(data)) == data
        assert [c["kind"] for c in again.info("pool", "P")["containers"]] == ["rados", "file"]
        job = again.delete_vdisk("V", recursive=True)
        again.jobs.wait(job.id, 30)
        assert job.state == "done", job.error
        assert again.delete_pool("P")["message"] == (
            "Deleted pool P (its container files and RADOS objects are left in place)"
        )
    finally:
        again.stop()


def test_errors_the_cluster_gives_are_one_line(
    tv: Shell, manager: Manager, ceph: CephCluster
) -> None:
    conf = ceph.client_conf
    ns = uuid.uuid4().hex[:12]
    r = tv("/pools", "create", "name=P", "rados=nopool", f"conf={conf}", "size=8M")
    assert (r.rc, r.out, r.err) == (1, "", "targetvirt: Ceph pool nopool does not exist\n")
    r = tv("/pools", "create", "name=P", f"rados={ceph.pool}/{ns}", f"conf={conf}",
           "id=nobody", "size=8M")  # fmt: skip
    assert (r.rc, r.out) == (1, "")
    assert r.err == (
        f"targetvirt: cannot connect to Ceph as client.nobody "
        f"(rados:{ceph.pool}/{ns}?conf={conf}&id=nobody): Permission denied\n"
    )
    user = f"ro{ns}"
    keyring = ceph.add_client(user, {"mon": "allow r", "osd": f"allow r pool={ceph.pool}"})
    r = tv("/pools", "create", "name=P", f"rados={ceph.pool}/{ns}", f"conf={conf}",
           f"id={user}", f"keyring={keyring}", "size=8M")  # fmt: skip
    assert (r.rc, r.out) == (1, "")
    assert r.err == (f"targetvirt: cannot label a container in rados:{ceph.pool}/{ns}?conf={conf}"
                     f"&id={user}&keyring={keyring}: Operation not permitted\n")  # fmt: skip
    assert not manager.catalog.pools
