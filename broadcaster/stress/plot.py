"""The picture of a stress run: latency per kind, delivery over time, server memory and CPU.

Drawn with matplotlib's Agg canvas straight into a PNG file, without pyplot's global state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from broadcaster.stress.clients import bucket_micros

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.axes import Axes

    from broadcaster.stress.report import Report


def plot(report: Report, path: Path) -> None:
    """Draw ``report`` into the PNG file ``path``."""
    draw(report).savefig(path, dpi=100)


def draw(report: Report) -> Figure:
    """Return the figure of ``report``: three panels, each with a title and labelled axes."""
    figure = Figure(figsize=(9, 12), layout="constrained")
    FigureCanvasAgg(figure)
    latency, delivery, memory = figure.subplots(3, 1)
    _latency(latency, report)
    _delivery(delivery, report)
    _memory(memory, report)
    figure.suptitle(f"broadcaster stress · {report.url}")
    return figure


def _latency(axes: Axes, report: Report) -> None:
    for kind in report.kinds.values():
        total = sum(kind.histogram)
        if not total:
            continue
        xs, ys, seen = [], [], 0
        for index, count in enumerate(kind.histogram):
            if count:
                seen += count
                xs.append(bucket_micros(index) / 1000)
                ys.append(seen / total)
        axes.step(xs, ys, where="post", label=f"{kind.kind} ({total} messages)")
    for fraction in (0.5, 0.9, 0.99):
        axes.axhline(fraction, color="grey", linewidth=0.5, linestyle=":")
    axes.set_xscale("log")
    axes.set_xlabel("latency, publish to receipt (ms, log scale)")
    axes.set_ylabel("fraction of messages")
    axes.set_title("Latency distribution per kind (cumulative)")
    axes.legend(loc="lower right")


def _delivery(axes: Axes, report: Report) -> None:
    for kind in report.kinds.values():
        series = kind.delivered_over_time
        if not series:
            continue
        xs = [i * report.bin_seconds for i in range(len(series))]
        ys = [math.nan if value is None else value for value in series]
        axes.plot(xs, ys, drawstyle="steps-post", label=str(kind.kind))
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("publish time (s from the start of publishing)")
    axes.set_ylabel("fraction delivered")
    axes.set_title("Messages delivered, by when they were published")
    axes.legend(loc="lower left")


def _memory(axes: Axes, report: Report) -> None:
    axes.set_title("Server memory (RSS, left axis) and CPU (right axis)")
    server = report.server
    if server is None or not server.samples:
        axes.text(0.5, 0.5, "no samples: the server was not spawned by this run", ha="center")
        axes.set_axis_off()
        return
    times = [sample[0] for sample in server.samples]
    rss = [sample[1] for sample in server.samples]
    axes.plot(times, rss, color="tab:blue", label="RSS")
    axes.set_xlabel("time (s from the start of publishing)")
    axes.set_ylabel("RSS (MiB)")
    # Headroom above the peak, so that a flat line does not run along the frame.
    axes.set_ylim(0, max(rss) * 1.25)
    end = report.publisher.seconds
    axes.axvspan(0, end, color="tab:green", alpha=0.08, label="publishing")
    cpu = axes.twinx()
    cpu_line = cpu.plot(
        times,
        [sample[2] for sample in server.samples],
        color="tab:orange",
        linewidth=0.7,
        label="CPU",
    )
    cpu.set_ylabel("CPU (% of a core)", color="tab:orange")
    cpu.set_ylim(bottom=0)
    handles, labels = axes.get_legend_handles_labels()
    axes.legend([*handles, *cpu_line], [*labels, "CPU"], loc="lower right")
