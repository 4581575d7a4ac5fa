"""The RADOS store: atomicity, one writer (lock, lease, takeover, fencing), damage detection."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import rados

from targetvirt.catalog import Catalog
from targetvirt.ceph import RadosLocation
from targetvirt.check import check
from targetvirt.check import main as check_main
from targetvirt.clock import FakeClock
from targetvirt.errors import StoreCorrupt, StoreError, StoreLocked, TargetvirtError
from targetvirt.store.base import Transaction
from targetvirt.store.rados import RadosStore, active_endpoint, store_owner
from targetvirt.vdisk import Freeze
from tests.ceph_cluster import CephCluster
from tests.targetvirt.engine_model import SEG

pytestmark = pytest.mark.ceph
ROOT = Path(__file__).resolve().parents[3]


def make_store(location: str) -> dict[str, bytes]:
    """A store with a pool on RADOS, a vdisk, a snapshot and a clone; returns the contents."""
    cat = Catalog.open(RadosStore(location, create=True))
    cat.create_pool("p", location, 64 * SEG, segment_size=SEG)
    a = cat.create_vdisk("a", "p", 20 * SEG)
    rng = random.Random(5)
    for _ in range(30):
        a.write(rng.randrange(19 * SEG), rng.randbytes(rng.randrange(1, SEG)))
    cat.snapshot("a", "s")
    cat.clone("a@s", "b").write(0, b"clone data")
    expected = {n: v.read(0, v.size) for n, v in cat.vdisks.items()}
    cat.close()
    return expected


def contents(cat: Catalog) -> dict[str, bytes]:
    return {n: v.read(0, v.size) for n, v in cat.vdisks.items()}


class Admin:
    """Raw access to a store's objects, for inflicting damage."""

    def __init__(self, ceph: CephCluster, location: str) -> None:
        loc = RadosLocation.parse(location)
        self.io = ceph.open_ioctx(loc.pool, loc.namespace)

    def omap(self, obj: str = "targetvirt.root") -> dict[str, bytes]:
        with rados.ReadOpCtx() as op:
            it, _ = self.io.get_omap_vals(op, "", "", 10000)
            self.io.operate_read_op(op, obj)
            return {k: bytes(v or b"") for k, v in it}

    def set_omap(self, key: str, value: bytes, obj: str = "targetvirt.root") -> None:
        with rados.WriteOpCtx() as op:
            self.io.set_omap(op, (key,), (value,))
            self.io.operate_write_op(op, obj)

    def chunks(self) -> list[str]:
        return sorted(o.key for o in self.io.list_objects() if ".chunk." in o.key)


