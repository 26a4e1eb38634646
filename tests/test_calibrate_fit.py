"""The fitted step-cost model: exact recovery, knees, robustness, monotonicity, held-out error."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate.fit import FEATURES, StepModel, error_table, fit, fit_step_model, held_out_predictions
from calibrate.grid import GridPoint, make_grid
from calibrate.profile import load_profile
from calibrate.samples import Sample
from sim.batch import StepShape, chunk_attention

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "tiny-cpu.json"


def formula_ms(s: StepShape) -> float:
    """The known formula of the recovery test."""
    return 2 + 0.01 * s.prefill_tokens + 1e-6 * s.attention_work + 0.05 * s.decode_seqs + 1e-4 * s.decode_context_tokens


def point_sample(p: GridPoint, step_ms_of) -> Sample:
    shape = StepShape(prefill_tokens=sum(c for c, _ in p.prefill), prefill_seqs=len(p.prefill),
                      prefill_context_tokens=sum(x for _, x in p.prefill), decode_seqs=len(p.decode),
                      decode_context_tokens=sum(p.decode),
                      prefill_attention_tokens=sum(chunk_attention(c, x) for c, x in p.prefill))
    return Sample(shape, step_ms_of(shape))


def random_shapes(n: int, seed: int) -> list[StepShape]:
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(n):
        seqs = int(rng.integers(0, 5))
        tokens = int(rng.integers(seqs, 3000)) if seqs else 0
        decodes = int(rng.integers(0 if seqs else 1, 200))
        shapes.append(StepShape(prefill_tokens=tokens, prefill_seqs=seqs,
                                prefill_context_tokens=int(rng.integers(0, 4000)) if seqs else 0,
                                decode_seqs=decodes, decode_context_tokens=decodes * int(rng.integers(1, 4000))))
    return shapes


def test_known_formula_recovered_within_one_percent():
    """Fitting samples of a known linear formula predicts unseen shapes within 1% of it."""
    samples = [point_sample(p, formula_ms) for p in make_grid(4096, 100_000, 16, quick=True)]
    model = fit_step_model(samples)
    for shape in random_shapes(300, seed=1):
        assert model.predict_ms(shape) == pytest.approx(formula_ms(shape), rel=0.01)


def test_batch_context_cost_recovered():
    """A context token that costs more when several decodes share the step (as padded groups of
    mixed lengths do) is recovered through ``decode_batch_context``: one sequence's token costs
    1e-4 ms, a large batch's nearly 3e-4 ms."""
    def batch_ms(s: StepShape) -> float:
        shared = s.decode_context_tokens * (1 - 1 / s.decode_seqs) if s.decode_seqs else 0.0
        return formula_ms(s) + 2e-4 * shared

    samples = [point_sample(p, batch_ms) for p in make_grid(4096, 100_000, 16, quick=True)]
    model = fit_step_model(samples)
    assert model.coefficients_ms["decode_batch_context"] == pytest.approx(2e-4, rel=0.05)
    for shape in random_shapes(300, seed=2):
        assert model.predict_ms(shape) == pytest.approx(batch_ms(shape), rel=0.01)
    one = StepShape(decode_seqs=1, decode_context_tokens=1000)
    many = StepShape(decode_seqs=50, decode_context_tokens=1000)
    # the same context over 50 sequences: 49 x 0.05 ms per sequence + 2e-4 x 980 shared tokens
    assert model.predict_ms(many) - model.predict_ms(one) == pytest.approx(2.45 + 0.196, rel=0.02)


