"""The fitted step-cost model and its held-out error.

The model is linear in a few features of the step shape, with non-negative coefficients::

    step_ms = const
            + a * prefill_tokens + b * prefill_attention + c * prefill_seqs + d * prefill_context_tokens
            + e * decode_seqs + f * decode_context_tokens
            + g * max(0, num_tokens - knee_tokens)
            + h * max(0, decode_context_tokens - knee_decode_context_tokens)

``num_tokens`` is every token the forward pass computes (prefill tokens plus one per decode);
``prefill_attention`` is :attr:`sim.batch.StepShape.attention_work` (query-key pairs).

The two hinge terms are knees, where one resource runs out and each unit starts to cost more.
``knee_tokens`` is the roofline's: below it a step is bound by reading the weights, so a token
adds little (``a`` or ``e``); above it the matmuls are compute bound and each token adds ``g``
more. ``knee_decode_context_tokens`` is where the decodes' KV no longer fits a cache level (on
CPUs). Each knee is chosen among the measured values by the fit's loss and left out (None,
its coefficient 0) when it does not lower the loss by :data:`KNEE_MIN_GAIN`. Hinges with
non-negative coefficients are convex and non-decreasing, so the prediction is non-negative and
non-decreasing in every feature and stays sane outside the grid. In the StepShape fields too,
with one exception: when ``prefill_attention_tokens`` is 0 (estimated from the sums), more
``prefill_seqs`` over the same tokens means shorter chunks and less estimated attention.

The fit minimises relative error (rows weighted by 1 / step_ms), since steps span orders of
magnitude and the error that matters is a percentage, under a robust soft-L1 loss (quadratic up
to :data:`ROBUST_SCALE`, linear beyond), started from plain non-negative least squares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, nnls

from calibrate.samples import Sample
from sim.batch import StepShape

FEATURES = ("const", "prefill_tokens", "prefill_attention", "prefill_seqs", "prefill_context_tokens",
            "decode_seqs", "decode_context_tokens", "tokens_over_knee", "decode_context_over_knee")
KINDS = ("prefill", "decode", "mixed")
MAX_KNEE_CANDIDATES = 48
KNEE_MIN_GAIN = 0.02
"""A knee is kept only if it lowers the loss by at least this fraction."""
ROBUST_SCALE = 0.05
"""Relative error beyond which the loss grows linearly, not quadratically (soft-L1): a step
disturbed by something else on the machine must not pull the whole model."""


@dataclass(frozen=True)
class StepModel:
    """Predicts a step's milliseconds; ``coefficients_ms`` maps each of :data:`FEATURES` to
    milliseconds per unit of that feature (``const``: per step)."""

    coefficients_ms: dict[str, float]
    knee_tokens: int | None = None
    knee_decode_context_tokens: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.coefficients_ms) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)}; known: {', '.join(FEATURES)}")
        for name, value in self.coefficients_ms.items():
            if not value >= 0:
                raise ValueError(f"coefficient {name!r} must be >= 0, got {value}")
        for name in ("knee_tokens", "knee_decode_context_tokens"):
            knee = getattr(self, name)
            if knee is not None and knee < 0:
                raise ValueError(f"{name} must be >= 0, got {knee}")

    def predict_ms(self, shape: StepShape) -> float:
        x = features(shape, self.knee_tokens, self.knee_decode_context_tokens)
        return float(sum(self.coefficients_ms.get(name, 0.0) * v for name, v in zip(FEATURES, x, strict=True)))

    def predict_decode_run_ms(self, shape: StepShape, n: int) -> np.ndarray:
        """``predict_ms`` of ``shape`` repeated ``n`` times with every decode one token further,
        element-wise in numpy with the same operations in the same order (identical values)."""
        context = shape.decode_context_tokens + np.arange(n, dtype=np.int64) * shape.decode_seqs
        columns: dict[str, np.ndarray] = {"decode_context_tokens": context.astype(np.float64)}
        if self.knee_decode_context_tokens is not None:
            columns["decode_context_over_knee"] = np.maximum(0.0, context - self.knee_decode_context_tokens)
        total = np.zeros(n)
        for name, v in zip(FEATURES, features(shape, self.knee_tokens, self.knee_decode_context_tokens),
                           strict=True):
            total = total + self.coefficients_ms.get(name, 0.0) * (columns[name] if name in columns else v)
        return total

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coefficients_ms": dict(self.coefficients_ms),
                "knee_tokens": self.knee_tokens, "knee_decode_context_tokens": self.knee_decode_context_tokens}


def _hinge(value: float, knee: int | None) -> float:
    return 0.0 if knee is None else max(0.0, value - knee)


def features(shape: StepShape, knee_tokens: int | None = None,
             knee_decode_context_tokens: int | None = None) -> tuple[float, ...]:
    """The model's feature vector for one step, in :data:`FEATURES` order."""
    return (1.0, float(shape.prefill_tokens), float(shape.attention_work), float(shape.prefill_seqs),
            float(shape.prefill_context_tokens), float(shape.decode_seqs), float(shape.decode_context_tokens),
            _hinge(shape.num_tokens, knee_tokens), _hinge(shape.decode_context_tokens, knee_decode_context_tokens))


