"""The fitted step-cost model and its held-out error.

The model is linear in a few features of the step shape, with non-negative coefficients: the
roofline's terms (:mod:`sim.roofline`), each with a fitted price instead of a datasheet rate::

    step_ms = const                                           per-step overhead, weights read once
            + r * multi_row                                   matrix products of two rows or more
            + z * pad_rows                                    zero rows the engine pads products with
            + a * prefill_tokens + e * decode_seqs            FLOPs of the tokens (+ per-decode work)
            + b * prefill_attention                           prefill attention FLOPs (query-key pairs)
            + d * prefill_context_tokens + f * decode_context_tokens   KV bytes read by attention
            + c * prefill_seqs + p * prefill_batch_seqs       per-sequence prefill work
            + s * decode_batch_context                        decodes attended in padded groups
            + g * max(0, num_tokens - knee_tokens)            compute bound above the roofline knee
            + k * max(0, num_tokens - knee_cache_tokens)      activations beyond an on-chip cache
            + h * max(0, decode_context_tokens - knee_decode_context_tokens)   KV beyond a cache

A dense model reads its weights once per step whatever the batch, so their bytes are in
``const``; a coefficient is ms per unit of its feature, the unit's bytes or FLOPs being fixed by
the model, so the linear fit needs no model dimensions.

``multi_row`` is 1 when the forward pass computes two tokens or more, 0 for a lone decode:
where one row runs as matrix-vector products and more rows as blocked matrix products, a
second row costs a step more than any row after it. Measured on this project's 2-core CPU
(the small model in float32, with 2 and 3 rows padded to 4, see :mod:`runtime.model`),
decode steps of 1, 2, 4, 8 and 16 sequences took 40, 67, 70, 77 and 103 ms: a jump of 27 ms,
then about 2 ms a sequence. Before the feature (and the padding) the fit drew one line
through both regimes: on the live steps of 16 validation cells the calibration never saw, a
lone decode was priced 37% high and 2-4 decodes 26% low (median signed error); after both,
+8% and +0.7% (the fidelity table of that session). The feature is non-decreasing in
the tokens, and constant over a decode run.

``pad_rows`` is the zero rows the engine adds to a step's products: ``padded(num_tokens) -
num_tokens`` under the engine's padding (:attr:`StepModel.pad_rows`, from
:func:`runtime.model.default_pad_rows` when calibrated; none for a profile fitted from step
timings). There the kernel computes the padded count, so a step of 8 decodes costs about what
one of 16 does. Measured on the 2-core CPU with the small model, 7 to 15 rows padded to 16:
decode steps of 7 to 15 sequences took 45-53 ms and 16 took 51 ms, where 4 took 34; a line
through ``decode_seqs`` alone priced 8-15 sequences 16-29% low. The head computes only the
sampled rows (one per sequence), so a mixed step of a long chunk and 8 decodes pads the head
but not the layers: the feature leaves that out (under 1% of such a step on that CPU).

``num_tokens`` is every token the forward pass computes (prefill tokens plus one per decode);
``prefill_attention`` is :attr:`sim.batch.StepShape.attention_work` (query-key pairs);
``prefill_batch_seqs`` is ``max(0, prefill_seqs - 1)``, the prefills that share a step with
another: on real A100 steps (``../shared/gpu-steps/``, Llama-2-70B at TP 2, 4 and 8) a batch of
b prompts of 512 tokens costs more than one prompt of 512 b tokens (16 x 512 tokens: 8% more
at TP 2, 27% at TP 4, 34% at TP 8, although it has 16 times less attention work), while a lone
prompt pays only a small per-sequence cost; a line through ``prefill_seqs`` cannot fit both,
and without the feature the fit put batched prefills up to 16-19% low. ``knee_cache_tokens``
is a second bend in the tokens: on those steps the cost per token rises again past about 2048
tokens (plausibly where the activations, 2048 x 8192 hidden x 2 bytes = 32 MiB, outgrow the
A100's 40 MiB L2), on top of the compute knee at a few hundred tokens.
``decode_batch_context`` is ``decode_context_tokens * (1 - 1 / decode_seqs)`` (0 without decodes):
the context a decode batch carries beyond one sequence's share. A lone decode reads its own
cache; a batch of decodes of different lengths is attended in padded groups (and spills more
cache), so a context token costs more the more sequences share the step. Measured live steps
on CPU show it: a single decode's context costs about half per token what a large batch's does,
which no (seqs, context) line fits at both ends. The feature is 0 for one sequence and tends
to the whole context for many, and it stays linear in the context as a decode run advances.

What each feature earns on steps the fit never saw is measured by
``experiments/fit_transfer.py`` (its ablation table): a feature that earned nothing on any
measured device would be dropped here. The NNLS fit itself prices a feature that does not
help at 0 (most GPU fits have no ``prefill_context_tokens`` or ``decode_batch_context``).

Each feature is defined once, in :data:`FEATURES`: the fit's design matrix, :meth:`StepModel.predict_ms`
and the decode-run prices of the simulator's fast path (:meth:`StepModel.predict_decode_run_ms`)
all evaluate that one expression.

The three hinge terms are knees, where one resource runs out and each unit starts to cost more.
``knee_tokens`` is the roofline's: below it a step is bound by reading the weights, so a token
adds little (``a`` or ``e``); above it the matmuls are compute bound and each token adds ``g``
more. ``knee_decode_context_tokens`` is where the decodes' KV no longer fits a cache level (on
CPUs). Each knee is chosen among the measured values by the fit's loss and left out (None,
its coefficient 0) when it does not lower the loss by :data:`KNEE_MIN_GAIN`. Hinges with
non-negative coefficients are convex and non-decreasing, so the prediction is non-negative and
non-decreasing in every feature and stays sane outside the grid. In the StepShape fields too,
with two exceptions: when ``prefill_attention_tokens`` is 0 (estimated from the sums), more
``prefill_seqs`` over the same tokens means shorter chunks and less estimated attention; and
under an engine's padding a step just below a padded count is priced as the padded count's,
so one more token can cost less (the engine's own kernel behaves so: 15 rows padded to 16).

The fit minimises relative error, since steps span orders of magnitude and the error that
matters is a percentage. A row's error is divided by the model's own prediction (iteratively
reweighted, starting from the measured time), not by the measured time, which would favour
under-prediction of noisy steps. The loss is Huber with a narrow threshold
(:data:`ROBUST_SCALE`): least squares within ordinary noise, linear beyond, so the fit follows
the typical step rather than the mean. Short steps' jitter is skewed - a few run much slower,
from the machine rather than from the step's shape - and fitting the mean put the prediction
above most of them: on the shipped tiny CPU profile's own live steps a threshold of 0.5 gives
a median signed error of +3.0% (median |error| 5.2%) and 0.05 gives +1.4% (4.4%), while their
summed time is predicted within +0.6% and -1.3% respectively (the long steps that carry the
time are less skewed). Every solve is non-negative least squares.

Samples from the live engine (``origin`` ``live``, see :mod:`calibrate.live`) are many noisy
single steps; together they weigh :data:`LIVE_WEIGHT` times as much as the grid's samples
together, shared equally by the groups of live step (prefill, mixed, light and batched
decode) and within a group in proportion to each step's time (see :func:`sample_weights`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

from calibrate.samples import Sample
from sim.batch import StepShape
from sim.cost import DecodeRun

Feature = Callable[[Any, "StepModel"], Any]
"""A feature's value for a step: a function of a :class:`StepShape` (or a
:class:`sim.cost.DecodeRun`, whose ``decode_context_tokens`` is an array, so the same expression
prices a whole decode run element-wise) and of the model, which holds the knees."""


def _hinge(value: Any, knee: int | None) -> Any:
    """``max(0, value - knee)``, element-wise for an array; 0 without a knee."""
    if knee is None:
        return 0.0
    return np.maximum(0.0, value - knee) if isinstance(value, np.ndarray) else max(0.0, value - knee)


KNEES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    # knee (a StepModel field) -> (its hinge feature, the step quantity that bends there), in
    # the order they are searched
    "knee_tokens": ("tokens_over_knee", lambda s: s.num_tokens),
    "knee_cache_tokens": ("tokens_over_cache_knee", lambda s: s.num_tokens),
    "knee_decode_context_tokens": ("decode_context_over_knee", lambda s: s.decode_context_tokens),
}


def _hinge_feature(knee: str, quantity: Callable[[Any], Any]) -> Feature:
    return lambda s, m: _hinge(quantity(s), getattr(m, knee))


FEATURES: dict[str, Feature] = {
    # The one definition of each feature, in the order of the profile's fit.features (see the
    # module docstring). A feature reads a StepShape's fields and properties; write it with
    # operations that also work element-wise on numpy arrays (no branch on the decode context).
    "const": lambda s, m: 1.0,
    "multi_row": lambda s, m: 1.0 if s.num_tokens >= 2 else 0.0,
    "pad_rows": lambda s, m: m.padding(s.num_tokens),
    "prefill_tokens": lambda s, m: s.prefill_tokens,
    "prefill_attention": lambda s, m: s.attention_work,
    "prefill_seqs": lambda s, m: s.prefill_seqs,
    "prefill_batch_seqs": lambda s, m: max(0, s.prefill_seqs - 1),
    "prefill_context_tokens": lambda s, m: s.prefill_context_tokens,
    "decode_seqs": lambda s, m: s.decode_seqs,
    "decode_context_tokens": lambda s, m: s.decode_context_tokens,
    "decode_batch_context": lambda s, m: (s.decode_context_tokens * (1 - 1 / s.decode_seqs) if s.decode_seqs
                                          else s.decode_context_tokens * 0.0),
    **{feature: _hinge_feature(knee, quantity) for knee, (feature, quantity) in KNEES.items()},
}
GATED = ("multi_row",)
GATE_MIN_GAIN = 0.10
"""A feature of :data:`GATED` is fitted only where it lowers the loss by this fraction. The
regime switch of ``multi_row`` is a CPU kernel's; on real A100 steps it fits noise: fitted on
random 70% draws of Llama-2-70B TP 2 (bimodal decodes) it lowered the loss by up to 3.4% and
raised the held-out decode p90 from 7.95% to 8.3%, and fitted on small steps of TP 8 it put
the larger decodes 64% off (``experiments/fit_transfer.py``, ``extrap`` split)."""
KINDS = ("prefill", "decode", "mixed")
ROWS = (*KINDS, "live", "all")
"""Rows of an error table: grid steps by kind, the live engine's steps, every step."""
MAX_KNEE_CANDIDATES = 48
KNEE_MIN_GAIN = 0.02
"""A knee is kept only if it lowers the loss by at least this fraction."""
KNEE_MIN_REACH = 1.25
"""A knee is a candidate only where the largest measured value is at least this many times it:
beyond it a hinge's slope is fitted to the samples past the knee, and a knee just below the
largest value prices every larger step from a few points' noise. A served vLLM's quick
calibration put the decode-context knee at 8,217 tokens with its only samples beyond at 8,233
and 8,249 (16 sequences of 512 tokens; 32 such prompts exceed the token budget and never decode
in lockstep), and priced 32 sequences of 512 tokens at 1.3-8.5 s against about 50 ms measured."""
ROBUST_SCALE = 0.05
"""Relative error beyond which the loss grows linearly, not quadratically (Huber): ordinary
timing noise is fitted in least squares; the skewed tail of steps slowed by the machine pulls
only linearly, so the model predicts the typical step (see the module docstring)."""
IRLS_ITERATIONS = 6
LIVE_WEIGHT = 4.0
"""Total weight of the live samples relative to the grid samples' total: the live steps are
the engine's real operating points, the grid gives coverage (shapes a short synthetic run
never reaches) and separates features that move together in live steps."""
REPEAT_WEIGHT_POWER = 0.5
"""Each of ``n`` non-live prefill samples of one shape weighs in proportion to ``n ** -0.5``
(the total of those samples kept at their count): the shape weighs ``sqrt(n)``, between
counting every run (``n``, what a held-out median over the rows sees) and every shape once
(``1``, what calibrate's grid does with its repeats). The repeats share the model's misfit at
that shape, so ``n`` of them are not ``n`` shapes' evidence about how a step's cost grows.

A file of sweeps re-measures its centre prefill in every run of its decode sweep
(splitwise-sim's A100 steps: a 512-token prompt 45 times, every other prefill 5). Counted in
full, that one shape set BLOOM-176B's price per token and left the misfit to its neighbours
(256 tokens +12% when fitted on every row; held-out p90 10.8%); at ``sqrt(n)`` it is shared
(512 tokens -3.4%, 256 +9.6%; held-out p90 9.3%, median 2.2% -> 3.5%, by
``experiments/fit_transfer.py``). No convex cost follows those three points (256, 512, 1024
tokens: 99, 174, 289 ms put 512 above the chord), nor the 8192-token steps (16 prompts of 512
take as long as one of 8192, 0.43 ms a token against 0.33 at 4096 and 0.35 at 16384): both
stay misfits, the second the fit's largest (-19%).

Decode samples keep weight 1: their fit is within its noise, and discounting them too moved
Llama-2-70B TP2's held-out decode error from 4.6% median / 8.0% p90 to 4.7% / 8.4%. The
prefill total is kept so that prefill and decode weigh against each other as before: without
that, the lighter prefill loss let a decode-context knee fitted by one shape pass
:data:`KNEE_MIN_GAIN` (Llama-2-70B TP8 fitted on small steps: decodes of 32 and 64 sequences
47% high)."""
LIGHT_DECODE_SEQS = 3
LIVE_GROUPS = ("prefill", "mixed", "light decode", "batched decode")