def test_multi_row_jump_recovered_and_gated():
    """A step of two rows or more paying a fixed 25 ms more than a lone decode (a CPU's switch
    from matrix-vector to blocked matrix products) is recovered by ``multi_row``; on the plain
    formula the gated feature is not fitted at all."""
    def jump_ms(s: StepShape) -> float:
        return formula_ms(s) + (25.0 if s.num_tokens >= 2 else 0.0)

    grid = make_grid(4096, 100_000, 16, quick=True)
    model = fit_step_model([point_sample(p, jump_ms) for p in grid])
    assert model.coefficients_ms["multi_row"] == pytest.approx(25.0, rel=0.02)
    one, two = StepShape(decode_seqs=1, decode_context_tokens=500), StepShape(decode_seqs=2, decode_context_tokens=500)
    assert model.predict_ms(one) == pytest.approx(jump_ms(one), rel=0.01)
    assert model.predict_ms(two) == pytest.approx(jump_ms(two), rel=0.01)
    plain = fit_step_model([point_sample(p, formula_ms) for p in grid])
    assert plain.coefficients_ms["multi_row"] == 0.0
    without = fit_step_model([point_sample(p, jump_ms) for p in grid], exclude=("multi_row",))
    assert without.coefficients_ms["multi_row"] == 0.0
    assert abs(without.predict_ms(one) / jump_ms(one) - 1) > 0.2  # a line cannot follow the jump


PADDING = ((2, 4), (3, 4), *((r, 16) for r in range(7, 16)))
"""The small model's padding on a CPU in float32 (runtime.model.default_pad_rows)."""


def test_padded_rows_recovered_where_a_line_cannot_follow():
    """Steps of an engine that pads 7-15 rows to 16 cost what 16 rows do, plus their attention:
    fitted with the engine's padding, ``pad_rows`` recovers the per-row price and prices 8 and
    12 decodes within 1%; without it the one line through 4 and 16 puts them well below."""
    def padded_ms(s: StepShape) -> float:
        rows = dict(PADDING).get(s.num_tokens, s.num_tokens)
        return formula_ms(s) + 1.5 * (rows - s.num_tokens)

    samples = [point_sample(p, padded_ms) for p in make_grid(1024, 100_000, 16, quick=True)]
    model = fit_step_model(samples, pad_rows=PADDING)
    assert model.pad_rows == PADDING and model.padding(8) == 8 and model.padding(16) == 0
    assert model.coefficients_ms["pad_rows"] == pytest.approx(1.5, rel=0.02)
    without = fit_step_model(samples)
    assert without.coefficients_ms["pad_rows"] == 0.0  # no padding given: the feature is all zeros
    for seqs in (8, 12):
        shape = StepShape(decode_seqs=seqs, decode_context_tokens=100 * seqs)
        assert model.predict_ms(shape) == pytest.approx(padded_ms(shape), rel=0.01)
        assert without.predict_ms(shape) / padded_ms(shape) - 1 < -0.05
    assert StepModel.__dataclass_fields__["pad_rows"].default == ()
    with pytest.raises(ValueError, match="pad_rows"):
        StepModel({}, pad_rows=((8, 4),))


def test_roofline_knee_found():
    """Steps bound by a floor then by compute (max(5 ms, 0.02 ms/token)) are fitted within a few %."""
    def knee_ms(s: StepShape) -> float:
        return max(5.0, 0.02 * s.num_tokens) + 1e-4 * s.decode_context_tokens

    samples = [point_sample(p, knee_ms) for p in make_grid(2048, 100_000, 16)]
    result = fit(samples, seed=3)
    assert result.model.knee_tokens is not None and 64 <= result.model.knee_tokens <= 512
    assert result.held_out is not None
    assert result.held_out["all"]["median_ape_pct"] < 2
    assert result.held_out["all"]["p90_ape_pct"] < 10


def test_one_disturbed_step_does_not_pull_the_fit():
    """A step timed 10x too slow (the machine was busy) barely moves the other predictions."""
    samples = [point_sample(p, formula_ms) for p in make_grid(2048, 100_000, 16, quick=True)]
    samples[5] = replace(samples[5], step_ms=samples[5].step_ms * 10)
    model = fit_step_model(samples)
    errors = [abs(model.predict_ms(s.shape) - formula_ms(s.shape)) / formula_ms(s.shape)
              for i, s in enumerate(samples) if i != 5]
    assert np.median(errors) < 0.01


def test_held_out_split_is_deterministic():
    """The same seed gives the same cross-validated predictions; every sample is predicted."""
    rng = np.random.default_rng(0)
    samples = [point_sample(p, lambda s: formula_ms(s) * rng.uniform(0.95, 1.05))
               for p in make_grid(2048, 100_000, 16, quick=True)]
    a, b = held_out_predictions(samples, seed=7), held_out_predictions(samples, seed=7)
    assert a == b and len(a) == len(samples) and all(p > 0 for p in a)


