"""A private D-Bus daemon for tests: the real dbus-daemon, with a permissive policy."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    if shutil.which("dbus-daemon") is None:
        raise RuntimeError("dbus-daemon is not installed (tools/setup-host installs it)")
    socket = tmp / "bus.sock"
    conf = tmp / "bus.conf"
    conf.write_text(CONFIG.format(socket=socket, extra=extra_policy))
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
