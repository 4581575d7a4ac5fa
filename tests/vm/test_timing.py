"""tests/vm/timing.py on a channel folder laid out as the guest agent leaves it (no guest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm.timing import load, main, program_of


def record(channel: Path, n: int, argv: list[str], duration: float) -> None:
    cid = f"120000-1-{n:05d}"
    (channel / f"{cid}.taken.json").write_text(json.dumps({"argv": argv, "timeout": 120.0}))
    (channel / f"{cid}.result.json").write_text(json.dumps({"rc": 0, "duration": duration}))


def test_commands_are_summed_by_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    channel = tmp_path / "channel"
    channel.mkdir()
    py = "/work/main/.venv/bin/python"
    record(channel, 1, [py, "-m", "targetvirt.manage.shell", "info"], 6.0)
    record(channel, 2, [py, "-m", "targetvirt.manage.shell", "ls"], 9.0)
    record(channel, 3, ["sh", "-ec", "\n  modprobe x\n  echo y\n", "sh"], 2.5)
    record(channel, 4, ["uname", "-r"], 0.5)
    (channel / "120000-1-00005.taken.json").write_text("{}")  # still running: not counted
    programs = load(tmp_path)
    assert {n: p.durations for n, p in programs.items()} == {
        "targetvirt.manage.shell": [6.0, 9.0],
        "sh: modprobe x": [2.5],
        "uname": [0.5],
    }
    assert main([str(tmp_path), "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["15.0", "83.3%", "2", "7.50", "targetvirt.manage.shell"]
    assert out[-1].split()[:4] == ["18.0", "in", "4", "commands"]


def test_a_folder_without_records_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err
        == f"timing: {tmp_path}: no channel/ folder (not a guest run's results)\n"
    )
    (tmp_path / "channel").mkdir()
    record(tmp_path / "channel", 1, ["true"], 0.1)
    (tmp_path / "channel" / "120000-1-00001.result.json").write_text("{not json")
    assert main([str(tmp_path)]) == 1
    assert "unreadable record" in capsys.readouterr().err


def test_program_names() -> None:
    assert program_of([]) == "(no argv)"
    assert program_of(["/usr/sbin/iscsiadm", "-m", "node"]) == "iscsiadm"  # not python's -m
    assert program_of(["bash", "script.sh"]) == "bash"
