"""Plots of validation, comparisons and the demo (matplotlib, Agg: no display needed).

Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cdf_plot(path: Path, series: dict[str, Sequence[float]], xlabel: str, title: str, log_x: bool = False) -> Path:
    """Empirical CDFs of each named series of values, on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for (label, values), style in zip(series.items(), ("-", "--", ":", "-."), strict=False):
        x = np.sort(np.asarray(values, dtype=np.float64))
        if x.size == 0:
            continue
        y = np.arange(1, x.size + 1) / x.size
        ax.step(x, y, where="post", linestyle=style, label=f"{label} (n={x.size})")
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="fraction of requests", title=title, ylim=(0, 1.02))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_scatter(path: Path, measured_s: np.ndarray, predicted_s: np.ndarray, kinds: Sequence[str],
                 title: str) -> Path:
    """Predicted against measured step time, one point per live step, coloured by kind, with
    the y = x line and a +/-10% band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5), constrained_layout=True)
    measured_ms, predicted_ms = measured_s * 1000, predicted_s * 1000
    kinds_arr = np.asarray(kinds)
    for kind, marker in (("decode", "."), ("prefill", "^"), ("mixed", "s")):
        sel = kinds_arr == kind
        if sel.any():
            ax.scatter(measured_ms[sel], predicted_ms[sel], s=6 if marker == "." else 12, marker=marker,
                       alpha=0.5, label=f"{kind} ({int(sel.sum())})")
    if measured_ms.size:
        lo = max(min(measured_ms.min(), predicted_ms.min()) * 0.8, 1e-3)
        hi = max(measured_ms.max(), predicted_ms.max()) * 1.25
        line = np.array([lo, hi])
        ax.plot(line, line, "k-", lw=1, label="predicted = measured")
        ax.fill_between(line, line * 0.9, line * 1.1, color="k", alpha=0.08, label="±10%")
        ax.set(xlim=(lo, hi), ylim=(lo, hi))
    ax.set(xscale="log", yscale="log", xlabel="measured step time (ms)", ylabel="predicted step time (ms)",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- a comparison across rates -----------------------------------------------------------------

STYLES: tuple[dict[str, Any], ...] = tuple(
    dict(marker=m, linestyle=ls, markersize=s)
    for m, ls, s in (("o", "-", 7), ("s", "--", 6), ("^", "-.", 6), ("x", ":", 7), ("D", "-", 5), ("v", "--", 6)))
"""Distinct markers and dashes per policy."""
SECONDS_FROM_MS = 10_000.0
"""A latency panel whose largest value reaches this many ms is drawn in seconds."""


def _curves(runs: Sequence[dict[str, Any]], labels: Sequence[str], x_key: str,
            y_key: str) -> list[tuple[str, list[tuple[float, float, float]]]]:
    """(legend label, [(x, y, rate)]) per policy sorted by rate; policies whose curves are
    identical share one curve labelled "a = b", so that none hides under another."""
    curves: list[tuple[list[str], list[tuple[float, float, float]]]] = []
    for label in labels:
        points = [(float(r[x_key]), float(r[y_key]), float(r["rate"]))
                  for r in sorted((r for r in runs if r["policy"] == label), key=lambda r: r["rate"])]
        same = next((c for c in curves if c[1] == points), None)
        if same is not None:
            same[0].append(label)
        else:
            curves.append(([label], points))
    return [(" = ".join(names), points) for names, points in curves]


def comparison_plots(out: Path, runs: Sequence[dict[str, Any]], labels: Sequence[str], goodput: bool) -> list[Path]:
    """latency-vs-throughput.png (mean and p99 TTFT and E2EL against output throughput, each
    point labelled with its request rate), throughput-vs-rate.png and, with ``goodput``,
    goodput-vs-rate.png. Returns the files written."""
    plt = _pyplot()
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (key, name) in zip(axes.flat, (("mean_ttft_ms", "mean TTFT"), ("p99_ttft_ms", "p99 TTFT"),
                                           ("mean_e2el_ms", "mean E2EL"), ("p99_e2el_ms", "p99 E2EL")), strict=True):
        curves = _curves(runs, labels, "output_throughput", key)
        seconds = max((y for _, pts in curves for _, y, _ in pts), default=0.0) >= SECONDS_FROM_MS
        scale, unit = (1e-3, "s") if seconds else (1.0, "ms")
        for i, (label, pts) in enumerate(curves):
            xs, ys = [x for x, _, _ in pts], [y * scale for _, y, _ in pts]
            ax.plot(xs, ys, label=label, **STYLES[i % len(STYLES)])
            # A saturated policy runs at one throughput whatever the rate: the labels tell its points apart.
            for k, (x, y, rate) in enumerate(zip(xs, ys, (r for _, _, r in pts), strict=True)):
                ax.annotate(f"{rate:g}", (x, y), textcoords="offset points", xytext=(4, 4 + 7 * (k % 2)),
                            fontsize=7, alpha=0.8)
        ax.set(xlabel="output throughput (tok/s)", ylabel=f"{name} ({unit})", yscale="log",
               title=f"{name} vs throughput (labels: request rate, req/s)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend()
    written.append(out / "latency-vs-throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    panels = [("output_throughput", "output throughput (tok/s)")]
    if goodput:
        panels.append(("request_goodput", "goodput (req/s)"))
    for key, name in panels:
        fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
        for i, (label, pts) in enumerate(_curves(runs, labels, "rate", key)):
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], label=label, **STYLES[i % len(STYLES)])
        ax.set(xlabel="request rate (req/s)", ylabel=name, title=f"{name} vs request rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(out / ("goodput-vs-rate.png" if key == "request_goodput" else "throughput-vs-rate.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
