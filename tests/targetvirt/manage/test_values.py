"""Parsing of what admins type: exact refusals."""

from __future__ import annotations

import pytest

from targetvirt.errors import InvalidArgument
from targetvirt.manage import values as v


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("10G", 10 << 30), ("512m", 512 << 20), ("1.5T", 3 << 39), ("64K", 65536),
     ("2GiB", 2 << 30), ("1 G", 1 << 30), ("3gb", 3 << 30)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert v.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "size 'abc' is not a size: use a number of bytes with an optional K, M, G or T "
                "suffix (e.g. 10G)"),
        ("-5G", "size '-5G' is not a size: use a number of bytes with an optional K, M, G or T "
                "suffix (e.g. 10G)"),
        ("0", "size must be positive, got '0'"),
        ("0.5", "size '0.5' is not a whole number of bytes"),
        ("10X", "size '10X' is not a size: use a number of bytes with an optional K, M, G or T "
                "suffix (e.g. 10G)"),
    ],
)  # fmt: skip
def test_bad_sizes(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        v.parse_size(text)
    assert str(e.value) == message


def test_format_size() -> None:
    assert [v.format_size(n) for n in (0, 512, 1 << 20, 1536 << 20, 10 << 40)] == [
        "0B", "512B", "1MiB", "1.5GiB", "10TiB"]  # fmt: skip


def test_durations() -> None:
    assert v.parse_duration("30") == 30.0
    assert v.parse_duration("250ms") == 0.25
    assert v.parse_duration("5m") == 300.0
    assert v.parse_duration("1.5h") == 5400.0
    with pytest.raises(InvalidArgument, match=r"^timeout must be positive, got '0'$"):
        v.parse_duration("0")
    with pytest.raises(InvalidArgument, match=r"^timeout 'soon' is not a duration"):
        v.parse_duration("soon")


def test_bools_ints_lists() -> None:
    assert v.parse_bool("Yes", "demo") is True and v.parse_bool("off", "demo") is False
    with pytest.raises(
        InvalidArgument, match=r"^demo='maybe' is not a boolean: use true or false$"
    ):
        v.parse_bool("maybe", "demo")
    assert v.parse_int("7", "lun", high=255) == 7
    with pytest.raises(InvalidArgument, match=r"^lun must be from 0 to 255, got 300$"):
        v.parse_int("300", "lun", high=255)
    with pytest.raises(InvalidArgument, match=r"^lun must be a whole number, got 'x'$"):
        v.parse_int("x", "lun")
    assert v.parse_list("a, b,c", "vdisks") == ["a", "b", "c"]
    with pytest.raises(InvalidArgument, match=r"^vdisks 'a,,b' has an empty item: use A,B,C$"):
        v.parse_list("a,,b", "vdisks")
    with pytest.raises(InvalidArgument, match=r"^vdisks names 'a' twice$"):
        v.parse_list("a,b,a", "vdisks")


@pytest.mark.parametrize(
    "name",
    ["iqn.2003-01.org.linux-iscsi.host:sn.1234", "IQN.2020-12.com.Example:Disk_1",
     "eui.0123456789abcdef", "naa.6001405a2b3c4d5e", "iqn.1994-05.com.redhat"],
)  # fmt: skip
def test_good_iscsi_names(name: str) -> None:
    assert v.check_iscsi_name(name) == name.lower()


@pytest.mark.parametrize(
    "name", ["iqn.2020-13.org.x:a", "iqn.20-01.org.x", "disk1", "iqn.2020-01.-bad:x", "eui.12"]
)
def test_bad_iscsi_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        v.check_iscsi_name(name, "iqn")
    assert str(e.value).startswith(f"iqn {name!r} is not an iSCSI name: use iqn.YYYY-MM.")


@pytest.mark.parametrize(
    ("text", "portal"),
    [("0.0.0.0", "0.0.0.0:3260"), ("10.0.0.1:3261", "10.0.0.1:3261"), ("[::]:3260", "[::]:3260"),
     ("::1", "[::1]:3260"), ("[fe80::1]", "[fe80::1]:3260")],
)  # fmt: skip
def test_portals(text: str, portal: str) -> None:
    assert v.normalize_portal(text) == portal


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host:3260", "portal 'host:3260' does not start with an IP address: use ADDR:PORT "
                      "(e.g. 0.0.0.0:3260 or [::]:3260)"),
        ("10.0.0.1:0", "portal '10.0.0.1:0' port must be from 1 to 65535, got 0"),
        ("10.0.0.1:x", "portal '10.0.0.1:x' port must be a whole number, got 'x'"),
        ("[::1:3260", "portal '[::1:3260' is malformed: use [IPV6]:PORT"),
    ],
)  # fmt: skip
def test_bad_portals(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        v.parse_portal(text)
    assert str(e.value) == message


def test_percentages() -> None:
    assert [v.parse_percent(t, "threshold") for t in ("80", "80%", " 1 ", "100 %")] == [
        80, 80, 1, 100,
    ]  # fmt: skip
    bad = "is not a percentage: use a whole number from 1 to 100 (e.g. 80)"
    for text, message in [("", f"threshold '' {bad}"), ("8.5", f"threshold '8.5' {bad}"),
                          ("-3", f"threshold '-3' {bad}"), ("%", f"threshold '%' {bad}"),
                          ("0", "threshold must be from 1 to 100, got 0"),
                          ("101%", "threshold must be from 1 to 100, got 101")]:  # fmt: skip
        with pytest.raises(InvalidArgument) as e:
            v.parse_percent(text, "threshold")
        assert str(e.value) == message
