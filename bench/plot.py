"""bench/scaling.png: throughput against message size and against recipients, from the run's
scaling cells (`bench.report.scaling_series`).

matplotlib, from the optional `bench` extra (`make bench` installs it): log axes, a legend and
labels that a reader can use, with the Agg backend (no display). Without it the report says
the plot is missing instead of failing the run.
"""

from __future__ import annotations

from pathlib import Path

Series = dict[str, dict[str, list[tuple[float, float]]]]


def scaling(series: Series, path: Path) -> bool:
    """Write the plot; False (and nothing written) when matplotlib is missing or no curve has
    two points."""
    if not any(len(points) > 1 for curves in series.values() for points in curves.values()):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (by_size, by_recipients) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, points in series["size"].items():
        by_size.plot([x / 1024 for x, _ in points], [y for _, y in points], marker="o",
                     label=name)
    by_size.set(xscale="log", yscale="log", xlabel="message content size (KiB)",
                ylabel="messages per second, end to end", title="Against size (1 recipient)")
    for name, points in series["recipients"].items():
        by_recipients.plot([x for x, _ in points], [y for _, y in points], marker="o",
                           label=name)
    by_recipients.set(xscale="log", yscale="log", xlabel="recipients per message",
                      ylabel="messages per second, end to end",
                      title="Against recipients (10 KiB)")
    for axes in (by_size, by_recipients):
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    figure.suptitle("Passerelle and Postfix on one connection (make bench)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
