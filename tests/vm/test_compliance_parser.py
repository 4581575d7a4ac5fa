"""The iscsi-test-cu output parser (no guest needed)."""

from __future__ import annotations

from tests.vm.compliance import (
    FAILED,
    INCOMPLETE,
    PASSED,
    SKIPPED,
    Outcome,
    Results,
    parse_cunit,
    parse_timeline,
)

SAMPLE = """\
    [SKIPPED] REPORT_SUPPORTED_OPCODES is not implemented.



     CUnit - A unit testing framework for C - Version 2.1-3
     http://cunit.sourceforge.net/


Suite: CompareAndWrite
  Test: Simple ...    [FAILED] COMPAREANDWRITE failed with wrong sense.
FAILED
    1. test_compareandwrite_simple.c:71  - CU_ASSERT_EQUAL(_r,0)
    2. test_compareandwrite_simple.c:123  - CU_ASSERT_EQUAL(_r,0)
  Test: DpoFua ...    [SKIPPED] REPORT_SUPPORTED_OPCODES is not implemented.
passed
  Test: Unwritten ...passed
Suite: ModeSense6
  Test: Control-SWP ...    SWP is not changeable
passed
  Test: Residuals ...passed
Suite: iSCSIResiduals
  Test: Write10Residuals ...    First block did not contain expected 'b'
FAILED
    1. test_write10_residuals.c:141  - CU_ASSERT_EQUAL(task->status,SCSI_STATUS_GOOD)

Run Summary:    Type  Total    Ran Passed Failed Inactive
              suites      3      3    n/a      0        0
               tests      6      6      4      2        0
             asserts    100    100     97      3      n/a

Elapsed time =    1.500 seconds
"""


def test_parse_statuses_and_summary() -> None:
    r = parse_cunit(SAMPLE.splitlines())
    assert {n: t.status for n, t in r.tests.items()} == {
        "CompareAndWrite.Simple": FAILED,
        "CompareAndWrite.DpoFua": SKIPPED,
        "CompareAndWrite.Unwritten": PASSED,
        "ModeSense6.Control-SWP": PASSED,
        "ModeSense6.Residuals": PASSED,
        "iSCSIResiduals.Write10Residuals": FAILED,
    }
    assert r.tests["CompareAndWrite.Simple"].failures == [
        "test_compareandwrite_simple.c:71  - CU_ASSERT_EQUAL(_r,0)",
        "test_compareandwrite_simple.c:123  - CU_ASSERT_EQUAL(_r,0)",
    ]
    assert r.summary["tests"] == {"total": 6, "ran": 6, "passed": 4, "failed": 2, "inactive": 0}
    assert r.summary["suites"]["passed"] is None
    assert r.cunit_elapsed == 1.5
    assert r.counts() == {PASSED: 3, FAILED: 2, SKIPPED: 1, INCOMPLETE: 0, "total": 6}
    assert r.complete


def test_crashed_run_is_incomplete() -> None:
    cut = SAMPLE.index("FAILED\n    1. test_write10")
    r = parse_cunit(SAMPLE[:cut].splitlines())
    assert r.tests["iSCSIResiduals.Write10Residuals"].status == INCOMPLETE
    assert not r.complete


def test_interleaved_stderr_is_tolerated() -> None:
    text = "Suite: S\n  Test: A ...passed    [FAILED] noise from stderr\n  Test: B ...passed\n"
    r = parse_cunit(text.splitlines())
    assert [r.tests["S.A"].status, r.tests["S.B"].status] == [PASSED, PASSED]


def test_timeline_gives_durations() -> None:
    lines, times = parse_timeline(
        "0.5\tSuite: S\n2.0\t  Test: A ...passed\n5.5\t  Test: B ...passed\n"
    )
    r = parse_cunit(lines, times)
    assert (r.tests["S.A"].seconds, r.tests["S.B"].seconds) == (2.0, 3.5)
    assert r.suite_seconds() == {"S": 5.5}


def _res(statuses: dict[str, str]) -> Results:
    return Results(tests={n: Outcome(n, s) for n, s in statuses.items()}, summary={})


def test_compare_against_baseline() -> None:
    base = _res({"a": PASSED, "b": FAILED, "c": PASSED, "d": SKIPPED, "e": PASSED})
    mine = _res({"a": PASSED, "b": PASSED, "c": SKIPPED, "d": FAILED})
    cmp = mine.compare(base)
    assert (cmp.regressions, cmp.fixed, cmp.lost_passes, cmp.missing) == (
        ["d"],
        ["b"],
        ["c"],
        ["e"],
    )
    assert (cmp.passed, cmp.failed, cmp.base_passed, cmp.base_failed) == (2, 1, 3, 1)
    assert not cmp.ok
    assert base.compare(base).ok
    assert mine.compare(base, ignore={"d", "c"}).regressions == []


def test_timing_sensitive_tests_are_ignored_by_default() -> None:
    base = _res({"Reserve6.Logout": PASSED, "a": PASSED})
    mine = _res({"Reserve6.Logout": FAILED, "a": PASSED})
    assert mine.compare(base).ok
    assert not mine.compare(base, ignore=()).ok


def test_json_round_trip() -> None:
    r = parse_cunit(SAMPLE.splitlines())
    r.name = "x"
    again = Results.from_json(r.to_json())
    assert again.tests == r.tests and again.summary == r.summary and again.complete
