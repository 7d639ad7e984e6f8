"""PNG plots of the bench's time series (matplotlib, Agg backend: no display needed), so that a
stall shows at a glance. Needs the `bench` extra (`pip install -e '.[test,bench]'`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency(out: Path, title: str, sent: Sequence[float], latency_ms: Sequence[float],
            insert_ms: Sequence[float] = (), targets: Mapping[str, float] | None = None
            ) -> Path:
    """Each event's latency (ms) against its send time (s since the first send); the INSERT's
    own round trip beside it, and the targets as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 4.5), dpi=100)
    t0 = min(sent) if sent else 0.0
    xs = [t - t0 for t in sent]
    ax.scatter(xs, latency_ms, s=4, color="tab:blue", label="INSERT sent -> webhook received")
    if insert_ms:
        ax.scatter(xs, insert_ms, s=2, color="tab:gray", alpha=0.5,
                   label="INSERT sent -> committed")
    for (name, value), style in zip((targets or {}).items(), ("--", "-.", ":"), strict=False):
        ax.axhline(value, color="tab:red", linestyle=style, linewidth=1, label=f"{name} {value} ms")
    ax.set_xlabel("send time (s since the first INSERT)")
    ax.set_ylabel("latency (ms)")
    return _save(plt, fig, ax, out, title)


def receipts(out: Path, title: str, series: Mapping[str, Sequence[float]],
             bin_s: float = 0.1) -> Path:
    """Receipts per `bin_s` against time since each series' start (arrival times are already
    relative to that start: the burst's commit or the raw client's first request)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 4.5), dpi=100)
    for label, times in series.items():
        if not times:
            continue
        bins = int(max(times) / bin_s) + 1
        counts = [0] * bins
        for t in times:
            counts[max(0, int(t / bin_s))] += 1
        ax.step([i * bin_s for i in range(bins)], counts, where="post", label=label)
    ax.set_xlabel("time since the start (s): the burst's commit; the raw client's first request")
    ax.set_ylabel(f"receipts per {int(bin_s * 1000)} ms")
    return _save(plt, fig, ax, out, title)


def _save(plt: Any, fig: Any, ax: Any, out: Path, title: str) -> Path:
    """The finish both plots share: title, grid, legend beside the data, written to `out`."""
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
