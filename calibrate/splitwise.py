"""Step timings in the splitwise-sim performance-model CSV (Patel et al., "Splitwise", ISCA 2024).

Columns: ``model, hardware, prompt_size, batch_size, token_size, ..., prompt_time, token_time,
..., tensor_parallel`` (times in ms). A row is two kinds of step: one prefill of
``batch_size`` prompts of ``prompt_size`` tokens (``prompt_time``), and the mean decode step of
that batch while it generates ``token_size`` tokens (``token_time``), whose context grows from
``prompt_size`` to ``prompt_size + token_size``: priced at its midpoint. A file holds several
models and tensor-parallel degrees; a reader picks one of each.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sim.batch import StepShape

COLUMNS = ("model", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time", "tensor_parallel")


@dataclass(frozen=True)
class SplitwiseSteps:
    """The steps of one model at one tensor-parallel degree: (shape, step_ms) pairs."""

    model: str
    tp: int
    steps: list[tuple[StepShape, float]]


def is_splitwise(path: str | Path) -> bool:
    """Whether the file's header is splitwise's (so it is not a samples CSV)."""
    try:
        with Path(path).open(newline="") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return False
    return set(COLUMNS) <= {h.strip() for h in header}


def _key(name: str) -> str:
    """Model names compared without case or separators: ``llama2-70b`` is ``llama-2-70b``."""
    return "".join(c for c in name.lower() if c.isalnum())


def read_splitwise(path: str | Path, model: str | None, tp: int | None) -> SplitwiseSteps:
    """The prefill and decode step of every row of ``model`` at ``tp``.

    ``model`` matches the file's names without case or separators; None takes the file's only
    model. ``tp`` None takes the file's only tensor-parallel degree for that model. Errors name
    the file, the line and the field, or list what the file holds."""
    path = Path(path)
    rows: list[tuple[str, str, int, dict[str, str]]] = []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                rows.append((row["model"], row["tensor_parallel"], reader.line_num, row))
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    models = sorted({m for m, _, _, _ in rows})
    if model is None:
        if len(models) != 1:
            raise ValueError(f"{path}: holds models {', '.join(models)}: name one")
        chosen = models[0]
    else:
        matches = [m for m in models if _key(m) == _key(Path(model).name.removesuffix(".json"))]
        if not matches:
            raise ValueError(f"{path}: no rows of model {model!r}; it holds {', '.join(models)}")
        chosen = matches[0]
    degrees = sorted({int(t) for m, t, _, _ in rows if m == chosen})
    if tp is None:
        if len(degrees) != 1:
            raise ValueError(f"{path}: holds {chosen} at tensor_parallel {', '.join(map(str, degrees))}: choose one "
                             "with --tp")
        tp = degrees[0]
    if tp not in degrees:
        raise ValueError(f"{path}: no rows of {chosen} at tensor_parallel {tp}; it has "
                         f"{', '.join(map(str, degrees))}")
    out = []
    for m, t, line, row in rows:
        if m != chosen or int(t) != tp:
            continue
        values = {}
        for name in ("prompt_size", "batch_size", "token_size", "prompt_time", "token_time"):
            try:
                values[name] = float(row[name])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: field {name!r} is not a number: {row[name]!r}") from None
            if not values[name] > 0:
                raise ValueError(f"{path}:{line}: field {name!r} must be > 0, got {row[name]!r}")
        prompt, batch, generated = int(values["prompt_size"]), int(values["batch_size"]), int(values["token_size"])
        out.append((StepShape(prefill_tokens=batch * prompt, prefill_seqs=batch), values["prompt_time"]))
        out.append((StepShape(decode_seqs=batch, decode_context_tokens=batch * (prompt + generated // 2)),
                    values["token_time"]))
    return SplitwiseSteps(chosen, tp, out)
