"""A step feature is defined once: StepShape's fields drive sums, validation and sample columns;
each cost feature's decode-run form is the same expression, checked over random shapes."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate.calibration import profile_from_samples
from calibrate.fit import FEATURES, KNEES, StepModel
from calibrate.profile import CalibratedCost, load_profile, save_profile
from calibrate.samples import CSV_COLUMNS, SWAP_COLUMNS, Sample, read_samples, write_samples
from sim.batch import STEP_FIELDS, Batch, ScheduledSeq, StepShape
from sim.cost import DecodeRun, decode_run_step, decode_run_times
from sim.request import Request

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "tiny-cpu.json"


@st.composite
def shapes(draw, swaps: bool = True) -> StepShape:
    """A valid step: prefill chunks (attention exact or left to the estimate), decodes, swaps,
    and any field added to StepShape since (drawn by its type), so these tests cover it."""
    prefill_seqs = draw(st.integers(0, 6))
    prefill_tokens = draw(st.integers(prefill_seqs, 5000)) if prefill_seqs else 0
    decode_seqs = draw(st.integers(0 if prefill_seqs else 1, 256))
    swap = st.sampled_from([0, 16, 48]) if swaps else st.just(0)
    values = dict(
        prefill_tokens=prefill_tokens, prefill_seqs=prefill_seqs,
        prefill_context_tokens=draw(st.integers(0, 20_000)) if prefill_seqs else 0,
        decode_seqs=decode_seqs,
        decode_context_tokens=draw(st.integers(decode_seqs, 200_000)) if decode_seqs else 0,
        prefill_attention_tokens=draw(st.sampled_from([0.0, 1.0]) | st.floats(1, 1e8)) if prefill_seqs else 0.0,
        swap_in_tokens=draw(swap), swap_out_tokens=draw(swap),
    )
    hints = get_type_hints(StepShape)
    for name in STEP_FIELDS:
        if name not in values:
            values[name] = draw(st.integers(0, 10_000) if hints[name] is int else st.floats(0, 1e6))
    return StepShape(**values)


def random_model(draw) -> StepModel:
    """Every coefficient drawn (often all nonzero), knees absent or anywhere in range."""
    coef = draw(st.fixed_dictionaries({name: st.floats(0, 10) | st.floats(1e-7, 1e-3) for name in FEATURES}))
    knees = {name: draw(st.none() | st.integers(0, 300_000)) for name in KNEES}
    padding = draw(st.sampled_from([(), ((2, 4), (3, 4), *((r, 16) for r in range(7, 16)))]))
    return StepModel(coef, **knees, pad_rows=padding)


SAMPLES = [Sample(StepShape(64, 1, 0, 0, 0), 3.0), Sample(StepShape(0, 0, 0, 8, 800), 2.5),
           Sample(StepShape(128, 1, 0, 16, 4000), 6.0)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), shape=shapes(), n=st.integers(1, 70))
def test_calibrated_decode_run_equals_each_step_priced_alone(data, shape, n):
    """CalibratedCost's vectorised decode run is exactly (==) step_time of each step of the run."""
    prof = profile_from_samples(SAMPLES, "x.csv", model="tiny")
    prof.model_fit = random_model(data.draw)
    cost = CalibratedCost(prof)
    run = decode_run_times(cost, shape, n)
    assert run == [cost.step_time(decode_run_step(shape, j)) for j in range(n)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), shape=shapes(swaps=False), n=st.integers(1, 40))
def test_each_feature_vectorises_exactly(data, shape, n):
    """Every feature, evaluated once on a DecodeRun, gives each step's own value (bit for bit),
    so no coefficient can hide a feature that does not vectorise."""
    model = random_model(data.draw)
    run = DecodeRun(shape, n)
    for name, feature in FEATURES.items():
        together = np.broadcast_to(np.asarray(feature(run, model), dtype=np.float64), (n,))
        alone = [float(feature(decode_run_step(shape, j), model)) for j in range(n)]
        assert together.tolist() == alone, name


def test_shipped_profile_prices_runs_as_steps():
    """The shipped tiny profile (schema 2 on disk) prices a long decode run exactly as its steps."""
    cost = CalibratedCost.from_file(SHIPPED)
    shape = StepShape(prefill_tokens=300, prefill_seqs=2, prefill_context_tokens=100, decode_seqs=40,
                      decode_context_tokens=50_000)
    run = cost.decode_run_times(shape, 500)  # crosses the profile's decode-context knee
    assert run.tolist() == [cost.step_time(decode_run_step(shape, j)) for j in range(500)]
    assert run[-1] > run[0] > 0


