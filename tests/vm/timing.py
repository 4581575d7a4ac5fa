"""Where a guest run's time went, from the command records the agent leaves in ``channel/``.

    python -m tests.vm.timing .vm-results/<date>-<pid> [--top N]

Every command the harness ran in the guest is a ``<id>.taken.json`` (what: ``argv``) and a
``<id>.result.json`` (how long: ``duration``).  This sums the durations per program, with
``python -m MODULE`` counted as MODULE and shell scripts by their first line, and prints
the programs that took longest.  CI's 90 minutes are mostly spent here: the table says
which helpers are worth making cheaper (a Python start costs seconds under TCG).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Program:
    name: str
    durations: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.durations)


def program_of(argv: list[str]) -> str:
    """The name a command is counted under."""
    if not argv:
        return "(no argv)"
    name = Path(argv[0]).name
    if name.startswith("python") and "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if name in ("sh", "bash") and len(argv) > 2 and argv[1].startswith("-"):
        first = next((line.strip() for line in argv[2].splitlines() if line.strip()), "")
        return f"{name}: {first[:40]}"
    return name


def load(results: Path) -> dict[str, Program]:
    """The finished commands of a run, by program (spawned daemons count 0: their start)."""
    channel = results / "channel"
    if not channel.is_dir():
        raise ValueError(f"{results}: no channel/ folder (not a guest run's results)")
    programs: dict[str, Program] = {}
    for done in sorted(channel.glob("*.result.json")):
        taken = done.with_name(done.name.replace(".result.json", ".taken.json"))
        try:
            argv = json.loads(taken.read_text()).get("argv") or []
            duration = float(json.loads(done.read_text()).get("duration") or 0.0)
        except (OSError, ValueError) as e:
            raise ValueError(f"{done.name}: unreadable record: {e}") from None
        name = program_of([str(a) for a in argv])
        programs.setdefault(name, Program(name)).durations.append(duration)
    return programs


def table(programs: dict[str, Program], top: int) -> str:
    rows = sorted(programs.values(), key=lambda p: -p.total)
    total = sum(p.total for p in rows)
    lines = [f"{'seconds':>8}  {'share':>5}  {'runs':>5}  {'median':>7}  program"]
    for p in rows[:top]:
        lines.append(
            f"{p.total:8.1f}  {p.total / total if total else 0:5.1%}  {len(p.durations):5d}  "
            f"{statistics.median(p.durations):7.2f}  {p.name}"
        )
    lines.append(f"{total:8.1f}  in {sum(len(p.durations) for p in rows)} commands")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a .vm-results/<date>-<pid> folder")
    parser.add_argument("--top", type=int, default=20, help="how many programs to list")
    args = parser.parse_args(argv)
    try:
        programs = load(args.results)
    except ValueError as e:
        print(f"timing: {e}", file=sys.stderr)
        return 1
    print(table(programs, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
