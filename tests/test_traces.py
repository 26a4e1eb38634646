"""Trace loaders: formats, detection, the embedded Azure trace, errors that locate the bad field."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from experiments.commands.traces import traces
from sim.traces import EMBEDDED_TRACES, TraceError, load_lengths, load_trace, trace_stats

SHARED = Path("/work/shared/traces")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs /work/shared/traces")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, fmt: str = "auto") -> TraceError:
    with pytest.raises(TraceError) as info:
        load_trace(str(path), fmt)
    return info.value


# -- formats ---------------------------------------------------------------------------------------


def test_servesim_csv_round_trips_values(tmp_path):
    """A servesim CSV loads as written, priority column included."""
    path = write(
        tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens,priority\n0,10,5,1\n0.5,20,6,0\n0.5,30,7,2\n"
    )
    trace = load_trace(str(path))
    assert trace.fmt == "servesim"
    assert trace.arrival_s is not None
    assert trace.arrival_s.tolist() == [0.0, 0.5, 0.5]
    assert trace.prompt_tokens.tolist() == [10, 20, 30]
    assert trace.output_tokens.tolist() == [5, 6, 7]
    assert trace.priority.tolist() == [1, 0, 2]
    assert trace.prompt_tokens.dtype == np.int64 and trace.arrival_s.dtype == np.float64


def test_servesim_without_priority_defaults_to_zero(tmp_path):
    """Priority is optional and defaults to 0; blank lines are skipped."""
    path = write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n1.5,10,5\n\n2.0,3,4\n\n")
    trace = load_trace(str(path))
    assert len(trace) == 2
    assert trace.priority.tolist() == [0, 0]


def test_azure_timestamps_are_seconds_since_first_row(tmp_path):
    """Azure timestamps with 7 fractional digits become exact seconds since the first row, across midnight."""
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.9999999,374,44\n"
        "2023-11-17 00:00:00.0000001,396,109\n"
        "2023-11-17 00:00:01,5,6\n"
    )
    trace = load_trace(str(write(tmp_path, "a.csv", text)))
    assert trace.fmt == "azure"
    assert trace.arrival_s is not None
    assert trace.arrival_s == pytest.approx([0.0, 2e-7, 1.0000001], abs=1e-9)
    assert trace.prompt_tokens.tolist() == [374, 396, 5]


def test_azure_zero_length_is_clamped_and_counted(tmp_path):
    """A vendor trace's zero length is raised to 1 and counted, while servesim files reject it."""
    azure = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,0\n")
    trace = load_trace(str(azure))
    assert trace.output_tokens.tolist() == [1]
    assert trace.clamped == 1
    strict = write(tmp_path, "s.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,0\n")
    assert "line 2, field 'output_tokens'" in str(error_of(strict))


def test_mooncake_jsonl_in_milliseconds(tmp_path):
    """Mooncake JSONL timestamps are milliseconds; hash_ids is ignored."""
    text = (
        '{"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [0]}\n'
        '{"timestamp": 1500, "input_length": 200, "output_length": 6, "hash_ids": [0, 1]}\n'
    )
    trace = load_trace(str(write(tmp_path, "m.jsonl", text)))
    assert trace.fmt == "mooncake"
    assert trace.arrival_s is not None
    assert trace.arrival_s.tolist() == [0.0, 1.5]
    assert trace.prompt_tokens.tolist() == [100, 200]


def test_lengths_csv_has_no_arrivals(tmp_path):
    """A length-only CSV gives prompt/decode lengths and no arrival times."""
    text = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.8\n2015,156,2171,12.9\n"
    trace = load_trace(str(write(tmp_path, "l.csv", text)))
    assert trace.fmt == "lengths" and trace.arrival_s is None and not trace.has_arrivals
    assert trace.prompt_tokens.tolist() == [3772, 2015]
    assert trace.output_tokens.tolist() == [54, 156]
    assert trace_stats(trace)["rate_rps"] is None


def test_explicit_format_overrides_detection(tmp_path):
    """Naming a format that does not match the file reports the first missing column."""
    path = write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    error = error_of(path, "azure")
    assert (error.line, error.field) == (1, "TIMESTAMP")


