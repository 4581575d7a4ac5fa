"""``tools/vm``: boot the real-stack test guest and run commands in it by hand.

    tools/vm run -- CMD...        boot, set up, run CMD, power off (exit code of CMD)
    tools/vm start                boot and set up a guest that stays up; prints its workdir
    tools/vm exec -- CMD...       run CMD in the started guest
    tools/vm status               show the started guest
    tools/vm stop                 power it off

Commands run as root in the guest with the checkout as working directory and on
PYTHONPATH, so ``tools/vm exec -- .venv/bin/python -m bench.lun`` works.  ``start``
records its workdir in ``.vm-results/current``; ``--workdir`` picks another guest.
A TCG guest keeps a host core busy: stop guests you no longer use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tests.vm.guest import CHECKOUT, Guest, GuestError, default_workdir

CURRENT = CHECKOUT / ".vm-results" / "current"


def _current(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not CURRENT.exists():
        raise GuestError("no started guest (tools/vm start), or pass --workdir")
    return Path(os.readlink(CURRENT)) if CURRENT.is_symlink() else CURRENT


def _exec(g: Guest, argv: list[str], timeout: float) -> int:
    res = g.run(argv, timeout=timeout, check=False, cwd=CHECKOUT, env={"PYTHONPATH": str(CHECKOUT)})
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if not res.ok:
        print(f"tools/vm: {res.describe()[:300]}", file=sys.stderr)
    return res.rc if res.rc is not None else 124


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tools/vm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", help="guest workdir (default: new one / the started guest)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-command timeout (s)")
    ap.add_argument("--no-setup", action="store_true", help="skip the one-time guest setup")
    ap.add_argument("action", choices=["run", "start", "exec", "status", "stop"])
    ap.add_argument("cmd", nargs="*", help="command for run/exec (after --)")
    args = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in args:  # everything after -- is the guest command, options included
        cut = args.index("--")
        args, cmd = args[:cut], args[cut + 1 :]
    a = ap.parse_args(args)
    a.cmd = a.cmd + cmd
    try:
        if a.action == "run":
            if not a.cmd:
                ap.error("run needs a command")
            wd = Path(a.workdir) if a.workdir else default_workdir()
            with Guest.boot(wd, setup=not a.no_setup) as g:
                print(
                    f"tools/vm: guest up in {g.boot_seconds:.1f} s, workdir {wd}", file=sys.stderr
                )
                return _exec(g, a.cmd, a.timeout)
        if a.action == "start":
            wd = Path(a.workdir) if a.workdir else default_workdir()
            g = Guest.boot(wd, setup=not a.no_setup)
            CURRENT.parent.mkdir(parents=True, exist_ok=True)
            CURRENT.unlink(missing_ok=True)
            CURRENT.symlink_to(g.workdir)
            print(json.dumps({k: g.info.get(k) for k in ("pid", "boot_seconds", "setup_seconds")}))
            print(g.workdir)
            return 0
        g = Guest.attach(_current(a.workdir))
        if a.action == "exec":
            if not a.cmd:
                ap.error("exec needs a command")
            return _exec(g, a.cmd, a.timeout)
        if a.action == "status":
            print(json.dumps(g.info, indent=2))
            return 0
        g.shutdown()
        if CURRENT.is_symlink() and Path(os.readlink(CURRENT)) == g.workdir:
            CURRENT.unlink()
        return 0
    except GuestError as e:
        print(f"tools/vm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
