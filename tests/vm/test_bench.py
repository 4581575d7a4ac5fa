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
        "--cpu", timeout=900,
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
    # --cpu: each contender's CPU per operation, the handlers' own threads named
    cpu = data["cpu_us_per_op"]["randwrite"]
    # (the handlers' threads spend time in user mode: their own code, the interpreter)
    assert any(
        g.startswith("targetvirt-handler / ") and us["user"] > 0
        for g, us in cpu["targetvirt"].items()
    )
    assert any(g.startswith("tcmu-runner / ") and us["user"] > 0 for g, us in cpu["qcow"].items())


@pytest.mark.vm
@pytest.mark.ceph
def test_bench_ceph_lun_smoke(guest: Guest, results_dir: Path) -> None:
    """bench.ceph --lun keeps working: a Ceph cluster in the guest, a LUN on it, every row."""
    res = guest.module(
        "bench.ceph", "--lun", "--size", "16", "--ops", "200", "--runtime", "2",
        "--io-rounds", "1", "--agents", "0", "--objectstore", "memstore", "--json",
        timeout=900,
    )  # fmt: skip
    (results_dir / "bench-ceph.json").write_text(res.stdout)
    (results_dir / "bench-ceph.log").write_text(res.stderr)
    data = json.loads(res.stdout)
    assert data["through"] == "LUN (tcm_loop, fio)"
    for key in ("seq_vs_librados", "rand_vs_librados"):
        assert isinstance(data[key], float) and data[key] > 0, key
    rows = {r["name"]: r for r in data["rows"]}
    for name in ("1 MiB sequential write", "1 MiB sequential read", "4 KiB random write",
                 "4 KiB random read"):  # fmt: skip
        assert rows[name]["value"] > 0 and rows[name]["baseline_value"] > 0, rows[name]
