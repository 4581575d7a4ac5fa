"""A controller process for the high-availability tests, driven through stdin.

``python -m tests.targetvirt.controller_child ARGS...`` takes the arguments of
``targetvirt-controller`` (``--standby`` included) and runs the same
:class:`~targetvirt.manage.controld.ControllerService`.  It prints ``waiting`` at the
first refused attempt of a standby, ``active`` once it serves, then answers one line per
command read from stdin:

* ``snapshot SOURCE NAME`` -> ``window STARTED FROZEN THAWED`` (CLOCK_MONOTONIC);
* ``freeze NAME SECONDS`` -> ``froze STARTED FROZEN`` (CLOCK_MONOTONIC around the call);
* ``frozen NAME`` -> ``frozen yes`` or ``frozen no``;
* ``commit KEY`` -> ``ok`` (a record ``note/KEY`` committed to the store);
* ``agents`` -> ``agents ID...`` (live sessions);
* ``await ID...`` -> ``agents ID...`` once those agents have registered (at most 60 s);
* ``sinks`` -> ``sinks CLASS...`` (how each live session gets its commands);
* ``quit`` -> ``bye`` after a clean stop.

An error prints ``error <class>: <message>``.
"""

from __future__ import annotations

import os
import sys
import time

from targetvirt.controller import Controller
from targetvirt.errors import StoreError, TargetvirtError
from targetvirt.manage.controld import ControllerService, parse_args


def ids(controller: Controller) -> set[str]:
    return {s.agent_id for s in controller.sessions()}


def main() -> int:
    said: list[str] = []

    def waiting(e: StoreError) -> None:
        if not said:
            said.append(str(e))
            print("waiting", flush=True)

    service = ControllerService(parse_args(sys.argv[1:]), on_wait=waiting)
    try:
        controller = service.start()
    except TargetvirtError as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
        return 2
    print("active", flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "snapshot":
                controller.snapshot(words[1], words[2])
                w = controller.windows[-1]
                print(f"window {w.started!r} {w.frozen!r} {w.thawed!r}", flush=True)
            elif words[0] == "freeze":
                started = time.monotonic()
                controller.freeze([words[1]], timeout=float(words[2]))
                print(f"froze {started!r} {time.monotonic()!r}", flush=True)
            elif words[0] == "frozen":
                print(f"frozen {'yes' if controller.frozen(words[1]) else 'no'}", flush=True)
            elif words[0] == "commit":
                controller.catalog.put_record("note", int(words[1]), {"by": os.getpid()})
                controller.catalog.commit()
                print("ok", flush=True)
            elif words[0] in ("agents", "await"):
                want, deadline = set(words[1:]), time.monotonic() + 60
                with controller._state:  # notified at every registration
                    while not want <= ids(controller) and time.monotonic() < deadline:
                        controller._state.wait(deadline - time.monotonic())
                print(" ".join(["agents", *sorted(ids(controller))]), flush=True)
            elif words[0] == "sinks":
                sinks = sorted(type(s.sink).__name__ for s in controller.sessions())
                print(" ".join(["sinks", *sinks]), flush=True)
            elif words[0] == "quit":
                service.stop()
                print("bye", flush=True)
                break
        except TargetvirtError as e:
            print(f"error {type(e).__name__}: {e}", flush=True)
    # at once: librados threads of a handle never shut down abort an orderly exit
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
