"""Profiles: round trip, clear errors for bad files, CalibratedCost with swap copies."""

from __future__ import annotations

import json

import pytest

from calibrate.calibration import profile_from_samples
from calibrate.fit import FEATURES
from calibrate.profile import (
    SCHEMA_VERSION,
    CalibratedCost,
    ProfileError,
    load_profile,
    save_profile,
)
from calibrate.samples import CSV_COLUMNS, Sample
from sim.batch import StepShape
from sim.models import get_model

SAMPLES = [
    Sample(StepShape(64, 1, 0, 0, 0), 3.0), Sample(StepShape(512, 1, 0, 0, 0), 9.0),
    Sample(StepShape(256, 2, 512, 0, 0), 8.0), Sample(StepShape(0, 0, 0, 8, 800), 2.5),
    Sample(StepShape(0, 0, 0, 64, 64_000), 12.0), Sample(StepShape(128, 1, 0, 16, 4000), 6.0),
]


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "p.json"
    save_profile(profile_from_samples(SAMPLES, "test.csv", model="tiny", dtype="float32",
                                      kv_memory_bytes=2**26), path)
    return path


def edited(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_round_trip_keeps_predictions(profile_path):
    """A saved and reloaded profile predicts exactly what the fitted one did."""
    prof = load_profile(profile_path)
    again = profile_path.with_name("again.json")
    save_profile(prof, again)
    reloaded = load_profile(again)
    assert reloaded.to_dict() == prof.to_dict()
    assert json.loads(again.read_text())["schema_version"] == SCHEMA_VERSION
    assert prof.num_kv_blocks == 2**26 // (get_model("tiny").kv_bytes_per_token("float32") * 16)
    assert len(reloaded.samples) == len(SAMPLES)


def test_not_json(tmp_path):
    """A file that is not JSON is a ProfileError naming the file."""
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match=r"bad\.json: not valid JSON \(line 1"):
        load_profile(path)


def test_not_an_object(tmp_path):
    """A JSON list is not a profile."""
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ProfileError, match=r"list\.json: not a profile"):
        load_profile(path)


def test_missing_file(tmp_path):
    """A missing file is a ProfileError, not an OSError traceback."""
    with pytest.raises(ProfileError, match=r"nope\.json: cannot read"):
        load_profile(tmp_path / "nope.json")


def test_wrong_schema_version(profile_path):
    """Another schema version is refused, naming the field and both versions."""
    edited(profile_path, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ProfileError, match=rf"p\.json: field 'schema_version' is {SCHEMA_VERSION + 1}; "
                                           rf"this servesim reads version {SCHEMA_VERSION}"):
        load_profile(profile_path)


@pytest.mark.parametrize("field", ["device", "kv_bytes_per_token", "fit", "samples", "host_link_bytes_per_s",
                                   "created_utc"])
def test_missing_field(profile_path, field):
    """A missing top-level field is named."""
    edited(profile_path, lambda d: d.pop(field))
    with pytest.raises(ProfileError, match=rf"p\.json: field '{field}' is missing"):
        load_profile(profile_path)


@pytest.mark.parametrize("drift, message", [
    ({"control_points": "x", "checkpoints": []}, r"'drift.control_points' must be a list"),
    ({"control_points": [{"prefill": [[64]]}], "checkpoints": []}, r"'drift.control_points\[0\]': .*prefill"),
    ({"control_points": [{"decode": [4, "8"]}], "checkpoints": []}, r"'drift.control_points\[0\]': .*decode"),
    ({"control_points": [{"decode": [4]}], "checkpoints": [{"control_ms": [1.0, 2.0]}]},
     r"'drift.checkpoints': each needs control_ms, 1 times > 0"),
])
def test_malformed_control_points(profile_path, drift, message):
    """The control points a validation times again are checked at load, each fault named."""
    edited(profile_path, lambda d: d.update(drift=drift))
    with pytest.raises(ProfileError, match=message):
        load_profile(profile_path)


def test_missing_coefficient(profile_path):
    """A missing fitted coefficient is named with its path in the file."""
    edited(profile_path, lambda d: d["fit"]["coefficients_ms"].pop("decode_seqs"))
    with pytest.raises(ProfileError, match=r"field 'fit.coefficients_ms.decode_seqs' is missing"):
        load_profile(profile_path)


def test_bad_sample_named(profile_path):
    """A broken raw sample is named by its index and field."""
    column = CSV_COLUMNS.index("step_ms")
    edited(profile_path, lambda d: d["samples"]["rows"][2].__setitem__(column, "fast"))
    with pytest.raises(ProfileError, match=r"samples\.rows\[2\]: field 'step_ms' is not a number"):
        load_profile(profile_path)


