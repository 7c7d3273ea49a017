"""The report's figure: accuracy against noise rate, training curves, gradient ratios (matplotlib)."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptcli.analysis.aggregate import METRICS, Report
from promptcli.analysis.results import NO_NOISE
from promptcli.errors import InputError

# --- the figure ----------------------------------------------------------------------------------------

_MARKERS = "osD^vPX*<>"
_LEGEND_WIDTH = 70  # characters of a legend line at fontsize 8 that fit a panel's width


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(labels)}


def _band(ax, xs, st: list[dict[str, Any]], colour, scale: float = 1.0) -> None:
    std = np.array([s["std"] if s["std"] is not None else 0.0 for s in st])
    if len(xs) > 1 and std.any():
        mean = np.array([s["mean"] for s in st])
        ax.fill_between(xs, scale * (mean - std), scale * (mean + std), color=colour, alpha=0.18, linewidth=0)


def _legend(ax, handles: list | None = None) -> None:
    """Inside the axes for a few entries; below them when there are many (in two columns when the labels
    are short). Long labels (model, settings, test set) are wrapped to fit the panel's width."""
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if not handles:
        return
    labels = [textwrap.fill(h.get_label(), _LEGEND_WIDTH, subsequent_indent="  ") for h in handles]
    if len(handles) <= 6:
        ax.legend(handles=handles, labels=labels, fontsize=8, loc="best", framealpha=0.85)
    else:
        ncol = 2 if max(len(h.get_label()) for h in handles) <= _LEGEND_WIDTH // 2 else 1
        ax.legend(
            handles=handles,
            labels=labels,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=ncol,
        )


def _plotted_accuracy(report: Report) -> bool:
    """Whether the accuracy panel has anything to draw (runs of unknown noise are in the table only)."""
    return bool(report.zero_shot) or any(c["noise_rate"] is not None for c in report.accuracy)


def has_figure(report: Report) -> bool:
    return bool(_plotted_accuracy(report) or report.curves or report.gradients)


def _rate_text(noise_type: str, rate: float | None) -> str:
    if rate is None:
        return "noise rate unknown"
    return "no label noise" if noise_type == NO_NOISE or rate == 0 else f"{noise_type} noise, rate {rate:g}"


@dataclass
class _Style:
    colour: dict[str, Any]
    marker: dict[str, str]


def _accuracy_panel(ax, report: Report, noise_type: str, style: _Style, letter: str) -> None:
    """Accuracy against noise rate: mean line, ± std band (error bar for a lone point), zero-shot line."""
    rates: set[float] = set()
    for series in sorted({c["series"] for c in report.accuracy}):
        cells = sorted(
            (
                c
                for c in report.accuracy
                if c["series"] == series and c["noise_type"] in (noise_type, NO_NOISE)
            ),
            key=lambda c: c["noise_rate"],
        )
        if not cells:
            continue
        xs = [c["noise_rate"] for c in cells]
        rates.update(xs)
        ax.errorbar(
            xs,
            [100 * c["mean"] for c in cells],
            yerr=[100 * (c["std"] or 0.0) for c in cells] if len(xs) == 1 else None,
            color=style.colour[series],
            marker=style.marker[series],
            markersize=5,
            linewidth=1.8,
            capsize=3,
            label=series,
        )
        _band(ax, xs, cells, style.colour[series], 100)
    for i, z in enumerate(report.zero_shot):
        ax.axhline(
            100 * z["mean"],
            color=str(0.25 + 0.2 * i),
            linestyle="--",
            linewidth=1.4,
            label=f"{z['label']} ({100 * z['mean']:.1f})",
        )
    if rates:
        ax.set_xticks(sorted(rates))
        ax.set_xticklabels([f"{r:g}" for r in sorted(rates)])
    metric = METRICS[report.metric]
    kind = "" if noise_type == NO_NOISE else f"{noise_type} "
    ax.set_xlabel(f"{kind}label-noise rate")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{letter}{metric.capitalize()} vs. {kind}noise rate", loc="left")
    _legend(ax)


