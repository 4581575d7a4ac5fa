"""The TCMU config string of a targetvirt LUN: ``targetvirt/<vdisk>[@<snapshot>][;key=value...]``.

It is the ``dev_config`` written to configfs, shown in the uio name and sent in
RECONFIG events. LIO limits it to 255 characters; ``,`` is the configfs ``control``
separator and ``:`` breaks LIO, so both are refused outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from targetvirt.errors import ConfigStringError

SUBTYPE: Final = "targetvirt"
MAX_LEN: Final = 255  # TCMU_CONFIG_LEN 256 including the NUL
NAME_MAX: Final = 64
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME_CHARS: Final = re.compile(r"[A-Za-z0-9_.-]")
_PREFIX: Final = SUBTYPE + "/"
_BOOLS: Final = {"0": False, "1": True}
KNOWN_OPTIONS: Final = ("ro",)


@dataclass(frozen=True, slots=True)
class DevConfig:
    """A parsed config string. ``read_only`` (``ro=1``) makes the LUN refuse writes."""

    vdisk: str
    snapshot: str | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        check_name(self.vdisk, "vdisk")
        if self.snapshot is not None:
            check_name(self.snapshot, "snapshot")

    def format(self) -> str:
        """The canonical config string (options only when not at their default)."""
        text = _PREFIX + self.vdisk
        if self.snapshot is not None:
            text += "@" + self.snapshot
        if self.read_only:
            text += ";ro=1"
        return text


def check_name(name: str, what: str) -> None:
    """Refuse a vdisk or snapshot name that is not ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""
    if not name:
        raise ConfigStringError(f"{what} name is empty")
    if len(name) > NAME_MAX:
        raise ConfigStringError(f"{what} name is {len(name)} characters, at most {NAME_MAX}")
    if NAME_RE.fullmatch(name):
        return
    if not _NAME_CHARS.fullmatch(name[0]) or name[0] in "_.-":
        raise ConfigStringError(f"{what} name {name!r} must start with a letter or a digit")
    bad = next(c for c in name if not _NAME_CHARS.fullmatch(c))
    raise ConfigStringError(
        f"{what} name {name!r} has the invalid character {bad!r} "
        "(allowed: letters, digits, '_', '.', '-')"
    )


def parse(text: str) -> DevConfig:
    """Parse and validate a config string; ConfigStringError says what is wrong."""
    _check_whole(text)
    spec, *options = text[len(_PREFIX) :].split(";")
    vdisk, snapshot = _split_snapshot(spec)
    read_only = _parse_options(options).get("ro", False)
    return DevConfig(vdisk, snapshot, read_only)


def _check_whole(text: str) -> None:
    if len(text) > MAX_LEN:
        raise ConfigStringError(f"config string is {len(text)} characters, LIO allows {MAX_LEN}")
    for char, why in ((":", "it breaks LIO"), (",", "configfs uses it as a separator")):
        if char in text:
            raise ConfigStringError(f"config string {text!r} contains {char!r}: {why}")
    if not text.startswith(_PREFIX):
        raise ConfigStringError(f"config string {text!r} does not start with {_PREFIX!r}")


def _split_snapshot(spec: str) -> tuple[str, str | None]:
    if spec.count("@") > 1:
        raise ConfigStringError(f"vdisk {spec!r} has more than one '@'")
    vdisk, at, snapshot = spec.partition("@")
    check_name(vdisk, "vdisk")
    if not at:
        return vdisk, None
    check_name(snapshot, "snapshot")
    return vdisk, snapshot


def _parse_options(options: list[str]) -> dict[str, bool]:
    found: dict[str, bool] = {}
    for option in options:
        if not option:
            raise ConfigStringError("empty option: a ';' with nothing after it")
        key, eq, value = option.partition("=")
        if not eq:
            raise ConfigStringError(f"option {option!r} lacks '=value'")
        if key not in KNOWN_OPTIONS:
            raise ConfigStringError(f"unknown option {key!r} (known: {', '.join(KNOWN_OPTIONS)})")
        if key in found:
            raise ConfigStringError(f"option {key!r} is given twice")
        if value not in _BOOLS:
            raise ConfigStringError(f"option {key}={value!r}: the value must be 0 or 1")
        found[key] = _BOOLS[value]
    return found
