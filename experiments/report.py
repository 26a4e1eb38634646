"""Printing results the way people already read them: vLLM's summary block, and plain text
tables of several runs side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from experiments.comparison import ratio_to_static

WIDTH = 50


def _rule(title: str, fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}" if title else fill * WIDTH


def _metric_block(summary: dict[str, Any], key: str, label: str) -> list[str]:
    lines = []
    for stat, name in (("mean", "Mean"), ("median", "Median")):
        lines.append(f"{f'{name} {label} (ms):':<40}{summary[f'{stat}_{key}_ms']:>10.2f}")
    for k, v in summary.items():
        if k.startswith("p") and k.endswith(f"_{key}_ms"):
            lines.append(f"{f'P{k[1:-len(key) - 4]} {label} (ms):':<40}{v:>10.2f}")
    return lines


def print_summary(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> None:
    """The layout of `vllm bench serve`'s result block."""
    rows = [
        ("Successful requests:", f"{summary['completed']}"),
        ("Rejected requests:", f"{summary['rejected']}"),
        ("Benchmark duration (s):", f"{summary['duration']:.2f}"),
        ("Total input tokens:", f"{summary['total_input_tokens']}"),
        ("Total generated tokens:", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s):", f"{summary['request_throughput']:.2f}"),
    ]
    if summary.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s):", f"{summary['request_goodput']:.2f}"))
    rows += [
        ("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}"),
        ("Preemptions:", f"{summary['num_preemptions']}"),
    ]
    lines = [_rule(f" {title} ", "=")]
    lines += [f"{k:<40}{v:>10}" for k, v in rows]
    for key, label, head in (("ttft", "TTFT", "Time to First Token"),
                             ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                             ("itl", "ITL", "Inter-token Latency"),
                             ("e2el", "E2EL", "End-to-end Latency")):
        lines.append(_rule(head))
        lines += _metric_block(summary, key, label)
    lines.append(_rule("", "="))
    for reason, count in summary.get("reject_reasons", {}).items():
        lines.append(f"rejected x{count}: {reason}")
    click.echo("\n".join(lines))


# -- tables of several runs ----------------------------------------------------------------------

SECONDS_FROM_MS = 10_000.0
"""A latency row whose largest value reaches this many ms is printed in seconds (an overloaded
run's latencies run to millions of ms, which nobody reads)."""

# (row label, summary key, format); the rows of a comparison table. Labels of latencies end in
# "(ms)", which a row printed in seconds replaces.
TABLE_ROWS: list[tuple[str, str, str]] = [
    ("offered rate (req/s)", "offered_rate", ".2f"),
    ("completed", "completed", "d"),
    ("rejected", "rejected", "d"),
    ("request throughput (req/s)", "request_throughput", ".2f"),
    ("output throughput (tok/s)", "output_throughput", ".1f"),
    ("mean TTFT (ms)", "mean_ttft_ms", ".1f"),
    ("p99 TTFT (ms)", "p99_ttft_ms", ".1f"),
    ("mean TPOT (ms)", "mean_tpot_ms", ".2f"),
    ("p99 TPOT (ms)", "p99_tpot_ms", ".2f"),
    ("p99 ITL (ms)", "p99_itl_ms", ".2f"),
    ("mean E2EL (ms)", "mean_e2el_ms", ".1f"),
    ("preemptions", "num_preemptions", "d"),
]


def format_cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "d":
        return str(int(value))
    return format(value, fmt)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def latency_row(label: str, values_ms: Sequence[float | None], fmt: str) -> list[str]:
    """A row of latencies in ms, or in seconds (label "(s)") when one reaches :data:`SECONDS_FROM_MS`."""
    if max((v for v in values_ms if v is not None), default=0.0) >= SECONDS_FROM_MS:
        return [label.replace("(ms)", "(s)"), *(format_cell(None if v is None else v / 1000, ".1f")
                                               for v in values_ms)]
    return [label, *(format_cell(v, fmt) for v in values_ms)]


def comparison_table(runs: Sequence[dict[str, Any]], goodput: bool) -> str:
    """Rows = metrics, columns = policies, for runs at one rate."""
    rows = []
    for label, key, fmt in TABLE_ROWS:
        if key.endswith("_ms"):
            rows.append(latency_row(label, [r[key] for r in runs], fmt))
        else:
            rows.append([label, *(format_cell(r[key], fmt) for r in runs)])
    if goodput:
        rows.append(["goodput (req/s)", *(format_cell(r["request_goodput"], ".2f") for r in runs)])
    ratios = ratio_to_static(runs)
    if ratios:
        rows.append(["output throughput vs static", *(format_cell(ratios[r["policy"]], ".2f") + "x" for r in runs)])
    return format_table(["", *(r["policy"] for r in runs)], rows)


def throughput_table(runs: Sequence[dict[str, Any]], labels: Sequence[str], rates: Sequence[float]) -> str:
    """Rows = rates, columns = policies: output throughput and its ratio to static."""
    by_key = {(r["policy"], r["rate"]): r for r in runs}
    rows = []
    for rate in rates:
        at_rate = [by_key[(label, rate)] for label in labels]
        ratios = ratio_to_static(at_rate)
        cells = [f"{r['output_throughput']:.1f}" + (f" ({format_cell(ratios[r['policy']], '.2f')}x)" if ratios else "")
                 for r in at_rate]
        rows.append([f"{rate:g}", *cells])
    return format_table(["rate (req/s)", *labels], rows)
