"""bench/lun.py keeps working: a very short run in the guest (figures are not judged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm.guest import Guest


@pytest.mark.vm
def test_bench_lun_smoke(guest: Guest, results_dir: Path) -> None:
    res = guest.module(
        "bench.lun", "--runtime", "2", "--ramp", "0", "--rounds", "1", "--size", "32M", "--json",
        timeout=900,
    )  # fmt: skip
    (results_dir / "bench-lun.json").write_text(res.stdout)
    (results_dir / "bench-lun.log").write_text(res.stderr)
    data = json.loads(res.stdout)
    assert data["not_available"] == {}
    for key in (
        "randread_vs_qcow",
        "randwrite_vs_qcow",
        "seqread_vs_qcow",
        "seqwrite_vs_qcow",
        "randread_vs_fileio",
        "randwrite_vs_fileio",
    ):
        assert isinstance(data[key], float) and data[key] > 0, key
    for contender in ("fileio", "qcow", "targetvirt"):
        raw = data["raw"][contender]
        assert raw is not None
        assert all(raw[job]["iops"] > 0 for job in ("randread", "randwrite", "seqread", "seqwrite"))
