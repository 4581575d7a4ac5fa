"""Parsing of what admins type: exact refusals, and arbitrary text (fuzz targets, scaled
by TV_FUZZ_SCALE): a value or a one-line InvalidArgument, nothing else."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.errors import InvalidArgument
from targetvirt.manage import values as v
from tests.fuzzing import fuzz_settings, one_line


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # found by the fuzzer: tracebacks (KeyError, OverflowError, ValueError), or accepted
        ("1\u212a", "size '1\u212a' is not a size"),  # KELVIN SIGN matched K, ignoring case
        ("9" * 400 + ".0", "is larger than 8EiB"),
        ("9" * 5000, "is larger than 8EiB"),
        ("\u0661\u0662G", "is not a size"),  # digits of another script
    ],
)
def test_sizes_the_fuzzer_found(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        v.parse_size(text)


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


def test_durations_that_were_accepted_or_tracebacks() -> None:
    """Found by the fuzzer: 300 digits made an infinite timeout; LONG S matched s."""
    with pytest.raises(InvalidArgument, match="is longer than 31536000 seconds"):
        v.parse_duration("2" + "0" * 309)
    with pytest.raises(InvalidArgument, match="is not a duration"):
        v.parse_duration("5\u017f")


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
    "name",
    ["iqn.2020-13.org.x:a", "iqn.20-01.org.x", "disk1", "iqn.2020-01.-bad:x", "eui.12",
     "iqn.200\u0660-01.org.x"],  # a digit of another script passed as \\d (the fuzzer)
)  # fmt: skip
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
        ("[fe80::1% ]:3260", "portal '[fe80::1% ]:3260' has the IPv6 zone ' ': use an "
                             "interface name"),
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


# --- fuzz: arbitrary text gives a value or a one-line InvalidArgument ----------------------

admin_text = st.one_of(
    st.text(),
    st.text("0123456789.:[]-_, eEkKmMgGtTpPiIbBsShHnNoOyYaAfFlLuUrRqQ\t\n\u212a\u017f\u0661",
            max_size=40),
    st.builds(lambda n, u: f"{n}{u}", st.integers(-10, 10**30) | st.floats(allow_nan=True),
              st.sampled_from(["", "K", "M", "G", "T", "P", "E", "ms", "s", "m", "h", "GiB"])),
    st.integers(1, 6000).map(lambda n: "9" * n),
)  # fmt: skip


def value_or_error(parse: Callable[[str], object], text: str) -> object:
    try:
        return parse(text)
    except InvalidArgument as e:
        assert one_line(str(e)), str(e)
        return None


@fuzz_settings(1000)
@given(admin_text)
def test_arbitrary_sizes_and_durations(text: str) -> None:
    size = value_or_error(v.parse_size, text)
    assert size is None or (type(size) is int and 0 < size <= v.MAX_SIZE)
    seconds = value_or_error(v.parse_duration, text)
    assert seconds is None or (isinstance(seconds, float) and 0 < seconds < math.inf)


@fuzz_settings(1000)
@given(admin_text)
def test_arbitrary_bools_ints_and_lists(text: str) -> None:
    assert value_or_error(lambda s: v.parse_bool(s, "demo"), text) in (None, True, False)
    n = value_or_error(lambda s: v.parse_int(s, "lun", high=255), text)
    assert n is None or (type(n) is int and 0 <= n <= 255)
    items = value_or_error(lambda s: v.parse_list(s, "vdisks"), text)
    assert items is None or (isinstance(items, list) and all(items))


iscsi_text = st.one_of(
    st.text(),
    st.builds(
        lambda y, m, d, rest: f"iqn.{y}-{m}.{d}{rest}",
        st.text("0123456789\u0661\u0966", min_size=4, max_size=4),
        st.sampled_from(["01", "12", "13", "\u0661\u0662"]),
        st.from_regex(r"[a-zA-Z0-9.\-]{1,20}", fullmatch=True),
        st.text(max_size=20),
    ),
    st.text("0123456789abcdefABCDEF\u0661", max_size=40).map(lambda s: "naa." + s),
)


@fuzz_settings(1000)
@given(iscsi_text)
def test_arbitrary_iscsi_names(text: str) -> None:
    name = value_or_error(v.check_iscsi_name, text)
    if name is not None:
        assert isinstance(name, str) and name.isascii() and name == name.lower()
        assert len(name) <= v.IQN_MAX and v.check_iscsi_name(name) == name


@fuzz_settings(1000)
@given(st.one_of(st.text(), st.text("0123456789.:[]%abcdef \u0661\u00e9", max_size=40)))
def test_arbitrary_portals(text: str) -> None:
    portal = value_or_error(v.normalize_portal, text)
    if portal is not None:
        assert isinstance(portal, str) and v.normalize_portal(portal) == portal
        assert portal.isascii() and portal.isprintable() and " " not in portal  # for configfs
