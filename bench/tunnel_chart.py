"""The chart of ``bench/tunnel.py``: one small bar chart per measurement, a bar per tunnel.

Small multiples because the units differ (Mbit/s, datagrams/s, ms, CPU %, MiB): one shared
axis would flatten everything but the largest. The plain veth is left out of the bars (it
is 10x faster than any tunnel and would squash them) and quoted in each panel's title.
Drawn with matplotlib, a bench-only dependency (the ``chart`` extra, installed by
``make bench``): a maintained plotting library handles scales, labels and SVG details that
hand-written SVG would have to get right by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunnel_report import ROWS, fmt, get

PANELS = ("tcp1", "tcp4", "udp64", "ping", "cpu_per_gbit_tcp1", "vmrss")
BARS = ("secureiod", "wireguard-go", "tinc", "nebula")
COLOURS = {
    "secureiod": "#1f6feb",
    "wireguard-go": "#8a8a8a",
    "tinc": "#b07d2b",
    "nebula": "#6e40c9",
}


def write_chart(results: dict[str, Any], path: Path) -> str | None:
    """Write the chart to ``path`` (format from its suffix); the reason if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (make bench installs the 'chart' extra)"

    targets = results["targets"]
    rows = {row.key: row for row in ROWS}
    plt.rcParams["svg.hashsalt"] = "secureiod-bench"  # stable ids: the SVG diffs cleanly
    plt.rcParams["svg.fonttype"] = "none"  # text as text: a 4x smaller, greppable file
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), layout="constrained")
    for ax, key in zip(axes.flat, PANELS, strict=True):
        row = rows[key]
        values = [row.value(targets.get(name)) for name in BARS]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(BARS, heights, color=[COLOURS[n] for n in BARS])
        for bar, value, name in zip(bars, values, BARS, strict=True):
            label = "skipped" if get(targets.get(name), "skipped") else "-"
            text = label if value is None else fmt(value, 3 if key == "ping" else 0)
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        veth = row.value(targets.get("veth"))
        label = row.label.replace("A / B", "A + B")  # a bar shows the sum of both ends
        title = f"{label}\n({row.better} is better"
        title += f"; veth alone {fmt(veth, 3 if key == 'ping' else 0)})" if veth else ")"
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(y=0.15)
    machine = results["machine"]
    fig.suptitle(
        f"make bench: tunnels on one veth, {machine['cores']} cores, {machine['cpu']}; "
        f"{machine.get('wireguard-go') or 'no wireguard-go'}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)
    return None
