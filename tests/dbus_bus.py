"""Private D-Bus daemons for tests: the real dbus-daemon, with a permissive policy, or
with the system bus's own default policy and one policy file added."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
# What a private copy of the system bus keeps from system.conf: its identity and policy,
# not its user, pid file, socket, activation helper or included folders.
_SYSTEM_KEEP = ("type", "auth", "policy", "limit")

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  {extra}
</busconfig>
"""


@contextmanager
def private_bus(tmp: Path, extra_policy: str = "") -> Iterator[str]:
    """Run dbus-daemon on a socket in ``tmp``; yields its address."""
    conf = tmp / "bus.conf"
    conf.write_text(CONFIG.format(socket=tmp / "bus.sock", extra=extra_policy))
    with _daemon(conf) as address:
        yield address


@contextmanager
def system_like_bus(tmp: Path, policy: Path) -> Iterator[str]:
    """A bus with the system bus's default policy (deny owning names and method calls,
    allow the bus itself) plus ``policy``, as a file in /etc/dbus-1/system.d would add
    it, on a socket in ``tmp``; yields its address."""
    system = ET.parse(SYSTEM_CONF).getroot()
    config = ET.Element("busconfig")
    for element in system:
        if element.tag in _SYSTEM_KEEP:
            config.append(element)
    ET.SubElement(config, "listen").text = f"unix:path={tmp / 'bus.sock'}"
    ET.SubElement(config, "include").text = str(policy.resolve())
    conf = tmp / "bus.conf"
    conf.write_bytes(ET.tostring(config))
    with _daemon(conf) as address:
        yield address


@contextmanager
def _daemon(conf: Path) -> Iterator[str]:
    if shutil.which("dbus-daemon") is None:
        raise RuntimeError("dbus-daemon is not installed (tools/setup-host installs it)")
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise RuntimeError("dbus-daemon did not start")
        yield address
    finally:
        proc.terminate()
        proc.wait(10)
