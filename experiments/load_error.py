"""How the TPOT error grows with load inside a validation run: each request's live TPOT over its
simulated TPOT, binned by how many requests were decoding beside it in the live run.

With every step priced right the ratio is 1 in every bin. An error in the crowds only points at
a price that grows with the batch, or at a uniform under-price the live queue amplified (near
saturation a request in a crowd that the live run built and the simulation did not shows a ratio
above 1 either way): read it beside the same workload at a lower load, where no queue builds.
Reads the runs ``validate`` and ``fidelity.py`` write: a directory with ``validation.json``,
``sim/requests.csv`` and ``live*/requests.csv``, or a fidelity output's ``cells/``, and prints
one line per run::

    python experiments/load_error.py runs/fidelity-vllm
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("id", "status", "first_token_s", "finish_s", "tpot_ms")
"""What this reads of a run's ``requests.csv``."""


class LoadErrorInput(ValueError):
    """A run directory without what this reads."""


@dataclass(frozen=True)
class Bin:
    """Requests whose live decode had ``low``..``low + width - 1`` requests decoding beside it."""

    low: int
    width: int
    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def describe(self) -> str:
        return f"{self.low}-{self.low + self.width - 1}: x{self.median:.2f} ({len(self.ratios)})"


def csv_rows(path: Path, columns: Sequence[str],
             writer: str = "a run of servesim validate") -> list[tuple[int, dict[str, str]]]:
    """The rows of a run's CSV file with their line numbers; LoadErrorInput when it is missing
    or lacks one of ``columns``."""
    if not path.is_file():
        raise LoadErrorInput(f"{path}: missing ({writer} writes it)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise LoadErrorInput(f"{path}: no column {missing[0]!r}")
        return list(enumerate(reader, start=2))


def read_decoding(path: Path) -> list[tuple[str, float, float, float]]:
    """(id, first token s, finish s, TPOT ms) of the finished requests of a run's ``requests.csv``
    that decoded (more than one token)."""
    out = []
    for line, r in csv_rows(path, COLUMNS):
        if r["status"] != "finished" or not r["tpot_ms"]:
            continue
        try:
            out.append((r["id"], float(r["first_token_s"]), float(r["finish_s"]), float(r["tpot_ms"])))
        except ValueError:
            raise LoadErrorInput(f"{path}, line {line}: first_token_s, finish_s or tpot_ms "
                                 "is not a number") from None
    return out


def concurrency(start: float, end: float, intervals: Sequence[tuple[float, float]]) -> float:
    """The mean number of ``intervals`` open over ``start``..``end``."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals) / (end - start)


def load_bins(run: Path, width: int = 10) -> list[Bin]:
    """The run's live/simulated TPOT ratios over every live run, binned by live concurrency."""
    sim = {i: tpot for i, _, _, tpot in read_decoding(run / "sim" / "requests.csv") if tpot > 0}
    lives = sorted(p for p in run.glob("live*") if p.is_dir())
    if not lives:
        raise LoadErrorInput(f"{run}: no live run (live/requests.csv)")
    found: dict[int, list[float]] = {}
    for live in lives:
        rows = read_decoding(live / "requests.csv")
        spans = [(a, b) for _, a, b, _ in rows]
        for i, a, b, tpot in rows:
            if b > a and i in sim:
                low = int(concurrency(a, b, spans) // width) * width
                found.setdefault(low, []).append(tpot / sim[i])
    return [Bin(low, width, tuple(found[low])) for low in sorted(found)]


def runs_under(path: Path) -> list[Path]:
    """``path`` itself when it is one run, else the runs in it (``cells/`` of a fidelity output)."""
    if (path / "validation.json").is_file():
        return [path]
    base = path / "cells" if (path / "cells").is_dir() else path
    runs = sorted(p for p in base.iterdir() if (p / "validation.json").is_file()) if base.is_dir() else []
    if not runs:
        raise LoadErrorInput(f"{path}: neither a validation run nor a directory of them")
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a validate output, or a fidelity output (its cells/)")
    p.add_argument("--width", type=int, default=10, help="requests per concurrency bin [default: 10]")
    args = p.parse_args(argv)
    if args.width < 1:
        p.error("--width must be at least 1")
    return args


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    try:
        runs = runs_under(args.runs)
        lines = [(run.name, load_bins(run, args.width)) for run in runs]
    except LoadErrorInput as e:
        echo(f"error: {e}")
        return 2
    echo("live TPOT / simulated TPOT, the median per bin of live concurrency (requests decoding beside it, "
         "itself included; in brackets, how many requests)")
    name_width = max(len(name) for name, _ in lines)
    for name, bins in lines:
        echo(f"{name.ljust(name_width)}  " + "  ".join(b.describe() for b in bins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