def test_wrong_type_and_negative_coefficient(profile_path):
    """Wrong types and negative coefficients are named."""
    edited(profile_path, lambda d: d.update(block_size="16"))
    with pytest.raises(ProfileError, match="field 'block_size' must be int, got str"):
        load_profile(profile_path)
    edited(profile_path, lambda d: d.update(block_size=16) or d["fit"]["coefficients_ms"].update(const=-1.0))
    with pytest.raises(ProfileError, match=r"field 'fit.coefficients_ms.const' must be finite and >= 0"):
        load_profile(profile_path)


def test_calibrated_cost_adds_swap_copies(profile_path):
    """Swap tokens cost tokens x kv_bytes_per_token / host link, on top of the fitted step."""
    prof = load_profile(profile_path)
    cost = CalibratedCost(prof)
    step = StepShape(prefill_tokens=100, prefill_seqs=1, decode_seqs=4, decode_context_tokens=400)
    swapped = StepShape(prefill_tokens=100, prefill_seqs=1, decode_seqs=4, decode_context_tokens=400,
                        swap_in_tokens=32, swap_out_tokens=16)
    expected_s = 48 * prof.kv_bytes_per_token / prof.host_link_bytes_per_s
    assert cost.step_time(swapped) - cost.step_time(step) == pytest.approx(expected_s)
    assert cost.step_time(step) == pytest.approx(prof.model_fit.predict_ms(step) / 1000)
    assert set(prof.model_fit.coefficients_ms) == set(FEATURES)


def test_swap_without_kv_size_is_an_error():
    """A profile fitted without a model cannot price swaps, and says so."""
    cost = CalibratedCost(profile_from_samples(SAMPLES, "x.csv"))
    assert cost.step_time(StepShape(decode_seqs=1, decode_context_tokens=10)) > 0
    with pytest.raises(ValueError, match="no kv_bytes_per_token"):
        cost.step_time(StepShape(decode_seqs=1, decode_context_tokens=10, swap_in_tokens=16))


def test_sample_row_of_wrong_length_named(profile_path):
    """A raw sample row with a value missing is named by its index."""
    edited(profile_path, lambda d: d["samples"]["rows"][1].pop())
    with pytest.raises(ProfileError, match=r"field 'samples.rows\[1\]' must be a list of \d+ values"):
        load_profile(profile_path)


def test_profile_without_a_newer_feature_prices_as_before(profile_path):
    """A profile fitted before a feature existed (not in its fit.features) loads with that
    feature's coefficient 0; a feature this servesim does not know is named."""
    before = load_profile(profile_path).model_fit

    def drop(d):
        d["fit"]["features"].remove("decode_batch_context")
        del d["fit"]["coefficients_ms"]["decode_batch_context"]

    edited(profile_path, drop)
    loaded = load_profile(profile_path).model_fit
    assert loaded.coefficients_ms == {**before.coefficients_ms, "decode_batch_context": 0.0}
    edited(profile_path, lambda d: d["fit"]["features"].append("moon_phase"))
    with pytest.raises(ProfileError, match=r"field 'fit.features' has unknown feature\(s\) \['moon_phase'\]"):
        load_profile(profile_path)


def test_padding_round_trips_and_an_old_profile_has_none(tmp_path, profile_path):
    """The engine's padding is written with the fit and read back, pricing as before; a file
    written before it (no fit.pad_rows) has none; a malformed one is named."""
    from calibrate.fit import fit

    padding = ((2, 4), (3, 4), (8, 16))
    result = fit(SAMPLES, pad_rows=padding)
    profile = load_profile(profile_path)
    profile.model_fit = result.model
    save_profile(profile, tmp_path / "padded.json")
    loaded = load_profile(tmp_path / "padded.json").model_fit
    assert loaded.pad_rows == padding
    shape = StepShape(0, 0, 0, 8, 800)
    assert loaded.predict_ms(shape) == result.model.predict_ms(shape)
    edited(profile_path, lambda d: d["fit"].pop("pad_rows"))
    assert load_profile(profile_path).model_fit.pad_rows == ()
    edited(profile_path, lambda d: d["fit"].update(pad_rows=[[8, "16"]]))
    with pytest.raises(ProfileError, match=r"field 'fit.pad_rows' must be a list of \[rows, padded rows\]"):
        load_profile(profile_path)
    edited(profile_path, lambda d: d["fit"].update(pad_rows=[[8, 4]]))
    with pytest.raises(ProfileError, match="pad_rows must map a row count to a larger one"):
        load_profile(profile_path)
