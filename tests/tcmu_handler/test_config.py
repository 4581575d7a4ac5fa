"""Config string parsing: exact refusals, round trips, and (fuzz targets, scaled by
TV_FUZZ_SCALE) arbitrary and mutated text: only ConfigStringError, one line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from targetvirt.errors import ConfigStringError
from tcmu_handler.config import DevConfig, check_name, parse
from tests.fuzzing import fuzz_settings, one_line

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targetvirt/vd1", DevConfig("vd1")),
        ("targetvirt/vd1@snap-2", DevConfig("vd1", "snap-2")),
        ("targetvirt/a;ro=1", DevConfig("a", read_only=True)),
        ("targetvirt/a.b_c-d@0;ro=0", DevConfig("a.b_c-d", "0")),
        ("targetvirt/" + "x" * 64 + "@" + "y" * 64, DevConfig("x" * 64, "y" * 64)),
    ],
)
def test_valid_strings(text: str, expected: DevConfig) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targetvirt/", "vdisk name is empty"),
        ("targetvirt/@s", "vdisk name is empty"),
        ("targetvirt/;ro=1", "vdisk name is empty"),
        ("targetvirt/vd@", "snapshot name is empty"),
        ("targetvirt/a@b@c", "more than one '@'"),
        ("targetvirt/" + "x" * 65, "vdisk name is 65 characters, at most 64"),
        ("targetvirt/v@" + "y" * 65, "snapshot name is 65 characters, at most 64"),
        ("targetvirt/-vd", "vdisk name '-vd' must start with a letter or a digit"),
        ("targetvirt/_vd", "must start with a letter or a digit"),
        ("targetvirt/é", "must start with a letter or a digit"),
        ("targetvirt/vd 1", "vdisk name 'vd 1' has the invalid character ' '"),
        ("targetvirt/vd/1", "has the invalid character '/'"),
        ("targetvirt/vd1\n", "has the invalid character '\\n'"),
        ("targetvirt/vdé", "has the invalid character 'é'"),
        ("targetvirt/v@s!", "snapshot name 's!' has the invalid character '!'"),
        ("targetvirt/vd;", "empty option"),
        ("targetvirt/vd;;ro=1", "empty option"),
        ("targetvirt/vd;ro", "option 'ro' lacks '=value'"),
        ("targetvirt/vd;rw=1", "unknown option 'rw' (known: ro)"),
        ("targetvirt/vd;ro=1;ro=0", "option 'ro' is given twice"),
        ("targetvirt/vd;ro=yes", "option ro='yes': the value must be 0 or 1"),
        ("targetvirt/vd;ro=", "option ro='': the value must be 0 or 1"),
        ("targetvirt/vd:1", "contains ':': it breaks LIO"),
        ("targetvirt/vd,ro=1", "contains ',': configfs uses it as a separator"),
        ("file/vd", "does not start with 'targetvirt/'"),
        ("targetvirt", "does not start with 'targetvirt/'"),
        ("", "does not start with 'targetvirt/'"),
        ("targetvirt/" + "x" * 245, "config string is 256 characters, LIO allows 255"),
    ],
)
def test_malformed_strings_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigStringError) as err:
        parse(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one line, as every targetvirt error


def test_dataclass_validates_its_names() -> None:
    with pytest.raises(ConfigStringError, match="vdisk name is empty"):
        DevConfig("")
    with pytest.raises(ConfigStringError, match="snapshot"):
        DevConfig("v", "a b")
    check_name("A" * 64, "vdisk")


@given(
    vdisk=st.from_regex(NAME, fullmatch=True),
    snapshot=st.none() | st.from_regex(NAME, fullmatch=True),
    ro=st.booleans(),
)
def test_valid_configs_round_trip(vdisk: str, snapshot: str | None, ro: bool) -> None:
    config = DevConfig(vdisk, snapshot, ro)
    text = config.format()
    assert parse(text) == config
    assert parse(text).format() == text
    assert len(text) <= 255


def parses_or_says_why(text: str) -> None:
    try:
        config = parse(text)
    except ConfigStringError as e:
        assert one_line(str(e)), repr(str(e))
    else:
        assert parse(config.format()) == config


# As netlink and sysfs hand them over: UTF-8 decoded with surrogateescape.
raw_text = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape"))


@fuzz_settings(1000)
@given(st.text() | st.text().map(lambda s: "targetvirt/" + s) | raw_text)
def test_arbitrary_text_only_raises_config_string_error(text: str) -> None:
    parses_or_says_why(text)


PIECES = ["targetvirt/", "@", ";", "=", "ro", "1", "0", ":", ",", "/", "\n", "\r", "\x00",
          "\u2028", "\udcff", "é", " ", "-", "_", ".", "a", "Z", "9", "x" * 64]  # fmt: skip


@fuzz_settings(500)
@given(
    vdisk=st.from_regex(NAME, fullmatch=True),
    snapshot=st.none() | st.from_regex(NAME, fullmatch=True),
    ro=st.booleans(),
    edits=st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 3), st.sampled_from(PIECES) | st.text()),
        min_size=1, max_size=4,
    ),
)  # fmt: skip
def test_mutated_config_strings_only_raise_config_string_error(
    vdisk: str, snapshot: str | None, ro: bool, edits: list[tuple[int, int, str]]
) -> None:
    text = DevConfig(vdisk, snapshot, ro).format()
    for where, cut, piece in edits:
        at = where % (len(text) + 1)
        text = text[:at] + piece + text[at + cut :]
    parses_or_says_why(text)