def test_error_table_by_kind():
    """The error table separates prefill, decode and mixed steps and pools them in all."""
    samples = [Sample(StepShape(10, 1, 0, 0, 0), 10.0), Sample(StepShape(0, 0, 0, 4, 40), 4.0),
               Sample(StepShape(5, 1, 0, 2, 8), 8.0)]
    table = error_table(samples, [11.0, 4.0, 6.0])
    assert table["prefill"] == {"n": 1, "median_ape_pct": pytest.approx(10.0), "p90_ape_pct": pytest.approx(10.0),
                                "bias_pct": pytest.approx(10.0)}
    assert "live" not in table
    assert table["decode"]["median_ape_pct"] == 0
    assert table["mixed"]["median_ape_pct"] == pytest.approx(25.0)
    assert table["all"]["n"] == 3


def test_negative_coefficient_rejected():
    """A StepModel never holds a negative coefficient (it could predict a negative time)."""
    with pytest.raises(ValueError, match="prefill_tokens"):
        StepModel({"const": 1.0, "prefill_tokens": -0.1})


# -- monotone and non-negative: property-based ---------------------------------------------------
coefficients = st.fixed_dictionaries({name: st.floats(0, 10) for name in FEATURES})
knees = st.none() | st.integers(0, 5000)


@st.composite
def shapes(draw, exact_attention: bool):
    seqs = draw(st.integers(0, 8))
    tokens = draw(st.integers(seqs, 8192)) if seqs else 0
    context = draw(st.integers(0, 32768)) if seqs else 0
    decodes = draw(st.integers(0, 256))
    attention = draw(st.floats(1, 1e9)) if exact_attention and tokens else 0.0  # 0 would mean "estimate"
    return StepShape(prefill_tokens=tokens, prefill_seqs=seqs, prefill_context_tokens=context, decode_seqs=decodes,
                     decode_context_tokens=draw(st.integers(0, 10**6)) if decodes else 0,
                     prefill_attention_tokens=attention)


FIELDS = ("prefill_tokens", "prefill_seqs", "prefill_context_tokens", "decode_seqs", "decode_context_tokens",
          "prefill_attention_tokens")


@settings(max_examples=300, deadline=None)
@given(coef=coefficients, knee=knees, dknee=knees, shape=shapes(exact_attention=True),
       field=st.sampled_from(FIELDS), step=st.integers(1, 10_000))
def test_prediction_non_negative_and_monotone(coef, knee, dknee, shape, field, step):
    """Any fitted model of an engine that does not pad is >= 0 and never decreases when one field
    of the shape grows (padding is the documented exception, see calibrate.fit)."""
    model = StepModel(coef, knee, dknee)
    bigger = replace(shape, **{field: getattr(shape, field) + step})
    if bigger.prefill_seqs > bigger.prefill_tokens or (bigger.prefill_seqs == 0) != (bigger.prefill_tokens == 0):
        return  # not a step an engine can take
    before, after = model.predict_ms(shape), model.predict_ms(bigger)
    assert before >= 0
    assert after >= before * (1 - 1e-12)


@functools.cache
def shipped_model() -> StepModel:
    return load_profile(SHIPPED).model_fit


@pytest.mark.skipif(not SHIPPED.exists(), reason="profiles/tiny-cpu.json not built yet")
@settings(max_examples=200, deadline=None)
@given(shape=shapes(exact_attention=False), field=st.sampled_from(FIELDS[:5]), step=st.integers(1, 10_000))
def test_shipped_profile_monotone_with_estimated_attention(shape, field, step):
    """The shipped CPU profile is monotone when attention is estimated from the sums (except in
    prefill_seqs, where more sequences over the same tokens mean less attention work)."""
    model = shipped_model()
    if field == "prefill_seqs":
        return
    bigger = replace(shape, **{field: getattr(shape, field) + step})
    if (bigger.prefill_seqs == 0) != (bigger.prefill_tokens == 0):
        return
    assert 0 <= model.predict_ms(shape) <= model.predict_ms(bigger) * (1 + 1e-12)


