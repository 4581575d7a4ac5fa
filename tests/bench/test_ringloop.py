"""bench.ringloop: it runs the real loop over the kernel emulator, checks every command,
and its arithmetic and arguments are right (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ringloop
from bench.ringloop import Bench, Result, fit


def test_a_short_run_prints_every_row_and_the_fit(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:  # fmt: skip
    args = ["--batches", "1,3", "--wakes", "5", "--rounds", "2", "--dir", str(tmp_path), "--json"]
    assert ringloop.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"read_k1", "write_k1", "read_k3", "write_k3", "read_fit", "write_fit"}
    for key in ("read_k1", "write_k1", "read_k3", "write_k3"):
        assert data[key]["loop_us"] > 0 and data[key]["bare_us"] > 0
    assert list(tmp_path.iterdir()) == []  # its work folder is gone


def test_the_loop_really_moves_the_data_through_the_vdisk(tmp_path: Path) -> None:
    bench = Bench(str(tmp_path))
    try:
        bench.loop(4, True, 3)
        vdisk, block = bench.cluster.vd(0), bytearray(4096)
        holding = 0  # 4 KiB blocks of the vdisk that now hold the benchmark's payload
        for off in range(0, bench.blocks * 512, 4096):
            vdisk.read_into(off, [memoryview(block)])
            holding += block == bench.payload
        assert 1 <= holding <= 12  # 12 writes, to random blocks
        bench.loop(4, False, 3)
    finally:
        bench.close()


def test_a_command_that_does_not_complete_good_fails_the_run(tmp_path: Path) -> None:
    bench = Bench(str(tmp_path))
    try:
        bench.device.lun.read_only = True  # every WRITE now ends in CHECK CONDITION
        with pytest.raises(RuntimeError, match="failed"):
            bench.loop(2, True, 1)
    finally:
        bench.close()


def test_the_fit_splits_the_cost_into_per_wake_and_per_command() -> None:
    # a loop of exactly 20 µs per wake-up + 5 per command: k=1 -> 25, k=4 -> 10, k=16 -> 6.25
    rs = [Result(k, True, 20 / k + 5, 1.0) for k in (1, 4, 16)]
    per_wake, per_cmd = fit(rs, True) or (0, 0)
    assert per_wake == pytest.approx(20) and per_cmd == pytest.approx(5)
    assert fit(rs, False) is None  # no reads measured
    assert fit([Result(4, False, 9.0, 1.0)], False) is None  # one batch size: no fit
    text = ringloop.report(rs)
    assert "write: the loop costs 20.0 µs per wake-up plus 5.00 µs per command" in text


@pytest.mark.parametrize("bad", [["--batches", "0"], ["--batches", "4,x"], ["--batches", "17"],
                                 ["--wakes", "0"]])  # fmt: skip
def test_bad_arguments_are_refused_with_a_reason(
    bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        ringloop.main(bad)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