def test_decode_run_view_reads_as_its_steps():
    """A DecodeRun has each step's context as an array and every other field and property of the shape."""
    shape = StepShape(prefill_tokens=50, prefill_seqs=2, prefill_context_tokens=30, decode_seqs=3,
                      decode_context_tokens=90, swap_in_tokens=16)
    run = DecodeRun(shape, 4)
    assert run.decode_context_tokens.tolist() == [90, 93, 96, 99]
    for name in STEP_FIELDS:
        if name != "decode_context_tokens":
            assert getattr(run, name) == getattr(shape, name)
    assert run.num_tokens == shape.num_tokens and run.attention_work == shape.attention_work


@given(a=shapes(), b=shapes())
def test_add_sums_every_field(a, b):
    """``+`` is the field-wise sum of every StepShape field."""
    total = a + b
    assert all(getattr(total, name) == getattr(a, name) + getattr(b, name) for name in STEP_FIELDS)


@given(padding=shapes())
def test_batch_shape_adds_its_padding_to_every_field(padding):
    """A batch's shape is its sequences' and swaps' sums plus its padding, in every field (a
    field whose padding Batch.shape leaves out fails here)."""
    decoding = Request(id=0, arrival_s=0.0, prompt_tokens=40, output_tokens=5, num_generated=2,
                       num_computed_tokens=41)
    prefilling = Request(id=1, arrival_s=0.0, prompt_tokens=64, output_tokens=5, num_computed_tokens=10)
    seqs = [ScheduledSeq(decoding, 41, 1), ScheduledSeq(prefilling, 10, 20)]
    unpadded = Batch(seqs, swap_in_blocks=[(0, 1)], swap_out_blocks=[(2, 3), (4, 5)], block_size=16)
    padded = Batch(seqs, swap_in_blocks=[(0, 1)], swap_out_blocks=[(2, 3), (4, 5)], block_size=16, padding=padding)
    assert padded.shape() == unpadded.shape() + padding


@pytest.mark.parametrize("name", STEP_FIELDS)
def test_every_field_validated(name):
    """A negative value of any StepShape field is an error naming that field."""
    with pytest.raises(ValueError, match=rf"StepShape\.{name} must be >= 0"):
        StepShape(**{name: -1})


def test_sample_columns_are_the_shape_fields():
    """A samples file's columns are StepShape's fields (bar swaps, which fitted steps never have)
    followed by Sample's own; Sample declares no shape field of its own."""
    own = [f.name for f in fields(Sample) if f.name != "shape"]
    assert CSV_COLUMNS == [n for n in STEP_FIELDS if n not in SWAP_COLUMNS] + own
    assert not set(own) & set(STEP_FIELDS)


@settings(max_examples=30, deadline=None)
@given(shape=shapes(swaps=False), ms=st.floats(0.01, 1e4))
def test_every_field_survives_csv_and_profile(tmp_path_factory, shape, ms):
    """A sample's whole shape round-trips through a samples CSV and a profile file."""
    tmp = tmp_path_factory.mktemp("rt")
    sample = Sample(shape, ms, origin="grid")
    write_samples(tmp / "s.csv", [sample])
    assert read_samples(tmp / "s.csv") == [sample]
    save_profile(profile_from_samples([*SAMPLES, sample], "x.csv"), tmp / "p.json")
    assert load_profile(tmp / "p.json").samples[-1] == sample


def test_old_column_order_still_loads(tmp_path):
    """A profile written with the previous column order (step_ms before prefill_attention_tokens,
    as the shipped one) loads with the same samples."""
    path = tmp_path / "p.json"
    save_profile(profile_from_samples(SAMPLES, "x.csv"), path)
    data = json.loads(path.read_text())
    columns = data["samples"]["columns"]
    order = [*columns[:5], "step_ms", "prefill_attention_tokens", *columns[7:]]
    data["samples"] = {"columns": order,
                       "rows": [[row[columns.index(c)] for c in order] for row in data["samples"]["rows"]]}
    path.write_text(json.dumps(data))
    assert load_profile(path).samples == SAMPLES


def test_sample_with_swaps_has_no_row():
    """A sample whose step copies blocks cannot be written to a samples file (it cannot be fitted)."""
    with pytest.raises(ValueError, match="swap copies"):
        Sample(StepShape(decode_seqs=1, decode_context_tokens=5, swap_in_tokens=16), 1.0).row()