def test_live_samples_weighted_per_kind_and_origin_round_trips(tmp_path):
    """Live samples share LIVE_WEIGHT x the grid's weight, equally per group (kind; decodes light
    or batched) and within a group in proportion to their time; origin survives CSV."""
    from calibrate.fit import LIVE_WEIGHT, sample_weights
    from calibrate.samples import read_samples, write_samples

    grid = [Sample(StepShape(10, 1, 0, 0, 0), 10.0, origin="grid"),
            Sample(StepShape(0, 0, 0, 4, 40), 4.0, origin="grid")]
    live = ([Sample(StepShape(0, 0, 0, 2, 20), 3.0, origin="live")] * 8
            + [Sample(StepShape(50, 1, 0, 0, 0), 9.0, origin="live")])
    w = sample_weights(grid + live)
    assert list(w[:2]) == [1, 1]
    assert w[2:10].sum() == pytest.approx(LIVE_WEIGHT * 2 / 2) and w[10] == pytest.approx(LIVE_WEIGHT * 2 / 2)
    # decodes: a light group (up to LIGHT_DECODE_SEQS sequences) and a batched one share equally,
    # and within a group a step weighs in proportion to its time
    decodes = [Sample(StepShape(0, 0, 0, seqs, context), ms, origin="live")
               for seqs, context, ms in ((1, 20, 0.5), (3, 60, 1.5), (8, 900, 3.0), (40, 900, 12.0))]
    w = sample_weights(grid + decodes)
    assert w[3] == pytest.approx(3 * w[2]) and w[5] == pytest.approx(4 * w[4])
    assert w[2] + w[3] == pytest.approx(w[4] + w[5]) == pytest.approx(LIVE_WEIGHT * 2 / 2)
    write_samples(tmp_path / "s.csv", grid + live)
    assert [s.origin for s in read_samples(tmp_path / "s.csv")] == [s.origin for s in grid + live]
    table = error_table(grid + live, [s.step_ms for s in grid + live])
    assert table["live"]["n"] == 9 and table["all"]["n"] == 11 and table["decode"]["n"] == 1


def test_repeated_prefill_shapes_weigh_sqrt_n_together():
    """Non-live prefill samples of one shape measured n times weigh sqrt(n) together, relative to
    a shape measured once, with the prefill samples' total weight kept at their count; decode
    and live samples are untouched."""
    from calibrate.fit import LIVE_WEIGHT, sample_weights

    prefill = ([Sample(StepShape(512, 1, 0, 0, 0), 170.0 + i) for i in range(9)]
               + [Sample(StepShape(256, 1, 0, 0, 0), 99.0)])
    decodes = [Sample(StepShape(0, 0, 0, 1, 576), 48.0)] * 4
    live = [Sample(StepShape(64, 1, 0, 0, 0), 5.0, origin="live")] * 3
    w = sample_weights(prefill + decodes + live)
    assert w[:9].sum() == pytest.approx(3 * w[9])  # sqrt(9) : 1
    assert w[:10].sum() == pytest.approx(10)
    assert list(w[10:14]) == [1, 1, 1, 1]
    assert w[14:].sum() == pytest.approx(LIVE_WEIGHT * 14) and w[14] == w[16]


def test_batched_prefill_cost_recovered():
    """Prefills that share a step cost more each than a lone one (as on real A100 steps):
    ``prefill_batch_seqs`` recovers the extra 20 ms per sequence beyond the first."""
    def batched_ms(s: StepShape) -> float:
        return formula_ms(s) + 20 * max(0, s.prefill_seqs - 1)

    samples = [point_sample(p, batched_ms) for p in make_grid(4096, 100_000, 16, quick=True)]
    model = fit_step_model(samples)
    assert model.coefficients_ms["prefill_batch_seqs"] == pytest.approx(20, rel=0.05)
    for shape in random_shapes(300, seed=4):
        assert model.predict_ms(shape) == pytest.approx(batched_ms(shape), rel=0.01)