def _solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative robust fit of relative residuals; returns coefficients and the loss."""
    a = x / y[:, None]  # (samples, features), each row divided by its target
    scale = np.abs(a).max(axis=0)
    used = scale > 0
    coef = np.zeros(x.shape[1])
    if not used.any():
        return coef, float(len(y))
    # Columns scaled to unit max: the attention feature is ~1e6 times the constant's.
    a = a[:, used] / scale[used]
    start, _ = nnls(a, np.ones(len(y)), maxiter=50 * x.shape[1])
    fit = least_squares(lambda c: a @ c - 1, start, jac=lambda c: a, bounds=(0, np.inf), loss="soft_l1",
                        f_scale=ROBUST_SCALE, method="trf")
    coef[used] = np.maximum(fit.x, 0) / scale[used]
    return coef, float(fit.cost)


def _knee_candidates(values: np.ndarray) -> list[int]:
    distinct = np.unique(values)
    inner = distinct[(distinct > distinct.min()) & (distinct < distinct.max())]
    if len(inner) > MAX_KNEE_CANDIDATES:
        inner = np.unique(inner[np.linspace(0, len(inner) - 1, MAX_KNEE_CANDIDATES).round().astype(int)])
    return [int(v) for v in inner]


def fit_step_model(samples: Sequence[Sample]) -> StepModel:
    """Fit :class:`StepModel` to measured steps (at least one).

    The knees are searched one at a time (tokens first, then decode context), each over the
    measured values with the other knee held.
    """
    if not samples:
        raise ValueError("cannot fit a cost model to zero samples")
    shapes = [s.shape for s in samples]
    y = np.array([s.step_ms for s in samples], dtype=float)
    x = np.array([features(sh) for sh in shapes])  # (samples, features); hinge columns 0 for now
    coef, best = _solve(x, y)
    knees: list[int | None] = [None, None]
    for k, values in enumerate((np.array([sh.num_tokens for sh in shapes]),
                                np.array([sh.decode_context_tokens for sh in shapes]))):
        column = len(FEATURES) - 2 + k
        kept = x[:, column].copy()
        for knee in _knee_candidates(values):
            x[:, column] = np.maximum(0, values - knee)
            c, loss = _solve(x, y)
            if loss < best * (1 - KNEE_MIN_GAIN) and c[column] > 0:
                coef, best, knees[k], kept = c, loss, knee, x[:, column].copy()
        x[:, column] = kept
    return StepModel(dict(zip(FEATURES, (float(c) for c in coef), strict=True)), knees[0], knees[1])


# -- error --------------------------------------------------------------------------------------
def error_table(samples: Sequence[Sample], predicted_ms: Sequence[float]) -> dict[str, dict]:
    """Absolute percentage error per kind of step (and ``all``): count, median, p90."""
    table: dict[str, dict] = {}
    ape = np.array([abs(p - s.step_ms) / s.step_ms * 100 for s, p in zip(samples, predicted_ms, strict=True)])
    kinds = np.array([s.kind for s in samples])
    for kind in (*KINDS, "all"):
        sel = ape if kind == "all" else ape[kinds == kind]
        table[kind] = {
            "n": len(sel),
            "median_ape_pct": float(np.median(sel)) if len(sel) else None,
            "p90_ape_pct": float(np.percentile(sel, 90)) if len(sel) else None,
        }
    return table


def held_out_predictions(samples: Sequence[Sample], folds: int = 5, seed: int = 0) -> list[float] | None:
    """k-fold cross-validation: each sample predicted by a model fitted without its fold.

    Folds are stratified by kind (prefill, decode, mixed) and drawn with ``seed``, so the split
    is deterministic. Returns None with fewer than two samples.
    """
    n = len(samples)
    if n < 2:
        return None
    folds = min(folds, n)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=int)
    offset = 0
    for kind in (*KINDS, "empty"):
        idx = np.array([i for i, s in enumerate(samples) if s.kind == kind], dtype=int)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    predicted = [0.0] * n
    for f in range(folds):
        train = [s for s, k in zip(samples, fold_of, strict=True) if k != f]
        model = fit_step_model(train)
        for i in np.flatnonzero(fold_of == f):
            predicted[i] = model.predict_ms(samples[int(i)].shape)
    return predicted


@dataclass(frozen=True)
class FitResult:
    model: StepModel
    held_out: dict[str, dict] | None
    in_sample: dict[str, dict]
    folds: int


def fit(samples: Sequence[Sample], folds: int = 5, seed: int = 0) -> FitResult:
    """Held-out error by k-fold, then the final model fitted on every sample."""
    held = held_out_predictions(samples, folds, seed)
    model = fit_step_model(samples)
    in_sample = error_table(samples, [model.predict_ms(s.shape) for s in samples])
    return FitResult(model, None if held is None else error_table(samples, held), in_sample,
                     min(folds, len(samples)))


def format_error_table(table: dict[str, dict]) -> str:
    lines = [f"{'steps':<8} {'n':>5} {'median %':>9} {'p90 %':>8}"]
    for kind, row in table.items():
        med = "-" if row["median_ape_pct"] is None else f"{row['median_ape_pct']:.2f}"
        p90 = "-" if row["p90_ape_pct"] is None else f"{row['p90_ape_pct']:.2f}"
        lines.append(f"{kind:<8} {row['n']:>5} {med:>9} {p90:>8}")
    return "\n".join(lines)
