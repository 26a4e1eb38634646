"""`servesim calibrate fit`, `servesim profile show|predict`, and samples CSV errors."""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from calibrate.profile import load_profile
from calibrate.samples import SamplesError, read_samples
from experiments.commands.calibrate import calibrate
from experiments.commands.profile import profile
from sim.batch import StepShape, chunk_attention

COLUMNS = ["prefill_tokens", "prefill_seqs", "prefill_context_tokens", "decode_seqs", "decode_context_tokens",
           "prefill_attention_tokens", "step_ms"]


def known_ms(s: StepShape) -> float:
    return 2 + 0.01 * s.prefill_tokens + 1e-6 * s.attention_work + 0.05 * s.decode_seqs + 1e-4 * s.decode_context_tokens


def write_known(path, with_attention: bool = True) -> list[StepShape]:
    shapes = []
    for chunk in (16, 128, 512, 2048):
        for context in (0, 1024, 4096):
            shapes.append(StepShape(prefill_tokens=chunk, prefill_seqs=1, prefill_context_tokens=context,
                                    prefill_attention_tokens=chunk_attention(chunk, context)))
            shapes.append(StepShape(prefill_tokens=chunk, prefill_seqs=1, prefill_context_tokens=context,
                                    prefill_attention_tokens=chunk_attention(chunk, context), decode_seqs=8,
                                    decode_context_tokens=8 * context + 8))
    for batch in (1, 8, 64, 256):
        for context in (16, 512, 4096):
            shapes.append(StepShape(decode_seqs=batch, decode_context_tokens=batch * context))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS if with_attention else [c for c in COLUMNS if c != "prefill_attention_tokens"])
        for s in shapes:
            row = [s.prefill_tokens, s.prefill_seqs, s.prefill_context_tokens, s.decode_seqs, s.decode_context_tokens]
            row += [s.prefill_attention_tokens] if with_attention else []
            w.writerow([*row, known_ms(s)])
    return shapes


@pytest.mark.parametrize("with_attention", [True, False])
def test_fit_cli_recovers_known_formula(tmp_path, with_attention):
    """`calibrate fit` on a known formula's steps gives a profile within 1% of the formula."""
    shapes = write_known(tmp_path / "s.csv", with_attention)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(calibrate, ["fit", str(tmp_path / "s.csv"), "--model", "tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out error" in result.output and "decode" in result.output
    model = load_profile(out).model_fit
    for s in shapes:
        assert model.predict_ms(s) == pytest.approx(known_ms(s), rel=0.01)
    assert model.predict_ms(StepShape(prefill_tokens=3000, prefill_seqs=3, prefill_context_tokens=7000,
                                      decode_seqs=100, decode_context_tokens=90_000)) == pytest.approx(
        known_ms(StepShape(prefill_tokens=3000, prefill_seqs=3, prefill_context_tokens=7000, decode_seqs=100,
                           decode_context_tokens=90_000)), rel=0.01)


def test_profile_show_and_plot(tmp_path):
    """`profile show` prints provenance and the error table and writes the scatter plot."""
    write_known(tmp_path / "s.csv")
    out = tmp_path / "p.json"
    CliRunner().invoke(calibrate, ["fit", str(tmp_path / "s.csv"), "--model", "tiny", "-o", str(out)])
    result = CliRunner().invoke(profile, ["show", str(out), "--plot", str(tmp_path / "fit.png")])
    assert result.exit_code == 0, result.output
    for text in ("kv_bytes_per_token", "source", "csv:", "held-out (5-fold)", "median %", "decode_context_tokens"):
        assert text in result.output
    assert "pad_rows (engine)" + " " * 11 + "none" in result.output  # a fit from a CSV: no engine padding
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_predict(tmp_path):
    """`profile predict` prints one predicted step_ms per row, and prices swap columns."""
    write_known(tmp_path / "s.csv")
    out = tmp_path / "p.json"
    CliRunner().invoke(calibrate, ["fit", str(tmp_path / "s.csv"), "--model", "tiny", "-o", str(out)])
    shapes = tmp_path / "shapes.csv"
    shapes.write_text("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,"
                      "swap_in_tokens\n100,1,0,0,0,0\n0,0,0,10,1000,0\n0,0,0,10,1000,16\n")
    result = CliRunner().invoke(profile, ["predict", str(out), str(shapes)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(result.output.splitlines()))
    assert len(rows) == 3
    predicted = [float(r["predicted_step_ms"]) for r in rows]
    assert predicted[0] == pytest.approx(known_ms(StepShape(prefill_tokens=100, prefill_seqs=1)), rel=0.01)
    assert predicted[2] > predicted[1]


def test_calibrate_needs_model_and_output():
    """`calibrate` without --model is a usage error that points at `calibrate fit` too."""
    result = CliRunner().invoke(calibrate, ["--quick"])
    assert result.exit_code == 2 and "--model and -o/--output are required" in result.output


def test_group_options_before_fit_refused(tmp_path):
    """Options given to `calibrate` itself before `fit` are refused rather than ignored."""
    write_known(tmp_path / "s.csv")
    result = CliRunner().invoke(calibrate, ["--quick", "fit", str(tmp_path / "s.csv"), "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "option(s) --quick must come after `fit`" in result.output


def test_fit_cli_bad_csv_names_file_line_field(tmp_path):
    """A malformed samples CSV fails with the file, the line and the field."""
    bad = tmp_path / "bad.csv"
    bad.write_text("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n"
                   "16,1,0,0,0,1.5\n16,1,0,zero,0,1.5\n")
    result = CliRunner().invoke(calibrate, ["fit", str(bad), "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 1
    assert f"{bad}:3: field 'decode_seqs' is not a number: 'zero'" in result.output


@pytest.mark.parametrize(("text", "message"), [
    ("prefill_tokens,prefill_seqs,decode_seqs,decode_context_tokens,step_ms\n1,1,0,0,1\n",
     r":1: missing column\(s\) prefill_context_tokens"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n",
     "no rows after the header"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n16,0,0,0,0,1\n",
     r":2: field 'prefill_seqs' is 0 but 'prefill_tokens' is 16"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n0,0,0,4,40,-1\n",
     r":2: field 'step_ms' must be a finite number >= 0"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n0,0,0,4,4.5,1\n",
     r":2: field 'decode_context_tokens' must be an integer"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n0,0,0,0,0,1\n",
     r":2: an empty step"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms\n0,0,0,4,40\n",
     r":2: field 'step_ms' is missing"),
    ("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms,swap_in_tokens\n"
     "0,0,0,4,40,1,16\n", r":2: field 'swap_in_tokens' is not 0"),
])
def test_samples_errors(tmp_path, text, message):
    """Every malformed samples file is a SamplesError naming the file and, for rows, line and field."""
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(SamplesError, match=message) as e:
        read_samples(path)
    assert str(e.value).startswith(str(path))


def test_live_steps_csv_read_in_seconds(tmp_path):
    """A `servesim run` steps.csv (step_s, swap columns at 0) reads as samples in milliseconds."""
    path = tmp_path / "steps.csv"
    path.write_text("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,"
                    "prefill_attention_tokens,swap_in_tokens,swap_out_tokens,step_s\n"
                    "100,1,0,2,50,5050.0,0,0,0.0125\n")
    (s,) = read_samples(path)
    assert s.step_ms == pytest.approx(12.5) and s.shape.prefill_attention_tokens == 5050.0 and s.kind == "mixed"