def holder(location: str, *extra: str) -> subprocess.Popen[str]:
    """Another process holding the store as writer; commits a record per line of stdin."""
    code = (
        "import sys\n"
        "from targetvirt.store.rados import RadosStore\n"
        "from targetvirt.store.base import Transaction\n"
        "s = RadosStore(sys.argv[1], lease=int(sys.argv[2]))\n"
        "s.load()\n"
        "print('ready', flush=True)\n"
        "for i, line in enumerate(sys.stdin):\n"
        "    t = Transaction(); t.put('note', i, {'n': i})\n"
        "    try:\n"
        "        s.commit(t); print('committed', flush=True)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, location, *extra],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("commit\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_reopen_reads_back_everything_and_collects_chunks(
    ceph: CephCluster, rados_location: str
) -> None:
    expected = make_store(rados_location)
    cat = Catalog.open(RadosStore(rados_location))
    assert contents(cat) == expected
    assert cat.store.load().generation > 5
    admin = Admin(ceph, rados_location)
    before = len(admin.chunks())
    cat.delete("a", recursive=True)
    cat.delete("b")
    cat.close()
    # a chunk no table references is removed right after the commit that dropped it
    assert len(admin.chunks()) < before
    cat = Catalog.open(RadosStore(rados_location))
    assert not cat.vdisks and len(admin.chunks()) == 0
    cat.close()


def test_second_writer_is_refused_with_the_holder_named(rados_location: str) -> None:
    make_store(rados_location)
    proc = holder(rados_location, "30")
    try:
        with pytest.raises(StoreLocked, match=f"in use by client.[0-9]+ \\(pid {proc.pid} on"):
            RadosStore(rados_location)
        reader = Catalog.open(RadosStore(rados_location, readonly=True))  # readers are fine
        assert set(reader.vdisks) == {"a", "a@s", "b"}
        reader.store.close()
        assert ask(proc) == "committed"
    finally:
        proc.kill()
        proc.wait()
    # the holder died without closing: it is fenced, its lock broken, its place taken
    store = RadosStore(rados_location)
    assert store.load().records["note"] == {0: {"n": 0}}
    store.close()


def test_takeover_fences_a_live_writer(rados_location: str) -> None:
    make_store(rados_location)
    proc = holder(rados_location, "30")
    try:
        store = RadosStore(rados_location, takeover=True)
        store.load()
        t = Transaction()
        t.put("note", 7, {"by": "new"})
        store.commit(t)
        answer = ask(proc)  # the old writer can no longer change anything
        assert answer.startswith("StoreLocked") and "fenced" in answer, answer
        assert store.load().records["note"] == {7: {"by": "new"}}
        store.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_lapsed_lease_lets_another_writer_in_and_fences_the_old_one(
    rados_location: str,
) -> None:
    make_store(rados_location)
    proc = holder(rados_location, "1")
    try:
        proc.send_signal(signal.SIGSTOP)  # hung: no renewal, not dead
        deadline = time.monotonic() + 20
        while True:
            try:
                store = RadosStore(rados_location)
                break
            except StoreLocked:
                assert time.monotonic() < deadline, "the lease never lapsed"
                time.sleep(0.2)
        proc.send_signal(signal.SIGCONT)
        answer = ask(proc)
        assert answer.startswith("StoreLocked"), answer
        t = Transaction()
        t.put("note", 1, {"by": "successor"})
        store.commit(t)
        store.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_superseded_writer_in_this_process_cannot_commit(rados_location: str) -> None:
    make_store(rados_location)
    old = RadosStore(rados_location)
    old.load()
    new = RadosStore(rados_location, takeover=True)  # same process: same client, no fence
    new.load()
    t = Transaction()
    t.put("note", 1, {"x": 1})
    with pytest.raises(StoreLocked, match="was taken over by"):
        old.commit(t)
    new.commit(t)
    old.close()  # must not release what it no longer owns
    with pytest.raises(StoreLocked):
        RadosStore(rados_location)
    new.close()


def test_failed_transaction_changes_nothing(ceph: CephCluster, rados_location: str) -> None:
    expected = make_store(rados_location)
    store = RadosStore(rados_location)
    store.load()
    gen = store.load().generation
    txn = Transaction()
    txn.put("vdisk", 999, {"name": "ghost"})
    txn.ops.append(("bogus",))
    with pytest.raises(AttributeError):
        store.commit(txn)
    # a commit cut between its chunk writes and its root update
    txn = Transaction()
    txn.chunk(998, 0, b"\x01" * 16, b"\0" * 8)
    txn.put("vdisk", 998, {"name": "ghost"})

    def crash(staged: Any) -> None:
        raise RuntimeError("power cut")

    store._commit_root = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        store.commit(txn)
    assert store.load().generation == gen
    assert Admin(ceph, rados_location).omap()["owner"]  # it never closed cleanly
    store._shutdown()  # like a crash: no clean close
    orphan = "targetvirt.chunk." + ("01" * 16)
    assert orphan in Admin(ceph, rados_location).chunks()
    cat = Catalog.open(RadosStore(rados_location, takeover=True))
    assert contents(cat) == expected
    assert orphan not in Admin(ceph, rados_location).chunks()  # collected: unclean open
    cat.close()


def test_readers_see_whole_commits_only(rados_location: str) -> None:
    make_store(rados_location)
    cat = Catalog.open(RadosStore(rados_location))
    stop = threading.Event()
    errors: list[Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                reader = Catalog.open(RadosStore(rados_location, readonly=True))
                names = {n for n in reader.vdisks if n.startswith("c")}
                reader.store.close()
                assert len(names) % 2 == 0, names  # clones come in pairs (one commit)
            except (TargetvirtError, AssertionError) as e:
                errors.append(e)
                return

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(15):
            cat._copy_many([(cat.vdisk("a"), f"c{i}x"), (cat.vdisk("b"), f"c{i}y")], "vdisk")
    finally:
        stop.set()
        t.join()
        cat.close()
    assert not errors, errors[0]


def test_damaged_chunk_object_is_detected(ceph: CephCluster, rados_location: str) -> None:
    make_store(rados_location)
    admin = Admin(ceph, rados_location)
    name = admin.chunks()[0]
    data = bytearray(admin.io.read(name, 1 << 20, 0))
    data[100] ^= 1
    admin.io.write_full(name, bytes(data))
    with pytest.raises(StoreCorrupt, match="fails its checksum"):
        RadosStore(rados_location).load()


def test_missing_chunk_object_is_detected(ceph: CephCluster, rados_location: str) -> None:
    make_store(rados_location)
    admin = Admin(ceph, rados_location)
    admin.io.remove_object(admin.chunks()[0])
    with pytest.raises(StoreCorrupt, match="is missing from the store"):
        RadosStore(rados_location).load()


def test_damaged_record_is_detected(ceph: CephCluster, rados_location: str) -> None:
    make_store(rados_location)
    admin = Admin(ceph, rados_location)
    key, value = next((k, v) for k, v in admin.omap().items() if k.startswith("r/vdisk/"))
    admin.set_omap(key, value.replace(b'"size":', b'"sizf":'))
    with pytest.raises(StoreCorrupt, match="fails its checksum"):
        RadosStore(rados_location).load()


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("t/1", b"\0" * 17, "bad length"),
        ("x/odd", b"", "unknown key"),
        ("format", b"9", "unsupported metadata format"),
        ("r/vdisk/1", b"\0\0", "truncated"),
    ],
)
def test_damaged_structure_is_detected(
    ceph: CephCluster, rados_location: str, key: str, value: bytes, error: str
) -> None:
    make_store(rados_location)
    Admin(ceph, rados_location).set_omap(key, value)
    with pytest.raises(StoreCorrupt, match=error):
        Catalog.open(RadosStore(rados_location))