def _curves_panel(ax, report: Report, style: _Style, letter: str) -> None:
    """Training accuracy per epoch against the given labels (solid) and the clean labels (dashed)."""
    from matplotlib.lines import Line2D

    for c in report.curves:
        col = style.colour[c["series"]]
        ax.plot(c["epochs"], [100 * s["mean"] for s in c["accuracy"]], color=col, linewidth=1.8)
        _band(ax, c["epochs"], c["accuracy"], col, 100)
        if c["clean_epochs"]:
            clean = [100 * s["mean"] for s in c["clean_accuracy"]]
            ax.plot(c["clean_epochs"], clean, color=col, linewidth=1.8, linestyle="--")
            _band(ax, c["clean_epochs"], c["clean_accuracy"], col, 100)
    handles = [
        Line2D([], [], color=style.colour[c["series"]], linewidth=2, label=c["series"]) for c in report.curves
    ]
    handles += [
        Line2D([], [], color="0.3", linewidth=1.5, label="vs. given (noisy) labels"),
        Line2D([], [], color="0.3", linewidth=1.5, linestyle="--", label="vs. clean labels"),
    ]
    _legend(ax, handles)
    ax.set_ylabel("training-set accuracy (%)")
    focus = next((c for c in report.curves if c["noise_rate"] is not None), None)
    where = _rate_text(focus["noise_type"], focus["noise_rate"]) if focus else "noise unknown"
    ax.set_title(f"{letter}Training curves ({where})", loc="left")


def _gradient_panel(ax, report: Report, style: _Style, letter: str) -> None:
    """Noisy-to-clean per-sample gradient-norm ratio per epoch (log scale when it spans > 20x)."""
    ratios = []
    for g in report.gradients:
        col = style.colour[g["series"]]
        means = [s["mean"] for s in g["ratio"]]
        ratios += means
        ax.plot(
            g["epochs"], means, color=col, marker=style.marker[g["series"]], markersize=3.5, linewidth=1.8,
            label=g["series"],
        )  # fmt: skip
        _band(ax, g["epochs"], g["ratio"], col)
    ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1.2, label="equal norms")
    positive = [r for r in ratios if r > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("noisy / clean per-sample gradient norm")
    first = report.gradients[0]
    ax.set_title(
        f"{letter}Gradient-norm ratio ({_rate_text(first['noise_type'], first['noise_rate'])})", loc="left"
    )
    _legend(ax)


# Figure formats and the metadata that would make their bytes differ from run to run.
FIGURE_FORMATS = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


# How a figure records how it was made, per format: (key for the tool, key for the command line).
MADE_BY_KEYS = {
    "png": ("Software", "Description"),
    "svg": ("Creator", "Description"),
    "pdf": ("Creator", "Subject"),
}


def figure_png(
    report: Report, title: str | None = None, dpi: int = 150, made_by: tuple[str, str] | None = None
) -> bytes:
    """The report's figure as PNG bytes."""
    return figure_bytes(report, title, "png", dpi, made_by)


def figure_bytes(
    report: Report,
    title: str | None = None,
    fmt: str = "png",
    dpi: int = 150,
    made_by: tuple[str, str] | None = None,
) -> bytes:
    """The report's figure as ``fmt`` (png, svg, pdf) bytes (no pyplot state): one panel per kind of data.

    ``made_by`` (tool and version, command line) goes into the file's metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, str]] = []
    if _plotted_accuracy(report):
        panels += [("accuracy", t) for t in (report.noise_types() or [NO_NOISE])]
    if report.curves:
        panels.append(("curves", ""))
    if report.gradients:
        panels.append(("gradients", ""))
    if not panels:
        raise InputError("nothing to draw", hint="give eval summaries, tune logs or gradstats CSVs")
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    labels = sorted({c["series"] for c in report.accuracy}) + [z["label"] for z in report.zero_shot]
    # a legend below a panel (more than 6 entries) needs room: about 0.17 in a line beyond the first ~6
    lines = sum(len(textwrap.wrap(label, _LEGEND_WIDTH)) for label in labels) if len(labels) > 6 else 0
    extra = max(0.0, 0.17 * lines - 1.1)
    fig = Figure(
        figsize=(5.6 * ncols, 4.4 * nrows + extra + (0.4 if title else 0)), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    all_series = sorted(
        {c["series"] for c in report.accuracy}
        | {c["series"] for c in report.curves}
        | {g["series"] for g in report.gradients}
    )
    # One colour and marker per series across all panels.
    style = _Style(_colours(all_series), {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(all_series)})
    for index, (ax, (kind, noise_type)) in enumerate(zip(axes, panels)):
        letter = f"({chr(ord('a') + index)}) "
        if kind == "accuracy":
            _accuracy_panel(ax, report, noise_type, style, letter)
        else:
            (_curves_panel if kind == "curves" else _gradient_panel)(ax, report, style, letter)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=13)
    buffer = io.BytesIO()
    metadata = dict(FIGURE_FORMATS[fmt])
    if made_by is not None:  # (tool and version, command line): the file records how it was made
        metadata.update(zip(MADE_BY_KEYS[fmt], made_by))
    fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata or None)
    return buffer.getvalue()
