"""Parsing and formatting of what admins type: sizes, durations, booleans, lists, IQNs,
portals.  Every parser raises :class:`InvalidArgument` with a one-line message that names
the parameter and says what is accepted.
"""

from __future__ import annotations

import ipaddress
import re

from targetvirt.errors import InvalidArgument

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
# re.ASCII: \d takes no other script's digits, and IGNORECASE no KELVIN SIGN for K
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\Z", re.IGNORECASE | re.ASCII)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\Z", re.IGNORECASE | re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}
MAX_SIZE = (1 << 63) - 1  # what fits a signed 64-bit integer
MAX_DURATION = 365 * 86400.0  # a year: more is a typo (and inf breaks timers)
BLOCK = 512  # LUN block size: vdisk sizes are multiples of it
DEFAULT_PORT = 3260

# iSCSI names (RFC 3720 3.2.6): iqn.YYYY-MM.reversed.domain[:anything], eui.<16 hex>,
# naa.<16 or 32 hex>.  LIO wants them in lower case.
_IQN_RE = re.compile(
    r"iqn\.\d{4}-(0[1-9]|1[0-2])\."
    r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[a-z0-9.:_-]+)?\Z",
    re.ASCII,
)
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}\Z")
_NAA_RE = re.compile(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})\Z")
IQN_MAX = 223
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]+")  # an IPv6 zone: an interface name or index


def parse_size(text: str, what: str = "size") -> int:
    """``10G``, ``512M``, ``1.5T``, ``4096`` (bytes); binary units; must be positive."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise InvalidArgument(
            f"{what} {text!r} is not a size: use a number of bytes with an optional "
            "K, M, G or T suffix (e.g. 10G)"
        )
    number, unit = m.groups()
    try:
        value = (
            float(number) * UNITS[unit.upper()]
            if "." in number
            else int(number) * UNITS[unit.upper()]
        )
        size = int(value)
    except (OverflowError, ValueError):  # inf, or more digits than int() takes
        raise InvalidArgument(
            f"{what} {text!r} is larger than {format_size(MAX_SIZE + 1)}"
        ) from None
    if size != value:
        raise InvalidArgument(f"{what} {text!r} is not a whole number of bytes")
    if size <= 0:
        raise InvalidArgument(f"{what} must be positive, got {text!r}")
    if size > MAX_SIZE:
        raise InvalidArgument(f"{what} {text!r} is larger than {format_size(MAX_SIZE + 1)}")
    return size


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that keeps at least one digit before the point."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        if n >= UNITS[unit]:
            value = n / UNITS[unit]
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text}{unit}iB"
    return f"{n}B"


def parse_duration(text: str, what: str = "timeout") -> float:
    """Seconds: ``30``, ``1.5``, ``250ms``, ``30s``, ``5m``, ``1h``; must be positive."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise InvalidArgument(
            f"{what} {text!r} is not a duration: use seconds, optionally with ms, s, m or h "
            "(e.g. 30 or 5m)"
        )
    seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    if seconds <= 0:
        raise InvalidArgument(f"{what} must be positive, got {text!r}")
    if seconds > MAX_DURATION:
        raise InvalidArgument(f"{what} {text!r} is longer than {MAX_DURATION:.0f} seconds")
    return seconds


def parse_bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidArgument(f"{what}={text!r} is not a boolean: use true or false")


def parse_int(text: str, what: str, *, low: int = 0, high: int | None = None) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise InvalidArgument(f"{what} must be a whole number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise InvalidArgument(f"{what} must be {bounds}, got {value}")
    return value


def parse_percent(text: str, what: str) -> int:
    """A whole percentage from 1 to 100: ``80`` or ``80%``."""
    digits = text.strip().removesuffix("%").strip()
    if not digits.isdigit():
        raise InvalidArgument(
            f"{what} {text!r} is not a percentage: use a whole number from 1 to 100 (e.g. 80)"
        )
    return parse_int(digits, what, low=1, high=100)


def parse_list(text: str, what: str) -> list[str]:
    """A comma-separated list with no empty items and no repeats."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise InvalidArgument(f"{what} {text!r} has an empty item: use A,B,C")
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise InvalidArgument(f"{what} names {item!r} twice")
        seen.add(item)
    return items


def check_iscsi_name(name: str, what: str = "IQN") -> str:
    """Validate an iSCSI name (iqn./eui./naa.); returns it in lower case."""
    norm = name.strip().lower()
    if len(norm) > IQN_MAX:
        raise InvalidArgument(f"{what} {name!r} is longer than {IQN_MAX} characters")
    if not (_IQN_RE.match(norm) or _EUI_RE.match(norm) or _NAA_RE.match(norm)):
        raise InvalidArgument(
            f"{what} {name!r} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] "
            "(e.g. iqn.2003-01.org.example:disk1), eui.<16 hex> or naa.<hex>"
        )
    return norm


def parse_portal(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]``, ``[IPV6][:PORT]``; the address must be an IP (0.0.0.0 = all)."""
    s = text.strip()
    port = DEFAULT_PORT
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"portal {text!r} is malformed: use [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    elif ":" in s:  # a bare IPv6 address
        host, port_text = s, ""
    else:
        host, port_text = s, ""
    if port_text:
        port = parse_int(port_text, f"portal {text!r} port", low=1, high=65535)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(
            f"portal {text!r} does not start with an IP address: use ADDR:PORT "
            "(e.g. 0.0.0.0:3260 or [::]:3260)"
        ) from None
    scope = getattr(ip, "scope_id", None)
    if scope is not None and not _SCOPE_RE.fullmatch(scope):
        raise InvalidArgument(f"portal {text!r} has the IPv6 zone {scope!r}: use an interface name")
    return str(ip), port


def format_portal(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def normalize_portal(text: str) -> str:
    return format_portal(*parse_portal(text))


def check_block_multiple(size: int, what: str = "size") -> None:
    if size % BLOCK:
        raise InvalidArgument(
            f"{what} {size} is not a multiple of {BLOCK} bytes (the LUN block size)"
        )