@dataclass(frozen=True)
class StepModel:
    """Predicts a step's milliseconds; ``coefficients_ms`` maps each of :data:`FEATURES` to
    milliseconds per unit of that feature (``const``: per step)."""

    coefficients_ms: dict[str, float]
    knee_tokens: int | None = None
    knee_decode_context_tokens: int | None = None
    knee_cache_tokens: int | None = None
    pad_rows: tuple[tuple[int, int], ...] = ()
    """The engine's padding of a step's products, ``(rows, padded rows)`` pairs (none: no
    padding); it sets the ``pad_rows`` feature, it is not fitted."""

    def __post_init__(self) -> None:
        unknown = set(self.coefficients_ms) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)}; known: {', '.join(FEATURES)}")
        for name, value in self.coefficients_ms.items():
            if not value >= 0:
                raise ValueError(f"coefficient {name!r} must be >= 0, got {value}")
        for name in KNEES:
            knee = getattr(self, name)
            if knee is not None and knee < 0:
                raise ValueError(f"{name} must be >= 0, got {knee}")
        for rows, padded in self.pad_rows:
            if not 1 <= rows < padded:
                raise ValueError(f"pad_rows must map a row count to a larger one, got {rows} -> {padded}")

    def padding(self, rows: int) -> int:
        """Zero rows the engine adds to a product of ``rows`` rows."""
        return self._padded.get(rows, rows) - rows

    @functools.cached_property
    def _padded(self) -> dict[int, int]:
        return dict(self.pad_rows)

    def predict_ms(self, shape: StepShape) -> float:
        return float(self._sum(shape))

    def predict_decode_run_ms(self, shape: StepShape, n: int) -> np.ndarray:
        """``predict_ms`` of ``shape`` repeated ``n`` times with every decode one token further:
        the same sum of the same features, evaluated element-wise on a :class:`DecodeRun`, so
        each value is identical to pricing its step alone."""
        return self._sum(DecodeRun(shape, n)) + np.zeros(n)  # a feature constant over the run gives a scalar

    def _sum(self, s: Any) -> Any:
        """Coefficient x feature of ``s`` summed in :data:`FEATURES` order, from 0. A term with a
        zero coefficient adds exactly 0 (features are finite), so it is left out."""
        total = 0.0
        for coefficient, feature in self._terms:
            total = total + coefficient * feature(s, self)
        return total

    @functools.cached_property
    def _terms(self) -> list[tuple[float, Feature]]:
        return [(c, feature) for name, feature in FEATURES.items() if (c := self.coefficients_ms.get(name, 0.0))]

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coefficients_ms": dict(self.coefficients_ms),
                **{name: getattr(self, name) for name in KNEES},
                "pad_rows": [list(pair) for pair in self.pad_rows]}


