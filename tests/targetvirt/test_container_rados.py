"""The RADOS container kind, against the test cluster: objects, zeros, copies, labels, cephx."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from targetvirt import container_rados
from targetvirt.catalog import Catalog
from targetvirt.ceph import RadosLocation
from targetvirt.check import check
from targetvirt.container import DATA_OFFSET, Container, ContainerLabel, FileContainer, kind_for
from targetvirt.container_rados import RadosContainer
from targetvirt.errors import (
    ContainerIOError,
    InvalidArgument,
    NotFound,
    StoreCorrupt,
    StoreError,
)
from targetvirt.store.rados import RadosStore
from tests.ceph_cluster import CephCluster
from tests.targetvirt.engine_model import SEG

pytestmark = pytest.mark.ceph

POOL_UUID = str(uuid.uuid4())


def new_container(location: str, nseg: int = 8, cid: int = 0) -> RadosContainer:
    c = Container.create(location, pool_uuid=POOL_UUID, cid=cid, segment_size=SEG, size=nseg * SEG)
    assert isinstance(c, RadosContainer)
    return c


def objects(ceph: CephCluster, location: str) -> set[str]:
    loc = RadosLocation.parse(location)
    return {o.key for o in ceph.open_ioctx(loc.pool, loc.namespace).list_objects()}


def test_location_parsing_round_trips() -> None:
    loc = RadosLocation.parse("rados:pool/ns?conf=/etc/ceph/x.conf&id=tv&keyring=/k/r")
    assert (loc.pool, loc.namespace, loc.conf, loc.client_id, loc.keyring) == (
        "pool", "ns", "/etc/ceph/x.conf", "tv", "/k/r",
    )  # fmt: skip
    assert RadosLocation.parse(str(loc)) == loc
    assert str(RadosLocation.parse("rados:p")) == "rados:p"
    for bad in ("rados:", "rados:p?color=red", "rados:p?id=client.x", "rados:p?id=a&id=b"):
        with pytest.raises(InvalidArgument):
            RadosLocation.parse(bad)
    assert kind_for("rados:p") is RadosContainer
    assert kind_for("/var/lib/x") is FileContainer


def test_segments_are_objects_absent_until_written(ceph: CephCluster, rados_location: str) -> None:
    c = new_container(rados_location)
    try:
        assert c.fd == -1 and c.kind == "rados" and c.nsegments == 8
        assert objects(ceph, rados_location) == {f"tvc.{c.uuid}.label"}
        buf = bytearray(100)
        c.readv([buf], c.offset_of(3) + 10)
        assert buf == bytes(100)  # absent object: zeros
        c.writev([b"abc", memoryview(b"defg")], c.offset_of(3) + 10)
        assert c.holds_data(3) and not c.holds_data(2)
        first, second = bytearray(12), bytearray(5)
        c.readv([first, second], c.offset_of(3) + 8)
        assert bytes(first) == b"\0\0abcdefg\0\0\0" and second == bytes(5)  # past the end: zeros
        assert c.segments_holding_data(range(8)) == [3]
    finally:
        c.close()


def started(c: RadosContainer, bufs: list[Any], offset: int, write: bool) -> bool:
    """start_io, waited for: True when it started and called back ok."""
    oks: list[bool] = []
    ended = threading.Event()

    def done(ok: bool) -> None:
        oks.append(ok)
        ended.set()

    if not c.start_io([memoryview(b) for b in bufs], offset, write, done):
        return False
    assert ended.wait(30.0), "no callback from librados"
    assert oks == [True]
    return True


def test_started_io_does_what_readv_and_writev_do(rados_location: str) -> None:
    """The asynchronous path: zeros for an absent object and past a short one's end,
    several buffers, a whole segment by write_full; it starts nothing outside one
    segment, nor on an object whose removal is still in flight."""
    c = new_container(rados_location)
    try:
        junk = bytearray(b"?" * 100)
        assert started(c, [junk], c.offset_of(3) + 10, False)
        assert junk == bytes(100)  # absent object: zeros
        assert started(c, [b"abc", b"defg"], c.offset_of(3) + 10, True)
        first, second = bytearray(b"?" * 12), bytearray(b"?" * 5)
        assert started(c, [first, second], c.offset_of(3) + 8, False)
        assert bytes(first) == b"\0\0abcdefg\0\0\0" and second == bytes(5)  # short object
        whole = os.urandom(SEG)
        assert started(c, [whole], c.offset_of(5), True)
        back = bytearray(SEG)
        c.readv([back], c.offset_of(5))
        assert back == whole
        out = bytearray(4096)
        assert started(c, [out], c.offset_of(5) + 4096, False)
        assert out == whole[4096:8192]
        buf = bytearray(1024)
        assert not started(c, [buf], c.offset_of(5) + SEG - 512, False)  # two segments
        assert not started(c, [buf], c.offset_of(8), False)  # past the last one
        c._pending[c.name_of(5)] = object()  # a removal in flight: the caller would wait
        assert not started(c, [buf], c.offset_of(5), False)
        del c._pending[c.name_of(5)]
    finally:
        c.close()


class FakeCompletion:
    def __init__(self, ret: int) -> None:
        self.ret = ret

    def get_return_value(self) -> int:
        return self.ret


def test_started_io_callbacks_report_failures_and_fill_only_what_was_read() -> None:
    """librados's answers as python3-rados hands them over: an error is not ok (the
    caller's slow path names it); a read of nothing hands over the whole uninitialised
    buffer, which must not reach the caller's."""
    oks: list[bool] = []
    wrote = container_rados._wrote(oks.append)
    wrote(FakeCompletion(0))
    wrote(FakeCompletion(-errno.EIO))
    assert oks == [True, False]
    oks.clear()
    buf = bytearray(b"?" * 8)
    read = container_rados._read_into([memoryview(buf)], oks.append)
    read(FakeCompletion(0), b"garbage!")
    assert (oks, buf) == ([True], bytearray(8))
    read(FakeCompletion(-errno.ENOENT), None)
    read(FakeCompletion(3), b"abc")
    assert (oks, buf) == ([True, True, True], bytearray(b"abc\0\0\0\0\0"))
    read(FakeCompletion(-errno.EIO), None)
    assert oks[-1] is False and buf == bytearray(b"abc\0\0\0\0\0")  # untouched