def test_table_not_matching_its_root_is_detected(ceph: CephCluster, rados_location: str) -> None:
    make_store(rados_location)
    admin = Admin(ceph, rados_location)
    omap = admin.omap()
    tables = sorted(k for k in omap if k.startswith("t/"))
    other = next(k for k in tables if omap[k] != omap[tables[0]])
    admin.set_omap(tables[0], omap[other])  # another table's (valid) chunk list
    with pytest.raises(StoreCorrupt):
        Catalog.open(RadosStore(rados_location))


def test_missing_store_and_missing_container_are_named(
    ceph: CephCluster, rados_location: str
) -> None:
    with pytest.raises(StoreError, match="no metadata store at rados:"):
        RadosStore(rados_location)
    make_store(rados_location)
    admin = Admin(ceph, rados_location)
    label = next(o.key for o in admin.io.list_objects() if o.key.endswith(".label"))
    admin.io.remove_object(label)
    with pytest.raises(TargetvirtError, match="container 0 is missing"):
        Catalog.open(RadosStore(rados_location))


def test_leaked_objects_are_found_and_reclaimed(rados_location: str) -> None:
    make_store(rados_location)
    cat = Catalog.open(RadosStore(rados_location))
    v = cat.vdisk("b")
    v.write(5 * SEG, b"never committed")  # allocated, then "lost" by dropping the catalog
    cat.store._shutdown()  # type: ignore[attr-defined]
    for c in cat.pools["p"].containers.values():
        c.close()
    cat = Catalog.open(RadosStore(rados_location, takeover=True))
    report = check(cat)
    assert not report.damage and report.leaked_segments == 1
    assert check(cat, repair=True).reclaimed_segments == 1
    assert check(cat).clean
    cat.close()