NO_KNEES = StepModel({})
"""Holds no knee (every hinge feature 0) and no padding: the design matrix before the knee search."""


def padding_pairs(pad_rows: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    """An engine's padding map (:attr:`runtime.model.Transformer.pad_rows`) as
    :attr:`StepModel.pad_rows`."""
    return tuple(sorted((int(k), int(v)) for k, v in pad_rows.items()))


def features(shape: StepShape, model: StepModel = NO_KNEES) -> tuple[float, ...]:
    """The model's feature vector for one step, in :data:`FEATURES` order, with ``model``'s
    knees and padding."""
    return tuple(feature(shape, model) for feature in FEATURES.values())


def _solve(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative, Huber-robust, weighted fit of relative residuals (relative to the
    prediction, see the module docstring); returns coefficients and the loss."""
    col_scale = np.abs(x / y[:, None]).max(axis=0)
    used = col_scale > 0
    coef = np.zeros(x.shape[1])
    if not used.any():
        return coef, float(w.sum())
    # Columns scaled to unit max: the attention feature is ~1e6 times the constant's.
    xs = x[:, used] / col_scale[used]
    denom = y.copy()
    huber = np.ones(len(y))
    c = np.zeros(xs.shape[1])
    for _ in range(IRLS_ITERATIONS):
        sw = np.sqrt(w * huber) / denom
        c = _nnls_tall(xs * sw[:, None], y * sw)
        pred = xs @ c
        # relative to the prediction (floored: a near-zero prediction must not blow a row up)
        denom = np.maximum(pred, 0.25 * y)
        r = np.abs(pred - y) / denom
        huber = np.minimum(1.0, ROBUST_SCALE / np.maximum(r, 1e-12))
    r = np.abs(xs @ c - y) / denom
    loss = float(np.sum(w * np.where(r <= ROBUST_SCALE, 0.5 * r**2, ROBUST_SCALE * (r - 0.5 * ROBUST_SCALE))))
    coef[used] = np.maximum(c, 0) / col_scale[used]
    return coef, loss


def _nnls_tall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``nnls(a, b)`` for a tall ``a``, through its QR factors (same minimiser, a 9-row problem)."""
    if a.shape[0] <= 4 * a.shape[1]:
        return nnls(a, b, maxiter=50 * a.shape[1])[0]
    ab = np.column_stack([a, b])
    try:  # the R of [a b]'s QR, from its Gram matrix (fast); QR itself when that is ill-conditioned
        r: np.ndarray = np.linalg.cholesky(ab.T @ ab).T
    except np.linalg.LinAlgError:
        r = np.linalg.qr(ab, mode="r")  # type: ignore[assignment]  # mode "r" returns R alone
    n = a.shape[1]
    return nnls(r[:n, :n], r[:n, n], maxiter=50 * n)[0]


def _live_group(s: Sample) -> str:
    """The group a live sample's weight is shared in: its kind, decodes split at
    :data:`LIGHT_DECODE_SEQS` sequences."""
    if s.kind == "decode":
        return "light decode" if s.shape.decode_seqs <= LIGHT_DECODE_SEQS else "batched decode"
    return s.kind


def sample_weights(samples: Sequence[Sample]) -> np.ndarray:
    """Each grid (or CSV) sample weighs 1; the live samples together weigh :data:`LIVE_WEIGHT`
    x the others' total (all of it when there are only live samples), shared equally by the
    groups of live step: prefill, mixed, light decode (up to :data:`LIGHT_DECODE_SEQS`
    sequences) and batched decode. A run has few prefill-only steps, but they are its TTFT, as
    the decodes are its TPOT; and a lightly loaded engine runs mostly one to three decodes a
    step (most of the steps) while a loaded one spends its time in large batches, so neither
    regime is left to decide the other.

    Within a group, a live step weighs in proportion to its measured time: the fit then
    minimises relative error per unit of engine time, not per step. A loaded run spends most
    of its time, and its requests most of their decode, in a minority of long steps (large
    decode batches); weighing every step alike lets the many short steps of quiet periods
    decide the fit and under-predict exactly the steps that set TPOT under load.

    Among the prefill samples not from the live engine (rows of a CSV, grid points), a shape
    measured ``n`` times weighs in proportion to ``sqrt(n)``, each repeat to ``n ** -0.5`` (see
    :data:`REPEAT_WEIGHT_POWER`), scaled so that those samples still weigh their count in all."""
    live = np.array([s.origin == "live" for s in samples])
    w = np.ones(len(samples))
    repeated = np.array([s.origin != "live" and s.kind == "prefill" for s in samples])
    if repeated.any():
        count = Counter(s.shape for s, r in zip(samples, repeated, strict=True) if r)
        discount = np.array([count[s.shape] ** -REPEAT_WEIGHT_POWER
                             for s, r in zip(samples, repeated, strict=True) if r])
        # shared among the prefill shapes, the total kept: prefill against decode (and live) as before
        w[repeated] = discount * repeated.sum() / discount.sum()
    if live.any():
        total = LIVE_WEIGHT * (~live).sum() if not live.all() else float(live.sum())
        kinds = np.array([_live_group(s) for s in samples])
        step_ms = np.array([s.step_ms for s in samples], dtype=float)
        present = [k for k in LIVE_GROUPS if (live & (kinds == k)).any()]
        for k in present:
            sel = live & (kinds == k)
            w[sel] = total / len(present) * step_ms[sel] / step_ms[sel].sum()
    return w


def _knee_candidates(values: np.ndarray) -> list[int]:
    distinct = np.unique(values)
    inner = distinct[(distinct > distinct.min()) & (distinct * KNEE_MIN_REACH <= distinct.max())]
    if len(inner) > MAX_KNEE_CANDIDATES:
        inner = np.unique(inner[np.linspace(0, len(inner) - 1, MAX_KNEE_CANDIDATES).round().astype(int)])
    return [int(v) for v in inner]


def fit_step_model(samples: Sequence[Sample], exclude: Collection[str] = (),
                   pad_rows: tuple[tuple[int, int], ...] = ()) -> StepModel:
    """Fit :class:`StepModel` to measured steps (at least one) of an engine that pads its
    products by ``pad_rows``; the features in ``exclude`` are held at 0 (their knees left out).

    The knees are searched one at a time in :data:`KNEES` order, each over the measured
    values with the knees before it held.
    """
    if not samples:
        raise ValueError("cannot fit a cost model to zero samples")
    unknown = set(exclude) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown feature(s) {sorted(unknown)}; known: {', '.join(FEATURES)}")
    shapes = [s.shape for s in samples]
    y = np.array([s.step_ms for s in samples], dtype=float)
    w = sample_weights(samples)
    padded = StepModel({}, pad_rows=pad_rows)
    x = np.array([features(sh, padded) for sh in shapes], dtype=float)  # (samples, features); hinges 0 for now
    x[:, [name in exclude for name in FEATURES]] = 0.0  # a column of zeros is left out of the solve
    gated = {list(FEATURES).index(name): x[:, list(FEATURES).index(name)].copy()
             for name in GATED if name not in exclude}
    for index in gated:
        x[:, index] = 0.0
    coef, best = _solve(x, y, w)
    for index, values in gated.items():  # each kept only if it earns its place (GATE_MIN_GAIN)
        x[:, index] = values
        c, loss = _solve(x, y, w)
        if loss < best * (1 - GATE_MIN_GAIN) and c[index] > 0:
            coef, best = c, loss
        else:
            x[:, index] = 0.0
    knees: dict[str, int | None] = dict.fromkeys(KNEES)
    for knee_name, (feature, quantity) in KNEES.items():
        if feature in exclude:
            continue
        column = list(FEATURES).index(feature)
        values = np.array([quantity(sh) for sh in shapes])
        kept = x[:, column].copy()
        for knee in _knee_candidates(values):
            x[:, column] = _hinge(values, knee)
            c, loss = _solve(x, y, w)
            if loss < best * (1 - KNEE_MIN_GAIN) and c[column] > 0:
                coef, best, knees[knee_name], kept = c, loss, knee, x[:, column].copy()
        x[:, column] = kept
    return StepModel(dict(zip(FEATURES, (float(c) for c in coef), strict=True)), **knees, pad_rows=pad_rows)


# -- error --------------------------------------------------------------------------------------
def error_table(samples: Sequence[Sample], predicted_ms: Sequence[float]) -> dict[str, dict]:
    """Absolute percentage error per kind of controlled step (prefill, decode, mixed: every
    sample not from the live engine), of the live engine's steps (``live``) and of ``all``:
    count, median, p90, and ``bias_pct``, the summed prediction against the summed measured
    time (what a run's metrics feel)."""
    table: dict[str, dict] = {}
    measured = np.array([s.step_ms for s in samples], dtype=float)
    predicted = np.asarray(predicted_ms, dtype=float)
    ape = np.abs(predicted - measured) / measured * 100
    kinds = np.array(["live" if s.origin == "live" else s.kind for s in samples])
    for kind in ROWS:
        sel = np.ones(len(samples), bool) if kind == "all" else kinds == kind
        if kind == "live" and not sel.any():
            continue
        table[kind] = {
            "n": int(sel.sum()),
            "median_ape_pct": float(np.median(ape[sel])) if sel.any() else None,
            "p90_ape_pct": float(np.percentile(ape[sel], 90)) if sel.any() else None,
            "bias_pct": float((predicted[sel].sum() / measured[sel].sum() - 1) * 100) if sel.any() else None,
        }
    return table


def held_out_predictions(samples: Sequence[Sample], folds: int = 5, seed: int = 0,
                         pad_rows: tuple[tuple[int, int], ...] = ()) -> list[float] | None:
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
    strata = ["live" if s.origin == "live" else s.kind for s in samples]
    for kind in (*KINDS, "live", "empty"):
        idx = np.array([i for i, k in enumerate(strata) if k == kind], dtype=int)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    predicted = [0.0] * n
    for f in range(folds):
        train = [s for s, k in zip(samples, fold_of, strict=True) if k != f]
        model = fit_step_model(train, pad_rows=pad_rows)
        for i in np.flatnonzero(fold_of == f):
            predicted[i] = model.predict_ms(samples[int(i)].shape)
    return predicted


@dataclass(frozen=True)
class FitResult:
    model: StepModel
    held_out: dict[str, dict] | None
    in_sample: dict[str, dict]
    folds: int


def fit(samples: Sequence[Sample], folds: int = 5, seed: int = 0,
        pad_rows: tuple[tuple[int, int], ...] = ()) -> FitResult:
    """Held-out error by k-fold, then the final model fitted on every sample (of an engine
    that pads its products by ``pad_rows``)."""
    held = held_out_predictions(samples, folds, seed, pad_rows)
    model = fit_step_model(samples, pad_rows=pad_rows)
    in_sample = error_table(samples, [model.predict_ms(s.shape) for s in samples])
    return FitResult(model, None if held is None else error_table(samples, held), in_sample,
                     min(folds, len(samples)))


def format_error_table(table: dict[str, dict]) -> str:
    lines = [f"{'steps':<8} {'n':>5} {'median %':>9} {'p90 %':>8} {'bias %':>8}"]
    for kind, row in table.items():
        med = "-" if row["median_ape_pct"] is None else f"{row['median_ape_pct']:.2f}"
        p90 = "-" if row["p90_ape_pct"] is None else f"{row['p90_ape_pct']:.2f}"
        bias = "-" if row.get("bias_pct") is None else f"{row['bias_pct']:+.2f}"
        lines.append(f"{kind:<8} {row['n']:>5} {med:>9} {p90:>8} {bias:>8}")
    return "\n".join(lines)
