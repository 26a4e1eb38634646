"""Plots shared by validation and the demo (matplotlib, Agg: no display needed).

Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
