"""Two gateways on Ceph serve one vdisk through dm-multipath (issue 7, must-show 2).

The scenario runs in the guest as one command (tests/vm/multipath.py: the Ceph daemons
live as long as the process that started them); this test checks what it reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.vm.guest import Guest

WHERE = "/run/ram/tv-multipath"


def _clean(fio: dict[str, Any]) -> bool:
    return bool(fio["rc"] == 0 and fio["err0"] and not fio["bad"])


@pytest.mark.vm
@pytest.mark.ceph
@pytest.mark.timeout(2400)
def test_two_gateways_through_multipath(guest: Guest, results_dir: Path) -> None:
    try:
        res = guest.module("tests.vm.multipath", WHERE, timeout=2000, check=False)
    finally:
        guest.run(["sh", "-c", f"cp -r {WHERE}/*.log {WHERE}/gw1 {WHERE}/gw2 "
                   f"{results_dir}/ 2>/dev/null; true"], check=False)  # fmt: skip
    (results_dir / "scenario.out").write_text(res.stdout + res.stderr)
    assert res.ok, res.describe()
    out = json.loads([ln for ln in res.stdout.splitlines() if ln.strip()][-1])
    (results_dir / "scenario.json").write_text(json.dumps(out, indent=2))

    # ALUA as configured: gateway 1 active/optimized (alua prio 50), gateway 2
    # active/non-optimized (10); multipath groups the paths by that priority
    prio = {p["dev"]: int(p["prio"]) for p in out["paths"]}
    disks = out["disks"]
    assert set(disks) == {"gw1", "gw2"}, out["paths"]
    assert (prio[disks["gw1"]], prio[disks["gw2"]]) == (50, 10), out["paths"]
    assert out["topology"].count("policy=") == 2, out["topology"]  # two path groups
    assert "active/optimized" in out["rtpg"]["gw1"], out["rtpg"]
    assert "active/non optimized" in out["rtpg"]["gw2"], out["rtpg"]

    # the gateways hear the controllers' commands by RADOS watch/notify
    assert out["sinks"] == "sinks NotifySink NotifySink", out["sinks"]
    assert out["c_sinks"] == "sinks NotifySink NotifySink", out["c_sinks"]

    # (a) live snapshot under fio: verify passes; the I/O went through gateway 1 only
    assert _clean(out["a"]), out["a"]
    assert out["snapshot"].startswith("window"), out["snapshot"]
    assert out["a_writes"]["gw1"] > 0 and out["a_writes"]["gw2"] == 0, out["a_writes"]

    # (b) gateway 1 killed: its path failed, the writes moved to gateway 2
    assert out["b_writes_while_down"]["gw2"] >= 20, out
    down = {p["dev"]: p["dm_state"] for p in out["b_paths_down"]}
    assert down == {disks["gw1"]: "failed", disks["gw2"]: "active"}, out["b_paths_down"]
    assert _clean(out["b"]), out["b"]

    # (c) the active controller killed: the standby took over, both agents follow it
    assert out["c_agents"].split()[1:] == ["gw1", "gw2"], out["c_agents"]
    assert _clean(out["c"]), out["c"]
    assert out["c_snapshot"].startswith("window"), out["c_snapshot"]
    # the restarted gateway 1 is back in use (failback), and alone: no ping-pong
    assert out["c_writes"]["gw1"] > 0 and out["c_writes"]["gw2"] == 0, out["c_writes"]
    assert all(p["dm_state"] == "active" for p in out["paths_end"]), out["paths_end"]

    # nothing acknowledged in any phase was lost by a later fault
    assert all(_clean(r) for r in out["reverify"]), out["reverify"]
