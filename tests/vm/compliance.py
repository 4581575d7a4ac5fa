"""SCSI/iSCSI compliance runs with libiscsi's ``iscsi-test-cu`` and a parser for its output.

The yardstick for every backstore is the kernel's own fileio backstore, measured in the
same guest: a later LUN (e.g. targetvirt's) must pass at least as many tests and fail no
more (``Results.compare``).  Typical use from a vm test::

    res = run_compliance(guest, my_backstore_setup, name="targetvirt")
    cmp = res.compare(fileio_compliance)       # session fixture in conftest.py
    assert cmp.ok, cmp.describe()

``backstore_setup(guest, so_name)`` must create a LIO storage object called ``so_name``
in the guest (with whatever it needs: files under /run/ram, daemons...) and may return a
cleanup callable, called after the target and the storage object are deleted.
``run_compliance`` exports it as LUN 0 of an iSCSI target on 127.0.0.1 and runs
``iscsi-test-cu -t <tests> --dataloss --allow-sanitize iscsi://127.0.0.1/<iqn>/0``.

iscsi-test-cu (CUnit "basic" mode) prints, on stdout::

    Suite: Read10
      Test: Simple ...passed
      Test: BeyondEol ...    [SKIPPED] ... is not implemented.
    passed
      Test: DpoFua ...    [FAILED] ... wrong sense ...
    FAILED
        1. test_read10_dpofua.c:71  - CU_ASSERT_EQUAL(_r,0)
    Run Summary:    Type  Total    Ran Passed Failed Inactive
                  suites     51     51    n/a      0        0
                   tests    230    230    197     33        0
                 asserts  43343  43343  42206   1137      n/a
    Elapsed time =   46.580 seconds

CUnit counts a test that bailed out with "[SKIPPED]" (command not implemented, flag not
set, LU not removable...) as passed; the parser reports it as ``skipped``.

This module also runs in the guest (``python -m tests.vm.compliance timeline ...``): a
wrapper that runs iscsi-test-cu line-buffered and time-stamps each output line, so the
results carry per-test durations.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.guest import Guest, GuestError
from tests.vm.lio import PORTAL_IP, iqn
from tests.vm.stack import create_qcow2, start_tcmu_runner

PASSED, FAILED, SKIPPED, INCOMPLETE = "passed", "failed", "skipped", "incomplete"

#: Creates storage object ``so_name`` in the guest; returns an optional cleanup.
BackstoreSetup = Callable[[Guest, str], Callable[[], None] | None]

#: Tests whose outcome depends on timing under TCG, even against fileio: after the first
#: initiator logs out, Reserve6.Logout immediately RESERVEs from the second one and gets
#: RESERVATION CONFLICT whenever LIO has not finished tearing the session down yet; the
#: reservation it then leaves behind fails Reserve6.ITNexusLoss too.  ``compare``
#: leaves them out unless told otherwise.
TIMING_SENSITIVE = frozenset({"Reserve6.Logout", "Reserve6.ITNexusLoss"})

#: Per-test output lines kept (Verify*.Mismatch logs one line per block tried).
MAX_MESSAGES = 25

_SUITE = re.compile(r"^Suite: (?P<suite>\S.*?)\s*$")
_TEST = re.compile(r"^  Test: (?P<test>.+?) \.\.\.(?P<rest>.*)$")
_ASSERT = re.compile(r"^\s+\d+\. (?P<what>\S.*)$")
_SUMMARY_ROW = re.compile(
    r"^\s*(?:Run Summary:\s+)?(?P<type>suites|tests|asserts)\s+(?P<total>\S+)\s+(?P<ran>\S+)"
    r"\s+(?P<passed>\S+)\s+(?P<failed>\S+)\s+(?P<inactive>\S+)\s*$"
)
_ELAPSED = re.compile(r"^Elapsed time =\s*(?P<s>[0-9.]+) seconds")


@dataclass
class Outcome:
    """One CUnit test: ``status`` is passed / failed / skipped / incomplete."""

    name: str  # "Suite.Test"
    status: str
    messages: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # distinct "file:line - assertion"
    seconds: float | None = None  # wall time, when the run was time-stamped


@dataclass
class Comparison:
    """How a run compares with a baseline run (usually fileio)."""

    passed: int
    failed: int
    base_passed: int
    base_failed: int
    regressions: list[str]  # failed here, passed or skipped in the baseline
    fixed: list[str]  # passed here, failed in the baseline
    lost_passes: list[str]  # skipped here, passed in the baseline
    missing: list[str]  # in the baseline, not run here

    @property
    def ok(self) -> bool:
        """Passes at least as many tests as the baseline and fails no more."""
        return self.passed >= self.base_passed and self.failed <= self.base_failed

    def describe(self) -> str:
        return (
            f"passed {self.passed} (baseline {self.base_passed}), failed {self.failed} "
            f"(baseline {self.base_failed}); regressions: {self.regressions or 'none'}; "
            f"lost passes: {self.lost_passes or 'none'}; missing: {self.missing or 'none'}"
        )


@dataclass
class Results:
    """A parsed iscsi-test-cu run."""

    tests: dict[str, Outcome]
    summary: dict[str, dict[str, int | None]]  # CUnit Run Summary rows
    cunit_elapsed: float | None = None  # CUnit's own "Elapsed time" (CPU time)
    exit_code: int | None = None
    wall_seconds: float | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def with_status(self, status: str) -> list[str]:
        return sorted(n for n, t in self.tests.items() if t.status == status)

    @property
    def passed(self) -> list[str]:
        return self.with_status(PASSED)

    @property
    def failed(self) -> list[str]:
        return self.with_status(FAILED)

    @property
    def skipped(self) -> list[str]:
        return self.with_status(SKIPPED)

    @property
    def incomplete(self) -> list[str]:
        return self.with_status(INCOMPLETE)

    def counts(self) -> dict[str, int]:
        c = {s: 0 for s in (PASSED, FAILED, SKIPPED, INCOMPLETE)}
        for t in self.tests.values():
            c[t.status] += 1
        c["total"] = len(self.tests)
        return c

    @property
    def complete(self) -> bool:
        """The run reached CUnit's summary, and it agrees with the per-test lines."""
        row = self.summary.get("tests")
        if not row or self.incomplete:
            return False
        c = self.counts()
        return row.get("ran") == c["total"] and row.get("failed") == c[FAILED]

    def suite_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, t in self.tests.items():
            out[name.split(".", 1)[0]] = out.get(name.split(".", 1)[0], 0.0) + (t.seconds or 0.0)
        return out

    def compare(self, baseline: Results, *, ignore: Iterable[str] = TIMING_SENSITIVE) -> Comparison:
        """This run against ``baseline``; tests in ``ignore`` count on neither side."""
        skip = set(ignore)
        st = {n: t.status for n, t in self.tests.items() if n not in skip}
        bst = {n: t.status for n, t in baseline.tests.items() if n not in skip}

        def count(d: dict[str, str], *which: str) -> int:
            return sum(1 for s in d.values() if s in which)

        return Comparison(
            passed=count(st, PASSED),
            failed=count(st, FAILED, INCOMPLETE),
            base_passed=count(bst, PASSED),
            base_failed=count(bst, FAILED, INCOMPLETE),
            regressions=sorted(
                n for n, s in st.items() if s in (FAILED, INCOMPLETE) and bst.get(n) != FAILED
            ),
            fixed=sorted(n for n, s in st.items() if s == PASSED and bst.get(n) == FAILED),
            lost_passes=sorted(n for n, s in st.items() if s == SKIPPED and bst.get(n) == PASSED),
            missing=sorted(set(bst) - set(st)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exit_code": self.exit_code,
            "complete": self.complete,
            "counts": self.counts(),
            "summary": self.summary,
            "cunit_elapsed": self.cunit_elapsed,
            "wall_seconds": self.wall_seconds,
            "meta": self.meta,
            "failed": self.failed,
            "skipped": self.skipped,
            "suite_seconds": {k: round(v, 2) for k, v in self.suite_seconds().items()},
            "tests": {n: asdict(t) for n, t in sorted(self.tests.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        return cls(
            tests={n: Outcome(**t) for n, t in data["tests"].items()},
            summary=data.get("summary", {}),
            cunit_elapsed=data.get("cunit_elapsed"),
            exit_code=data.get("exit_code"),
            wall_seconds=data.get("wall_seconds"),
            name=data.get("name", ""),
            meta=data.get("meta", {}),
        )

    def describe(self) -> str:
        c = self.counts()
        return (
            f"{self.name or 'iscsi-test-cu'}: {c['total']} tests, {c[PASSED]} passed, "
            f"{c[FAILED]} failed, {c[SKIPPED]} skipped"
            + (f", {c[INCOMPLETE]} incomplete" if c[INCOMPLETE] else "")
            + ("" if self.complete else " (run INCOMPLETE)")
            + (f", {self.wall_seconds:.0f} s" if self.wall_seconds else "")
        )


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def parse_cunit(lines: Iterable[str], times: Sequence[float] | None = None) -> Results:
    """Parse iscsi-test-cu's stdout (CUnit basic mode).  ``times`` (same length as the
    lines, seconds since start) gives per-test durations: the time between the lines
    that end consecutive tests."""
    tests: dict[str, Outcome] = {}
    summary: dict[str, dict[str, int | None]] = {}
    elapsed: float | None = None
    suite = ""
    current: Outcome | None = None
    last: Outcome | None = None  # receives the "1. file:line - ..." lines
    mark = 0.0  # time the previous test ended

    def finish(t: Outcome, result: str, at: float | None) -> None:
        nonlocal mark
        if result == "FAILED":
            t.status = FAILED
        else:
            t.status = SKIPPED if any("[SKIPPED]" in m for m in t.messages) else PASSED
        if at is not None:
            t.seconds = round(at - mark, 3)
            mark = at

    for i, raw in enumerate(lines):
        line = raw.rstrip("\r\n")
        at = times[i] if times is not None else None
        m = _TEST.match(line)
        if m:
            if current is not None:  # previous test never ended: should not happen
                current.status = INCOMPLETE
            name = f"{suite}.{m['test']}" if suite else m["test"]
            current = Outcome(name=name, status=INCOMPLETE)
            tests[name] = current
            last = None
            rest = m["rest"].strip()
            word = rest.split(maxsplit=1)[0] if rest else ""
            if word in ("passed", "FAILED"):
                finish(current, word, at)
                last, current = current, None
            elif rest:
                current.messages.append(rest)
            continue
        if current is not None:
            text = line.strip()
            word = text.split(maxsplit=1)[0] if text else ""
            if word in ("passed", "FAILED"):  # (stderr may have been appended to it)
                finish(current, word, at)
                last, current = current, None
                continue
            if not _SUITE.match(line):
                # (stderr copies repeat lines; some tests log one line per block)
                if text and text not in current.messages and len(current.messages) < MAX_MESSAGES:
                    current.messages.append(text)
                continue
            current = None  # a new suite while a test is open: that test never ended
        m = _ASSERT.match(line)
        if m and last is not None and last.status == FAILED:
            what = m["what"].strip()  # one line per failed assert: keep distinct ones
            if what not in last.failures and len(last.failures) < MAX_MESSAGES:
                last.failures.append(what)
            continue
        m = _SUITE.match(line)
        if m:
            suite, last = m["suite"], None
            continue
        m = _SUMMARY_ROW.match(line)
        if m:
            summary[m["type"]] = {
                k: _int(m[k]) for k in ("total", "ran", "passed", "failed", "inactive")
            }
            continue
        m = _ELAPSED.match(line)
        if m:
            elapsed = float(m["s"])
    return Results(tests=tests, summary=summary, cunit_elapsed=elapsed)


def parse_timeline(text: str) -> tuple[list[str], list[float]]:
    """Split the ``seconds<TAB>line`` file written by ``timeline`` (below)."""
    lines, times = [], []
    for row in text.splitlines():
        t, _, line = row.partition("\t")
        try:
            times.append(float(t))
        except ValueError:
            continue
        lines.append(line)
    return lines, times


# --------------------------------------------------------------------------- backstores


def fileio_backstore(size: str = "128M", *, write_back: bool = True) -> BackstoreSetup:
    """The kernel fileio backstore on a sparse file in the guest's /run/ram tmpfs."""

    def setup(guest: Guest, so_name: str) -> Callable[[], None]:
        path = f"/run/ram/{so_name}.img"
        args = ["fileio", so_name, path, size] + ([] if write_back else ["--write-through"])
        guest.lio(*args)

        def cleanup() -> None:
            guest.run(["rm", "-f", path], check=False)

        return cleanup

    return setup


def qcow_backstore(size: str = "128M") -> BackstoreSetup:
    """tcmu-runner's qcow handler on a fresh qcow2 file in /run/ram (metadata-preallocated,
    see stack.QCOW_CREATE_OPTS; starts tcmu-runner for the run, stops it afterwards)."""

    def setup(guest: Guest, so_name: str) -> Callable[[], None]:
        path = f"/run/ram/{so_name}.qcow2"
        runner = start_tcmu_runner(guest, guest.results / f"tcmu-runner-{so_name}.log")
        try:
            create_qcow2(guest, path, size)
            guest.lio("user", so_name, f"qcow/{path}", size)
        except GuestError:
            runner.stop()
            raise

        def cleanup() -> None:
            runner.stop()
            guest.run(["rm", "-f", path], check=False)

        return cleanup

    return setup


def targetvirt_backstore(size: str = "128M", *daemon_args: str) -> BackstoreSetup:
    """targetvirt-handler serving a thin vdisk whose pool is a file in /run/ram."""

    def setup(guest: Guest, so_name: str) -> Callable[[], None]:
        where = f"/run/ram/tv-{so_name}"
        guest.module("tests.vm.tvlun", "up", where, so_name, size, *daemon_args, timeout=300)

        def cleanup() -> None:
            guest.module("tests.vm.tvlun", "stop", where, timeout=120, check=False)
            guest.run(["cp", f"{where}/handler.log", str(guest.results / f"{so_name}.log")],
                      check=False)  # fmt: skip
            guest.run(["rm", "-rf", where], check=False)

        return cleanup

    return setup


# --------------------------------------------------------------------------- running


def run_compliance(
    guest: Guest,
    backstore_setup: BackstoreSetup,
    *,
    name: str,
    tests: str = "ALL",
    results_dir: Path | None = None,
    timeout: float = 3600.0,
    extra_args: Sequence[str] = (),
) -> Results:
    """Create the backstore, export it over iSCSI on 127.0.0.1, run iscsi-test-cu on it
    (destructive tests and SANITIZE allowed), tear everything down, parse the output.
    Writes ``<name>.txt`` (stdout), ``<name>.err``, ``<name>.timeline.tsv`` and
    ``<name>.json`` (the parsed Results) into ``results_dir`` (default
    ``<results>/compliance``).  Does not assert anything about the outcome."""
    rdir = results_dir or guest.results / "compliance"
    rdir.mkdir(parents=True, exist_ok=True)
    so_name = f"cu_{re.sub(r'[^a-z0-9]', '_', name.lower())}"
    target = iqn(f"cu-{re.sub(r'[^a-z0-9.-]', '-', name.lower())}")
    url = f"iscsi://{PORTAL_IP}/{target}/0"
    argv = ["iscsi-test-cu", "-t", tests, "--dataloss", "--allow-sanitize", *extra_args, url]
    tsv, err = rdir / f"{name}.timeline.tsv", rdir / f"{name}.err"
    cleanup = backstore_setup(guest, so_name)
    try:
        guest.lio("iscsi", target, so_name)
        t0 = time.monotonic()
        res = guest.module(
            "tests.vm.compliance", "timeline", str(tsv), str(err), "--", *argv,
            timeout=timeout, check=False,
        )  # fmt: skip
        wall = time.monotonic() - t0
    finally:
        for args in (("delete-target", target), ("delete-so", so_name)):
            with contextlib.suppress(GuestError):  # the guest fixture reports leftovers
                guest.lio(*args)
        if cleanup is not None:
            cleanup()
    if res.timed_out or res.error:
        raise GuestError(f"compliance run {name}: {res.describe()}")
    lines, times = parse_timeline(tsv.read_text(errors="replace") if tsv.exists() else "")
    (rdir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    results = parse_cunit(lines, times)
    results.name = name
    results.exit_code = res.rc
    results.wall_seconds = round(wall, 1)
    results.meta = {"command": argv, "uname": guest.info.get("uname"), **_versions(guest)}
    (rdir / f"{name}.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    return results


def _versions(guest: Guest) -> dict[str, str]:
    res = guest.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "libiscsi-bin", "tcmu-runner"],
        check=False,
    )
    out = {}
    for line in res.stdout.splitlines():
        pkg, _, ver = line.partition(" ")
        out[pkg] = ver
    return out


# --------------------------------------------------------------------------- guest side


def timeline(tsv: Path, err: Path, argv: list[str]) -> int:
    """(In the guest) run ``argv`` with line-buffered stdout; write each stdout line as
    ``seconds<TAB>line`` to ``tsv`` as it arrives, stderr to ``err``; return its exit
    code."""
    t0 = time.monotonic()
    with open(tsv, "w", buffering=1) as out, open(err, "wb") as ferr:
        proc = subprocess.Popen(
            ["stdbuf", "-oL", "-eL", *argv], stdout=subprocess.PIPE, stderr=ferr
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            out.write(f"{time.monotonic() - t0:.3f}\t{line}\n")
        return proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "timeline" and argv[3] == "--":
        return timeline(Path(argv[1]), Path(argv[2]), argv[4:])
    if len(argv) == 2 and argv[0] == "parse":  # parse a saved stdout, print JSON
        text = Path(argv[1]).read_text(errors="replace")
        print(json.dumps(parse_cunit(text.splitlines()).to_json(), indent=2))
        return 0
    print(
        "usage: python -m tests.vm.compliance timeline TSV ERR -- CMD... | parse FILE",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