def test_trace_arrays_are_read_only(tmp_path):
    """A Trace is frozen down to its arrays."""
    trace = load_trace(str(write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n")))
    with pytest.raises(ValueError):
        trace.prompt_tokens[0] = 5


# -- malformed files -----------------------------------------------------------------------------


def test_missing_column(tmp_path):
    """A missing column is reported on line 1 by name."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,priority\n0,10,0\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}, line 1, field 'output_tokens': missing column")


def test_negative_length(tmp_path):
    """A negative length names the file, the line and the field."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,-3,5\n")
    message = str(error_of(path))
    assert message == f"{path}, line 3, field 'prompt_tokens': expected a positive integer, got '-3'"


def test_negative_length_in_vendor_format(tmp_path):
    """Vendor formats clamp zeros but still reject negative lengths."""
    path = write(tmp_path, "az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,-1\n")
    error = error_of(path)
    assert str(path) in str(error) and (error.line, error.field) == (2, "GeneratedTokens")


def test_non_numeric_length(tmp_path):
    """A non-numeric length names the file, the line and the field."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10,5\n2,10,lots\n")
    message = str(error_of(path))
    assert message == f"{path}, line 4, field 'output_tokens': expected a positive integer, got 'lots'"


def test_non_numeric_length_in_jsonl(tmp_path):
    """A Mooncake record with a non-integer length names its line and key."""
    text = (
        '{"timestamp": 0, "input_length": 1, "output_length": 1}\n'
        '{"timestamp": 1, "input_length": 1.5, "output_length": 1}\n'
    )
    path = write(tmp_path, "m.jsonl", text)
    error = error_of(path)
    assert str(path) in str(error) and (error.line, error.field) == (2, "input_length")


def test_bad_timestamp(tmp_path):
    """An unparseable Azure timestamp names the file, the line and the field."""
    path = write(
        tmp_path,
        "az.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1,1\n2023-13-01 00:00:00,1,1\n",
    )
    message = str(error_of(path))
    assert message.startswith(f"{path}, line 3, field 'TIMESTAMP': expected a time like")


def test_non_numeric_arrival(tmp_path):
    """A non-numeric servesim arrival names the file, the line and the field."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\nsoon,1,1\n")
    assert str(error_of(path)).startswith(f"{path}, line 2, field 'arrival_s': expected a non-negative number")


def test_unsorted_timestamps(tmp_path):
    """The line where time goes backwards is reported."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n2,1,1\n\n1,1,1\n3,1,1\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}, line 5, field 'arrival_s': time goes backwards")


def test_unsorted_azure_timestamps(tmp_path):
    """Azure rows out of order are reported at the later, earlier-stamped line."""
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47,1,1\n2023-11-16 18:15:46.5,1,1\n"
    error = error_of(write(tmp_path, "az.csv", text))
    assert (error.line, error.field) == (3, "TIMESTAMP")


def test_unsorted_mooncake(tmp_path):
    """Mooncake records out of order are reported at their line and key."""
    text = (
        '{"timestamp": 5, "input_length": 1, "output_length": 1}\n'
        '{"timestamp": 4, "input_length": 1, "output_length": 1}\n'
    )
    error = error_of(write(tmp_path, "m.jsonl", text))
    assert (error.line, error.field) == (2, "timestamp")


def test_empty_file(tmp_path):
    """An empty file is reported on line 1."""
    path = write(tmp_path, "trace.csv", "")
    error = error_of(path)
    assert str(error).startswith(f"{path}, line 1: empty file")
    assert error.field is None


def test_header_only(tmp_path):
    """A header with no rows is reported on line 2."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n")
    assert str(error_of(path)) == f"{path}, line 2: no rows after the header"


def test_unknown_header(tmp_path):
    """A header of no known format lists the expected ones."""
    path = write(tmp_path, "trace.csv", "a,b,c\n1,2,3\n")
    message = str(error_of(path))
    assert "line 1" in message and "arrival_s,prompt_tokens,output_tokens" in message


