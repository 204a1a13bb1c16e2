"""``broadcaster stress``: fake clients that load a server, and the report of what they saw.

Needs the ``stress`` extra (picows, psutil, rich, matplotlib). Reusable from tests::

    report = run_scenario(Scenario(fast=20, stalled=2, duration=2))
    assert report.kinds[Kind.FAST].delivery == 1
"""

from broadcaster.protocol import Mode
from broadcaster.stress.clients import Kind
from broadcaster.stress.messages import Snapshot
from broadcaster.stress.publisher import Via
from broadcaster.stress.report import KindReport, Report, Thresholds
from broadcaster.stress.scenario import Scenario, StressError, run_scenario

__all__ = [
    "Kind",
    "KindReport",
    "Mode",
    "Report",
    "Scenario",
    "Snapshot",
    "StressError",
    "Thresholds",
    "Via",
    "run_scenario",
]