def test_ranges_across_segments_and_zeroing(rados_location: str) -> None:
    c = new_container(rados_location)
    try:
        data = bytes(range(256)) * (3 * SEG // 256)
        start = c.offset_of(1) + SEG // 2
        c.writev([data], start)  # 3 objects, written in parallel
        out = bytearray(len(data))
        c.readv([out], start)
        assert out == data
        c.zero(c.offset_of(2), SEG)  # a whole segment: its object goes
        assert not c.holds_data(2)
        c.zero(c.offset_of(1) + SEG - 100, 100)  # a tail: truncated
        c.zero(c.offset_of(3) + 10, 20)  # the middle: written zeros
        expect = bytearray(data)
        rel = c.offset_of(1) - start
        expect[rel + SEG - 100 : rel + 2 * SEG] = bytes(SEG + 100)
        expect[rel + 2 * SEG + 10 : rel + 2 * SEG + 30] = bytes(20)
        c.readv([out], start)
        assert out == expect
        with pytest.raises(ContainerIOError, match="outside its segments"):
            c.readv([bytearray(10)], c.offset_of(8) - 5)
        with pytest.raises(ContainerIOError, match="outside its segments"):
            c.readv([bytearray(10)], DATA_OFFSET - 10)
    finally:
        c.close()


def test_discard_is_asynchronous_and_ordered(rados_location: str) -> None:
    c = new_container(rados_location)
    try:
        for p in range(8):
            c.writev([b"x" * SEG], c.offset_of(p))
        for p in range(8):
            c.discard(p)  # all in flight
        c.writev([b"after"], c.offset_of(5))  # waits for the removal of its object
        c.sync()
        assert c.segments_holding_data(range(8)) == [5]
        buf = bytearray(6)
        c.readv([buf], c.offset_of(5))
        assert buf == b"after\0"
    finally:
        c.close()


def test_copies_within_and_across_kinds(tmp_path: Path, rados_location: str) -> None:
    a = new_container(rados_location)
    b = new_container(rados_location, cid=1)
    f = Container.create(
        str(tmp_path / "f"), pool_uuid=POOL_UUID, cid=2, segment_size=SEG,
        size=DATA_OFFSET + 8 * SEG,
    )  # fmt: skip
    try:
        a.writev([b"A" * 1000], a.offset_of(0) + 500)
        a.copy_segment_to(0, b, 4)  # RADOS to RADOS: read + write_full
        b.writev([b"stale"], b.offset_of(5))
        a.copy_segment_to(1, b, 5)  # absent source: the destination goes too
        assert not b.holds_data(5)
        b.copy_segment_to(4, f, 3)  # RADOS to file
        f.copy_segment_to(3, a, 7)  # file to RADOS
        for c, p in ((b, 4), (f, 3), (a, 7)):
            buf = bytearray(SEG)
            c.readv([buf], c.offset_of(p))
            assert buf == bytes(500) + b"A" * 1000 + bytes(SEG - 1500), (c, p)
    finally:
        for c in (a, b, f):
            c.close()


def test_label_is_checked_on_open(ceph: CephCluster, rados_location: str) -> None:
    c = new_container(rados_location)
    label = c.label
    c.close()
    reopened = Container.open(rados_location, label, False)
    assert isinstance(reopened, RadosContainer) and reopened.label == label
    reopened.close()
    other = ContainerLabel("rados", POOL_UUID, str(uuid.uuid4()), 0, SEG, 8)
    with pytest.raises(NotFound, match="container 0 is missing"):
        Container.open(rados_location, other, False)
    wrong_pool = ContainerLabel("rados", str(uuid.uuid4()), label.uuid, 0, SEG, 8)
    with pytest.raises(StoreCorrupt, match="not container"):
        Container.open(rados_location, wrong_pool, False)
    loc = RadosLocation.parse(rados_location)
    ioctx = ceph.open_ioctx(loc.pool, loc.namespace)
    raw = bytearray(ioctx.read(f"tvc.{label.uuid}.label", 4096, 0))
    raw[40] ^= 1
    ioctx.write_full(f"tvc.{label.uuid}.label", bytes(raw))
    with pytest.raises(StoreCorrupt, match="checksum"):
        Container.open(rados_location, label, False)


def test_missing_pool_and_bad_size_are_named(ceph: CephCluster) -> None:
    with pytest.raises(ContainerIOError, match="Ceph pool nosuchpool does not exist"):
        Container.create(
            f"rados:nosuchpool?conf={ceph.client_conf}", pool_uuid=POOL_UUID, cid=0,
            segment_size=SEG, size=SEG,
        )  # fmt: skip
    with pytest.raises(InvalidArgument, match="give a size"):
        Container.create(
            f"rados:{ceph.pool}?conf={ceph.client_conf}", pool_uuid=POOL_UUID, cid=0,
            segment_size=SEG, size=None,
        )  # fmt: skip


def test_cephx_user_with_its_own_keyring(ceph: CephCluster) -> None:
    """A restricted client named by id= and keyring= runs a whole catalog on RADOS."""
    ns = uuid.uuid4().hex[:12]
    keyring = ceph.add_client(
        f"tv{ns}",
        {"mon": 'allow r, allow command "osd blocklist"', "osd": f"allow rwx pool={ceph.pool}"},
    )
    mon_host = Path(ceph.client_conf).read_text().split("mon host = ")[1].split()[0]
    location = f"rados:{ceph.pool}/{ns}?id=tv{ns}&keyring={keyring}&mon_host={mon_host}"
    catalog = Catalog.open(RadosStore(location, create=True))
    try:
        catalog.create_pool("p", location, 16 * SEG, segment_size=SEG)
        v = catalog.create_vdisk("v", "p", 4 * SEG)
        v.write(SEG - 3, b"cephx!")
        catalog.commit()
        assert v.read(SEG - 3, 6) == b"cephx!"
        assert check(catalog).clean
    finally:
        catalog.close()
    catalog = Catalog.open(RadosStore(location))
    assert catalog.vdisk("v").read(SEG - 3, 6) == b"cephx!"
    catalog.close()
    bad = Path(keyring).with_suffix(".bad")
    bad.write_text(Path(keyring).read_text().replace("key = ", "key = AQ"))
    with pytest.raises(StoreError, match=r"cannot connect to Ceph as client\.tv"):
        RadosStore(location.replace(keyring, str(bad)))
    with pytest.raises(StoreError, match="cannot connect"):
        RadosStore(location.replace(f"id=tv{ns}", "id=nobody"))


def test_vdisk_on_rados_falls_back_from_the_fd_fast_path(rados_location: str) -> None:
    catalog = Catalog.open(RadosStore(rados_location, create=True))
    try:
        catalog.create_pool("p", rados_location, 8 * SEG, segment_size=SEG)
        v = catalog.create_vdisk("v", "p", 4 * SEG)
        v.write(100, b"fast?")  # the fault path allocates; then the fast path is tried
        v.write(200, b"slow!")  # allocated: os.pwritev(-1) fails, container.writev runs
        buf: Any = bytearray(5)
        v.readinto(200, [buf])
        assert buf == b"slow!" and v.read(100, 5) == b"fast?"
    finally:
        catalog.close()