def test_short_row(tmp_path):
    """A row with too few fields names the first missing field."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n0,1\n")
    error = error_of(path)
    assert (error.line, error.field) == (2, "output_tokens")


def test_unknown_name():
    """An unknown name that is not a file lists the embedded traces."""
    with pytest.raises(ValueError, match="azure-conv"):
        load_trace("no-such-trace")


def test_unknown_format(tmp_path):
    """An unknown format name lists the known ones."""
    with pytest.raises(ValueError, match="servesim"):
        load_trace("azure-conv", "parquet")


# -- the embedded Azure trace --------------------------------------------------------------------------


def test_azure_conv_shape():
    """azure-conv loads fast with the shape its README states."""
    started_s = time.perf_counter()
    trace = load_trace("azure-conv")
    elapsed_s = time.perf_counter() - started_s
    assert elapsed_s < 1.0
    assert trace.fmt == "azure" and len(trace) == 19_366 and trace.clamped == 0
    stats = trace_stats(trace)
    assert stats["prompt_tokens"]["p50"] == 1020
    assert stats["prompt_tokens"]["p99"] == 4142
    assert stats["prompt_tokens"]["max"] == 14050
    assert stats["output_tokens"]["p50"] == 129
    assert stats["output_tokens"]["max"] == 1000
    assert int(trace.prompt_tokens.min()) == 2 and int(trace.output_tokens.min()) == 7
    assert stats["span_s"] == pytest.approx(3501.721937, abs=1e-6)
    assert stats["rate_rps"] == pytest.approx(5.53, abs=0.01)
    assert stats["interarrival_cv"] == pytest.approx(1.09, abs=0.01)
    assert stats["gamma_k"] == pytest.approx(1 / stats["interarrival_cv"] ** 2)


def test_embedded_data_ships_with_licence():
    """Every embedded trace sits in sim/data next to its licence, attribution and README."""
    from importlib import resources

    data = resources.files("sim") / "data"
    for file in EMBEDDED_TRACES.values():
        assert (data / file).is_file()
    for extra in ("azure-conv.LICENSE.txt", "azure-conv.ATTRIBUTION.md", "README.md"):
        assert (data / extra).is_file()


@needs_shared
def test_embedded_azure_is_unmodified():
    """The embedded copy is byte-identical to the published file."""
    from importlib import resources

    published = (SHARED / "azure2023" / "AzureLLMInferenceTrace_conv.csv").read_bytes()
    assert (resources.files("sim") / "data" / "azure-conv.csv").read_bytes() == published


# -- the shared real traces --------------------------------------------------------------------------


@needs_shared
def test_mooncake_conversation_trace():
    """The Mooncake conversation trace loads with its known shape."""
    trace = load_trace(str(SHARED / "mooncake" / "conversation_trace.jsonl"))
    assert trace.fmt == "mooncake" and len(trace) == 12_031 and trace.clamped == 0
    assert trace.arrival_s is not None and trace.arrival_s[0] == 0.0
    assert float(np.median(trace.prompt_tokens)) == 6909


@needs_shared
@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("sharegpt_8k_filtered_stats_llama2_tokenizer.csv", 30_731),
        ("arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv", 28_257),
        ("bwb_stats_llama2_tokenizer_filtered_v2.csv", 33_768),
    ],
)
def test_length_only_traces(name, rows):
    """Each shared length-only CSV loads every row without arrivals."""
    trace = load_trace(str(SHARED / "lengths" / name))
    assert trace.fmt == "lengths" and trace.arrival_s is None and len(trace) == rows


# -- empirical length files ------------------------------------------------------------------------


def test_load_lengths_one_column(tmp_path):
    """A one-column file, with or without a header, is a list of lengths."""
    assert load_lengths(str(write(tmp_path, "a.txt", "tokens\n5\n7\n\n9\n")), "prompt").tolist() == [5, 7, 9]
    assert load_lengths(str(write(tmp_path, "b.txt", "5\n7\n")), "output").tolist() == [5, 7]


def test_load_lengths_bad_value(tmp_path):
    """A bad value in a one-column file names its line."""
    path = write(tmp_path, "a.txt", "5\n0\n")
    with pytest.raises(TraceError, match=r"a\.txt, line 2, field 'length'"):
        load_lengths(str(path), "prompt")


def test_load_lengths_from_trace_picks_role(tmp_path):
    """A length-only CSV gives num_prefill_tokens for prompts and num_decode_tokens for outputs."""
    path = str(write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n10,2\n20,3\n"))
    assert load_lengths(path, "prompt").tolist() == [10, 20]
    assert load_lengths(path, "output").tolist() == [2, 3]


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_show_prints_stats():
    """`traces show azure-conv` prints rows, rate and the median lengths."""
    result = CliRunner().invoke(traces, ["show", "azure-conv"])
    assert result.exit_code == 0, result.output
    assert "19,366" in result.output and "5.53 req/s" in result.output and "1,020.0" in result.output


def test_cli_show_bad_file_is_a_clean_error(tmp_path):
    """A malformed file gives the located message, not a traceback."""
    path = write(tmp_path, "trace.csv", "arrival_s,prompt_tokens,output_tokens\n0,-3,1\n")
    result = CliRunner().invoke(traces, ["show", str(path), "--format", "servesim"])
    assert result.exit_code == 1
    assert "line 2, field 'prompt_tokens'" in result.output
