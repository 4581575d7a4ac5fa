"""Fixtures for the real-stack tests: ONE QEMU guest per pytest session.

A test marked ``@pytest.mark.vm`` asks for ``guest`` (a ``tests.vm.guest.Guest``) and
runs commands in it::

    @pytest.mark.vm
    def test_something(guest: Guest, results_dir: Path) -> None:
        guest.run(["modinfo", "tcm_loop"])                 # -> Result (raises if rc != 0)
        guest.lio("fileio", "d0", "/run/ram/d0.img", "64M")  # tests/vm/lio.py subcommands
        guest.python("import rtslib_fb; print(rtslib_fb.RTSRoot().targets)")
        (results_dir / "notes.txt").write_text("...")       # kept after the run

The guest boots on first use (about 20-40 s under TCG) and powers off at the end of the
session.  After each test the guest is put back in its post-setup state (initiator
logged out, LIO cleared, tcmu-runner stopped, /run/ram emptied) if the test left
anything behind.  If the guest dies, every later test fails at once with the reason.
Tests that boot guests of their own (the power-cut test resets its guests) run before
every other test, so that the session guest is not booted yet: two TCG guests at once
would share the host's two cores and slow both.
Everything a run produced is under ``.vm-results/<date>-<pid>/`` in the checkout (or
``$TARGETVIRT_VM_RESULTS``); its ``guest.json`` has the boot time.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.compliance import Results, fileio_backstore, run_compliance
from tests.vm.guest import Guest, GuestError

_session_guest: list[Guest] = []


@pytest.fixture(scope="session")
def vm_guest() -> Iterator[Guest]:
    """The session's guest (use ``guest`` in tests; this one skips the per-test checks)."""
    g = Guest.boot()
    _session_guest.append(g)
    try:
        yield g
    finally:
        g.shutdown()


@pytest.fixture
def guest(request: pytest.FixtureRequest, vm_guest: Guest) -> Iterator[Guest]:
    if request.node.get_closest_marker("vm") is None:
        pytest.fail("tests that use the guest must be marked @pytest.mark.vm")
    if not vm_guest.alive():
        pytest.fail(f"the test guest is dead: {vm_guest.dead}")
    yield vm_guest
    if vm_guest.alive():
        try:
            found = vm_guest.lio("reset", timeout=300)["leftovers"]
        except GuestError as e:
            pytest.fail(f"could not reset the guest after {request.node.name}: {e}")
        if found:
            warnings.warn(
                f"{request.node.name} left {found} in the guest (cleaned up)", stacklevel=1
            )


@pytest.fixture
def results_dir(request: pytest.FixtureRequest, vm_guest: Guest) -> Path:
    """A folder for this test's artefacts, visible at the same path in the guest."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    d = vm_guest.results / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def fileio_compliance(vm_guest: Guest) -> Results:
    """libiscsi's iscsi-test-cu over a kernel fileio LUN, run once per session: the
    yardstick other backstores are compared with (``Results.compare``)."""
    return run_compliance(vm_guest, fileio_backstore(), name="fileio")


def boots_own_guests(item: pytest.Item) -> bool:
    """A vm test that does not use the session guest boots guests of its own."""
    return item.get_closest_marker("vm") is not None and "vm_guest" not in getattr(
        item, "fixturenames", ()
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: the tests with their own guests first, each group in its own order.
    items.sort(key=lambda item: not boots_own_guests(item))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for g in _session_guest:
        info = g.info
        terminalreporter.write_sep("-", "vm guest")
        terminalreporter.write_line(
            f"kernel {info.get('uname', info.get('kernel'))}: booted in "
            f"{info.get('boot_seconds')} s, setup {info.get('setup_seconds')} s; "
            f"results in {g.workdir}"
        )