def test_second_tokens_knee_found():
    """A cost per token that rises at two knees (compute bound at 256 tokens, again at 2048) is
    fitted with both: ``knee_tokens`` and ``knee_cache_tokens`` land on the two bends."""
    def two_knees_ms(s: StepShape) -> float:
        t = s.num_tokens
        return 40 + 0.01 * t + 0.1 * max(0, t - 256) + 0.08 * max(0, t - 2048) + 1e-4 * s.decode_context_tokens

    samples = [point_sample(p, two_knees_ms) for p in make_grid(8192, 100_000, 16)]
    model = fit_step_model(samples)
    assert {model.knee_tokens, model.knee_cache_tokens} == {256, 2048}
    for shape in random_shapes(300, seed=5):
        assert model.predict_ms(shape) == pytest.approx(two_knees_ms(shape), rel=0.02)


def test_excluded_feature_held_at_zero():
    """``exclude`` keeps a feature's coefficient (and a hinge's knee) at 0; an unknown name is an error."""
    samples = [point_sample(p, formula_ms) for p in make_grid(2048, 100_000, 16, quick=True)]
    model = fit_step_model(samples, exclude=("prefill_attention", "tokens_over_knee"))
    assert model.coefficients_ms["prefill_attention"] == 0 and model.coefficients_ms["tokens_over_knee"] == 0
    assert model.knee_tokens is None
    with pytest.raises(ValueError, match="unknown feature"):
        fit_step_model(samples, exclude=("no_such_feature",))


def test_profile_without_newer_feature_and_knee_prices_as_written(tmp_path):
    """A profile fitted before ``prefill_batch_seqs`` and ``knee_cache_tokens`` existed loads
    with coefficient 0 and knee null, and prices exactly as its own coefficients say."""
    import json

    data = json.loads(SHIPPED.read_text())
    fit_dict = data["fit"]
    newer = ("prefill_batch_seqs", "tokens_over_cache_knee")
    fit_dict["features"] = [f for f in fit_dict["features"] if f not in newer]
    for name in newer:
        fit_dict["coefficients_ms"].pop(name, None)
    fit_dict.pop("knee_cache_tokens", None)
    (tmp_path / "old.json").write_text(json.dumps(data))
    model = load_profile(tmp_path / "old.json").model_fit
    assert model.knee_cache_tokens is None and model.coefficients_ms["prefill_batch_seqs"] == 0
    c = fit_dict["coefficients_ms"]
    shape = StepShape(prefill_tokens=300, prefill_seqs=3, prefill_context_tokens=50, decode_seqs=7,
                      decode_context_tokens=70_000)
    by_hand = (c["const"] + c["prefill_tokens"] * 300 + c["prefill_attention"] * shape.attention_work
               + c["prefill_seqs"] * 3 + c["prefill_context_tokens"] * 50 + c["decode_seqs"] * 7
               + c["decode_context_tokens"] * 70_000 + c["decode_batch_context"] * 70_000 * (1 - 1 / 7)
               + c["decode_context_over_knee"] * max(0, 70_000 - fit_dict["knee_decode_context_tokens"]))
    assert model.predict_ms(shape) == pytest.approx(by_hand, rel=1e-12)


A100_STEPS = Path(__file__).resolve().parents[2] / "shared" / "gpu-steps" / "splitwise_a100_perf_model.csv"


@pytest.mark.skipif(not A100_STEPS.exists(), reason="../shared/gpu-steps not present")
@pytest.mark.parametrize("tp", [4, 8])
def test_real_a100_prefill_held_out(tp):
    """On real A100 steps of Llama-2-70B, fitted on a random 70% and scored on the rest (five
    draws), the median draw predicts prefill steps within 5% median and 10% p90, decodes
    within 2% median and 4% p90."""
    from calibrate.splitwise import read_splitwise

    samples = [Sample(shape, ms) for shape, ms in read_splitwise(A100_STEPS, "llama2-70b", tp).steps]
    stats: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(samples))
        cut = int(0.7 * len(samples))
        model = fit_step_model([samples[i] for i in order[:cut]])
        for kind, values in stats.items():
            e = [abs(model.predict_ms(samples[i].shape) / samples[i].step_ms - 1) * 100
                 for i in order[cut:] if samples[i].kind == kind]
            values.append((float(np.median(e)), float(np.percentile(e, 90))))
    prefill, decode = np.median(stats["prefill"], axis=0), np.median(stats["decode"], axis=0)
    assert prefill[0] < 5 and prefill[1] < 10
    assert decode[0] < 2 and decode[1] < 4
