"""``servesim traces``: inspect request traces (embedded by name, or files)."""

from __future__ import annotations

from typing import Any

import click

from sim.traces import EMBEDDED_TRACES, TRACE_FORMATS, load_trace, trace_stats


@click.group(name="traces", help="Inspect request traces: embedded ones by name, or trace files.")
def traces() -> None:
    pass


@traces.command("list")
def list_traces() -> None:
    """List the embedded traces, loadable by exact name."""
    for name, file in EMBEDDED_TRACES.items():
        click.echo(f"{name}\tsim/data/{file}")


@traces.command("show")
@click.argument("trace", metavar="NAME|PATH")
@click.option(
    "--format", "fmt", type=click.Choice(TRACE_FORMATS), default="auto", show_default=True, help="Trace file format."
)
def show(trace: str, fmt: str) -> None:
    """Print a trace's size, rate, burstiness and length percentiles."""
    try:
        loaded = load_trace(trace, fmt)
    except ValueError as e:  # TraceError included: the message names file, line and field
        raise click.ClickException(str(e)) from None
    click.echo(format_stats(trace_stats(loaded)))


def format_stats(stats: dict[str, Any]) -> str:
    """``trace_stats`` as an aligned plain-text table."""
    lines = [
        f"trace            {stats['source']}",
        f"format           {stats['fmt']}",
        f"rows             {stats['rows']:,}",
    ]
    if stats["clamped"]:
        lines.append(f"clamped          {stats['clamped']:,} rows with a zero length raised to 1")
    if stats["span_s"] is None:
        lines.append("arrivals         none (length-only trace)")
    else:
        lines.append(f"span             {stats['span_s']:,.1f} s")
        lines.append(f"rate             {_number(stats['rate_rps'], '.2f')} req/s")
        lines.append(f"inter-arrival CV {_number(stats['interarrival_cv'], '.2f')}")
        lines.append(f"gamma shape k    {_number(stats['gamma_k'], '.2f')}  (1 = Poisson, < 1 burstier)")
    keys = ("p50", "p90", "p99", "max", "mean")
    lines.append("")
    lines.append(f"{'tokens':<8}" + "".join(f"{k:>10}" for k in keys))
    for label, key in (("prompt", "prompt_tokens"), ("output", "output_tokens")):
        lines.append(f"{label:<8}" + "".join(f"{stats[key][k]:>10,.1f}" for k in keys))
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
