"""libiscsi compliance baselines, measured in the guest.

The fileio run is the yardstick for every other backstore (see compliance.py).  The
reference numbers for Debian's 6.1 kernel and libiscsi 1.19.0 are committed in
``baselines/``; a live run that differs from them only warns (a kernel update may change
LIO's behaviour), but an incomplete or implausible run fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.vm.compliance import Results, qcow_backstore, run_compliance
from tests.vm.guest import Guest

BASELINES = Path(__file__).with_name("baselines")


def _sane(res: Results) -> None:
    c = res.counts()
    assert res.complete, f"{res.describe()}: see {res.meta}"
    assert res.exit_code in (0, 1), f"iscsi-test-cu setup failed (exit {res.exit_code})"
    assert c["total"] >= 200, res.describe()  # libiscsi 1.19.0 has 230 tests in ALL
    assert c["passed"] >= 50, res.describe()


def _against_reference(res: Results, ref_name: str) -> None:
    ref_path = BASELINES / ref_name
    if not ref_path.exists():
        warnings.warn(f"no reference {ref_path} to compare {res.name} with", stacklevel=1)
        return
    ref = Results.from_json(json.loads(ref_path.read_text()))
    cmp = res.compare(ref)
    if cmp.regressions or cmp.fixed or cmp.missing or cmp.lost_passes:
        warnings.warn(
            f"{res.name} differs from {ref_path.name}: {cmp.describe()}; fixed: {cmp.fixed}",
            stacklevel=1,
        )


# About 1.5 min (fileio) and 3 min (qcow) on an idle 2-core host, but up to 9 min when
# the host is shared: give them more than pytest-timeout's default 900 s.
@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_fileio_baseline(guest: Guest, fileio_compliance: Results) -> None:
    """iscsi-test-cu -t ALL --dataloss --allow-sanitize against a kernel fileio LUN."""
    _sane(fileio_compliance)
    _against_reference(fileio_compliance, "fileio.json")


# Recorded, not judged, so it gives its 2-5 minutes of CI to the power-cut test:
# `tools/test -m long` runs it.
@pytest.mark.vm
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_qcow_compliance(guest: Guest, fileio_compliance: Results) -> None:
    """The same suite against tcmu-runner's qcow handler (a userspace TCMU backstore, as
    targetvirt's will be).  Recorded, not judged: tcmu-runner is known to fail more than
    fileio (TCMU reference, section 6.4).  Also proves run_compliance takes any backstore."""
    res = run_compliance(guest, qcow_backstore(), name="qcow")
    _sane(res)
    cmp = res.compare(fileio_compliance)
    (guest.results / "compliance" / "qcow-vs-fileio.txt").write_text(cmp.describe() + "\n")
    _against_reference(res, "qcow.json")
