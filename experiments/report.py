"""Printing results the way people already read them."""

from __future__ import annotations

from typing import Any

import click

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