def test_checker_command_on_a_rados_store(
    rados_location: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_store(rados_location)
    assert check_main(["--store", rados_location]) == 0
    assert capsys.readouterr().out.strip().endswith("clean")
    assert check_main(["--store", rados_location, "--store-name", "other"]) == 2
    assert "no metadata store" in capsys.readouterr().err


def test_fencing_covers_every_client_of_the_writer(ceph: CephCluster, rados_location: str) -> None:
    """A writer whose containers use another cephx user is fenced on both of its clients."""
    name = f"data{rados_location.split('/')[1][:8]}"
    keyring = ceph.add_client(name, {"mon": "allow r", "osd": f"allow rwx pool={ceph.pool}"})
    base = rados_location.partition("?")[0]
    data_location = f"{base}?conf={ceph.client_conf}&id={name}&keyring={keyring}"
    code = (
        "import sys\n"
        "from targetvirt.catalog import Catalog\n"
        "from targetvirt.store.rados import RadosStore\n"
        "cat = Catalog.open(RadosStore(sys.argv[1], create=True))\n"
        "cat.create_pool('p', sys.argv[2], 1 << 24, segment_size=1 << 16)\n"
        "v = cat.create_vdisk('v', 'p', 1 << 20)\n"
        "v.write(0, b'before', fua=True)\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        "        v.write(0, b'after!'); print('wrote', flush=True)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, rados_location, data_location],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        owner = json.loads(Admin(ceph, rados_location).omap()["owner"])
        assert len(owner["addrs"]) == 2  # the store's client and the container's
        cat = Catalog.open(RadosStore(rados_location, takeover=True))
        proc.stdin.write("write\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().strip()
        assert answer.startswith("ContainerWriteError") and "blocklisted" in answer, answer
        assert cat.vdisk("v").read(0, 6) == b"before"
        cat.close()
    finally:
        proc.kill()
        proc.wait()


def test_the_writer_publishes_its_endpoint_and_a_successor_replaces_it(
    rados_location: str,
) -> None:
    make_store(rados_location)
    assert active_endpoint(rados_location) is None and store_owner(rados_location) is None
    store = RadosStore(rados_location, endpoint="unix:/run/a.sock")
    assert active_endpoint(rados_location) == "unix:/run/a.sock"
    t = Transaction()
    t.put("note", 1, {"x": 1})
    store.commit(t)  # commits compare the owner record: the endpoint is part of it
    store.publish("ctl-a:7443")
    assert active_endpoint(rados_location) == "ctl-a:7443"
    store.commit(t)
    new = RadosStore(rados_location, takeover=True, endpoint="ctl-b:7443")
    assert active_endpoint(rados_location) == "ctl-b:7443"
    with pytest.raises(StoreLocked):
        store.publish("ctl-a:7444")  # superseded: it cannot point agents back to itself
    assert active_endpoint(rados_location) == "ctl-b:7443"
    new.close()
    store.close()
    assert active_endpoint(rados_location) is None  # closed cleanly: nobody serves
    assert active_endpoint(rados_location, name="other") is None  # no such store


def test_a_writer_knows_until_when_it_surely_holds_the_store(rados_location: str) -> None:
    make_store(rados_location)
    clock = FakeClock()
    store = RadosStore(rados_location, lease=6, clock=clock)
    try:
        # counted from when the lock was *requested*: the OSD's lease ends later
        assert store.lease_until == 1006.0 and store.holds_lease
        store._stop_renewing()  # as if its renewals hung (a stopped process, a partition)
        clock.advance(5.9)
        assert store.holds_lease
        clock.advance(0.2)
        assert not store.holds_lease  # a controller on it refuses agents from now on
    finally:
        store.close()
    reader = RadosStore(rados_location, readonly=True)
    assert not reader.holds_lease
    reader.close()


def test_a_freeze_is_stored_with_its_vdisk_and_damage_to_it_is_named(
    rados_location: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_store(rados_location)
    cat = Catalog.open(RadosStore(rados_location))
    cat.set_freezes({"a": Freeze("nowrite", 2e9), "b": Freeze("invalid")})
    cat.set_freezes({"a": None})
    cat.close()
    cat = Catalog.open(RadosStore(rados_location))
    try:
        assert {n: v.freeze for n, v in cat.vdisks.items()} == {
            "a": None, "a@s": None, "b": Freeze("invalid"),
        }  # fmt: skip
        # a writer's bug, not a flipped bit: the checksum is valid, the freeze is not
        vid = cat.vdisk("b").vid
        txn = Transaction()
        body = cat.store.load().records["vdisk"][vid]
        txn.put("vdisk", vid, {**body, "freeze": {"mode": "nowrite"}})
        cat.store.commit(txn)
    finally:
        cat.store.close()
    with pytest.raises(StoreCorrupt, match="the freeze of vdisk b is damaged"):
        Catalog.open(RadosStore(rados_location))
    assert check_main(["--store", rados_location]) == 2
    assert "DAMAGE: the freeze of vdisk b is damaged" in capsys.readouterr().err
