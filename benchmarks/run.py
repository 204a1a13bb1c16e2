"""broadcaster against the classic ConnectionManager, scenario by scenario, in one run.

Each scenario runs against a server it spawns, one server at a time on this machine: the
classic pattern (``benchmarks/classic.py``) and broadcaster with its default settings, in
rotation (classic, broadcaster, classic, broadcaster, ...) ``--repeat`` times. Every figure is
the median of those runs with the lowest and highest in brackets, and targets are judged on
medians. Where the machine has two cores or more, the server runs on the first and the load
generator on the others. Prints a markdown table::

    .venv/bin/python benchmarks/run.py                  # every scenario, 3 rounds: ~25 min
    .venv/bin/python benchmarks/run.py --only handshakes,kernel --repeat 1 --json out.json

Rates are wall-clock and move with whatever else runs on the machine; the server's CPU time
(user + system, from just before the first publish to just after the last receipt) per
million deliveries, and per handshake, moves much less: compare those, and the columns of
one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from handshakes import handshakes
from measure import Bench, Row, place, table
from pressure import churn_latency, kernel
from publishing import publishing
from scenarios import churn, connections, history, idle, isolation, memory, throughput

if TYPE_CHECKING:
    from collections.abc import Callable

SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "isolation": isolation,
    "memory": memory,
    "throughput": throughput,
    "history": history,
    "churn": churn,
    "connections": connections,
    "idle": idle,
    "handshakes": handshakes,
    "churn-latency": churn_latency,
    "kernel": kernel,
    "publishing": publishing,
}


def main() -> int:
    """Run the chosen scenarios; exit 1 if a target is not met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS), default=""
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rotated runs of each scenario (default 3)"
    )
    parser.add_argument("--json", type=Path, help="write every run's full result here")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name] or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    placement = place()
    print(f"bench: {placement.note}", file=sys.stderr, flush=True)
    bench = Bench(args.repeat, placement, args.json)
    rows = []
    for name in chosen:
        rows += SCENARIOS[name](bench)
    print(
        f"Medians of {args.repeat} rotated runs, lowest to highest in brackets; {placement.note}.\n"
    )
    print(table(rows))
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
