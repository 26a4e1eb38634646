"""Does one calibration generalize? Validate ONE profile against workloads it never saw, and
print one table with a verdict per cell.

Calibration's live phase serves a synthetic workload (Poisson arrivals, uniform lengths:
:mod:`calibrate.live`), never these. The cells are workload x load x policy:

- ``azure-conv``: a slice of the embedded Azure conversation trace from row
  :data:`AZURE_START` (``servesim validate`` and the demo use rows from 0);
- ``mooncake``: the Mooncake (Kimi) conversation trace, its coarse timestamps kept;
- ``sharegpt``, ``arxiv``, ``bwb``: the length statistics of ShareGPT conversations, arXiv
  summarisation and BWB translation (long outputs), under Poisson arrivals and under bursty
  Gamma arrivals (shape :data:`GAMMA_BURSTINESS`, ``-gamma``);

each at 50% and 85% of its simulated saturation throughput, under continuous batching and
chunked prefill. A cell replays the requests that arrive within ``--live-s`` seconds at its
load (:data:`SIZES`), so cheap and costly workloads get live runs of about the same length.
Lengths are scaled proportionally so the longest request of a slice fits
(``--max-prompt-tokens`` / ``--max-output-tokens``; the model's defaults keep a CPU step short).
Each cell is ``servesim validate``'s job (:mod:`experiments.validation`): served live
``--repeats`` times and simulated once, then judged against the tolerances.

Every cell writes its own directory under ``OUT/cells/``; a rerun with the same arguments
skips the cells whose ``validation.json`` is there (resumable), and the table is rebuilt from
those files. ``--dry-run`` prints the plan and its estimated runtime (the simulated duration of
every live run, plus the speed checks) without serving anything.

    python experiments/fidelity.py --profile small.json -o runs/fidelity          # every cell
    python experiments/fidelity.py --profile small.json --quick -o runs/fidelity-q  # ~15 min
    python experiments/fidelity.py --profile small.json --dry-run                   # the estimate
    python experiments/fidelity.py --url http://127.0.0.1:8000 --profile vllm-http.json \
        --workloads azure-conv,mooncake,sharegpt-poisson -o runs/fidelity-vllm          # a vLLM server

With ``--url`` every cell is ``servesim validate --url``'s job instead: the slice is replayed
against a server the user runs (vLLM, or anything with its API and ``/metrics``) with ``servesim
bench``'s client and simulated with the ``vllm`` policy under the settings read from the server;
a black box shows no steps, so there is no step-median check, and its device column is the
server's speed: the calibration's lone prefills and decode batches sent again around the live runs
(:func:`calibrate.vllm_blackbox.server_speed`; a profile from ``calibrate --url``).

Without ``--profile`` it first calibrates the model (``servesim calibrate --quick``'s grid)
into ``OUT/profile.json``, or reuses the one there. Writes ``OUT/fidelity.md`` and
``OUT/fidelity.json``; exit status 1 with ``--strict`` when a cell fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = ROOT.parent / "shared" / "traces"
AZURE_START = 10_000
"""First row of the azure-conv slice: far from the rows ``validate`` and the demo replay."""
GAMMA_BURSTINESS = 0.25
"""Gamma shape of the bursty arrivals: inter-arrival CV 2 (Poisson is 1)."""
LOADS = (0.5, 0.85)
POLICIES = ("continuous", "chunked")
SIZES = {"full": (40.0, 3), "quick": (10.0, 1)}
"""(seconds of arrivals per live run, live runs per cell) of a full run and of ``--quick``. A
cell's requests are those arriving within that time at its load (``load`` x saturation x
seconds, within :data:`REQUESTS_RANGE`), so every cell's live runs last about as long whatever
its workload costs: long enough for the engine to settle into its load, not so long that
32 cells take all day on a CPU."""
REQUESTS_RANGE = (20, 400)
PROBE_REQUESTS = 100
"""Requests of the slice whose simulated saturation sizes a cell."""
SPEED_CHECK_S = 4.0
"""About what the speed checks around the live runs and the engine build take per cell."""


@dataclass(frozen=True)
class Workload:
    """One workload: a trace (embedded name or a file under the traces directory) and, for a
    length-only trace, its arrival process."""

    name: str
    trace: str
    start: int = 0
    arrival: str = "poisson"
    burstiness: float = 1.0
    relative: bool = True
    """``trace`` is a path under the traces directory (else an embedded name)."""

    def path(self, traces: Path) -> str:
        return str(traces / self.trace) if self.relative else self.trace


_LENGTHS = {"sharegpt": "lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
            "arxiv": "lengths/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
            "bwb": "lengths/bwb_stats_llama2_tokenizer_filtered_v2.csv"}
WORKLOADS = {w.name: w for w in [
    Workload("azure-conv", "azure-conv", start=AZURE_START, relative=False),
    Workload("mooncake", "mooncake/conversation_trace.jsonl"),
    *[Workload(f"{name}-{arrival}", path, arrival=arrival, burstiness=GAMMA_BURSTINESS if arrival == "gamma" else 1.0)
      for name, path in _LENGTHS.items() for arrival in ("poisson", "gamma")],
]}


@dataclass(frozen=True)
class Cell:
    workload: Workload
    load: float
    policy: str

    @property
    def name(self) -> str:
        return f"{self.workload.name}-load{round(self.load * 100)}-{self.policy}"


def cells(workloads: Sequence[str], loads: Sequence[float], policies: Sequence[str]) -> list[Cell]:
    """Every workload x load x policy, in table order."""
    return [Cell(WORKLOADS[w], load, p) for w in workloads for load in loads for p in policies]


# -- the table (pure: from validation.json contents) ---------------------------------------------

ERROR_COLUMNS = (("mean TTFT", "mean_ttft_ms"), ("mean TPOT", "mean_tpot_ms"), ("mean E2EL", "mean_e2el_ms"),
                 ("throughput", "output_throughput"), ("p99 TTFT", "p99_ttft_ms"), ("p99 TPOT", "p99_tpot_ms"),
                 ("p99 E2EL", "p99_e2el_ms"))
"""The table's error columns (label, validation.json key); throughput is output tok/s (the
verdict also checks request throughput)."""
ERROR_COLUMNS_BY_KEY = tuple((key, label) for label, key in ERROR_COLUMNS)


def row(cell: Cell, data: dict[str, Any], tolerances: Any) -> dict[str, Any]:
    """One table row from a cell's ``validation.json`` contents, judged against ``tolerances``
    (recomputed, so a rerun with other tolerances needs no live run)."""
    from experiments.validation.errors import metric_spread
    from experiments.validation.verdict import judge

    verdict = judge(data, data.get("median_step_rel_error"), tolerances)
    out: dict[str, Any] = {"workload": cell.workload.name, "load": cell.load, "policy": cell.policy,
                           "requests": (data.get("setup") or {}).get("workload", {}).get("num_requests"),
                           "live_runs": data.get("live_runs", 1)}
    for _, key in ERROR_COLUMNS:
        out[key] = {"error": data[key]["rel_error"], "live_spread": metric_spread(data[key])}
    out["median_step_rel_error"] = data.get("median_step_rel_error")  # None: a black box
    spreads = [s for s in (metric_spread(data[k]) for k in ("mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms"))
               if s is not None]
    out["max_mean_live_spread"] = max(spreads) if spreads else None
    speeds = [x for x in (data.get("device_speed_vs_profile") or {}).values() if x is not None]
    out["device_speed_vs_profile"] = max(speeds, key=lambda x: abs(x - 1)) if speeds else None
    paces = data.get("live_run_paces") or []  # absent: a black box, or a validation from before paces
    out["step_pace"] = sum(paces) / len(paces) if paces else None
    stream = data.get("stream_steps") or {}  # a server's steps read from its streams
    out["stream_step_median"] = stream.get("median_step_rel_error")
    stream_paces = [p for p in stream.get("run_paces") or [] if p == p]
    out["stream_step_pace"] = sum(stream_paces) / len(stream_paces) if stream_paces else None
    out["verdict"] = verdict.label
    out["failed"] = [c.metric for c in verdict.failed]
    out["noisy"] = [c.metric for c in verdict.noisy]
    at = data.get("at_device_speed")  # absent: a black box, or a cell from before it was kept
    if at:
        at_verdict = judge(at, at.get("median_step_rel_error"), tolerances)
        out["at_device_speed"] = {"factor": at["factor"], "verdict": at_verdict.label,
                                  "failed": [c.metric for c in at_verdict.failed],
                                  "mean_errors": {key: at[key]["rel_error"] for _, key in ERROR_COLUMNS}}
    else:
        out["at_device_speed"] = None
    return out


def _pct(x: float | None, signed: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def _cell(entry: dict[str, Any]) -> str:
    """``+3.2% (5%)``: the error and, in brackets, the live runs' spread."""
    spread = entry["live_spread"]
    return _pct(entry["error"]) + ("" if spread is None else f" ({spread * 100:.0f}%)")


def _at_speed(at: dict[str, Any] | None) -> str:
    """``PASS`` or ``FAIL: mean TTFT +12.1%`` (the worst failed check) at the device's speed."""
    if not at:
        return "-"
    if at["verdict"] == "PASS" or not at["failed"]:
        return at["verdict"]
    labels = dict(ERROR_COLUMNS_BY_KEY)
    shown = [k for k in at["failed"] if k in at["mean_errors"]]
    if not shown:
        return at["verdict"]
    worst = max(shown, key=lambda k: abs(at["mean_errors"][k]))
    return f"FAIL: {labels[worst]} {_pct(at['mean_errors'][worst])}"


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "load", "policy", "n", *(label for label, _ in ERROR_COLUMNS), "step median", "step pace",
            "device", "verdict", "at device speed"]
    body = []
    for r in rows:
        verdict = r["verdict"] + ("*" if r["noisy"] else "")
        speed, pace = r["device_speed_vs_profile"], r.get("step_pace")
        median = _pct(r["median_step_rel_error"], signed=False)
        if r["median_step_rel_error"] is None and r.get("stream_step_median") is not None:
            median, pace = "~" + _pct(r["stream_step_median"], signed=False), r.get("stream_step_pace")
            pace_text = "-" if pace is None else f"~x{pace:.2f}"
        else:
            pace_text = "-" if pace is None else f"x{pace:.2f}"
        body.append([r["workload"], f"{r['load']:.0%}", r["policy"], str(r["requests"] or "-"),
                     *(_cell(r[key]) for _, key in ERROR_COLUMNS), median, pace_text,
                     "-" if speed is None else f"x{speed:.2f}",
                     verdict, _at_speed(r.get("at_device_speed"))])
    return head, body


LEGEND = ("n: requests per cell. Errors are (sim - live) / live against the mean of the live runs; in brackets, "
          "the live runs' spread (max - min) / mean. step median: median |error| of the profile's price of every "
          "live step. step pace: the live steps' summed time over the profile's price of the same steps, "
          "mean of the live runs (x1.10: the steps ran 10% longer than priced, so TPOT comes out about that "
          "much low); ~: a server's, from the steps its token streams show whole (not in its verdict). "
          "device: the calibration's control steps (a profile without them: its own grid steps; a server: "
          "its calibration's lone prefills and decode batches) timed again around the live runs, "
          "time now / at calibration (x1.00: as fast; the one furthest from 1). "
          "verdict: {tolerances}; * marks a cell whose live runs were further apart than a tolerance "
          "(the device did not reproduce itself). at device speed: the verdict of the same requests "
          "simulated again with every step priced at the device's speed (the median of the speed checks "
          "around the live runs, never the workload's steps); it tells "
          "the model's error from the device's drift since calibration and does not replace the verdict.")


def format_text(rows: Sequence[dict[str, Any]]) -> str:
    head, body = table_rows(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head, body = table_rows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def totals(rows: Sequence[dict[str, Any]]) -> str:
    passed = sum(r["verdict"] == "PASS" for r in rows)
    noisy = sum(bool(r["noisy"]) for r in rows)
    text = f"{passed} of {len(rows)} cells PASS" + (f"; {noisy} with live runs beyond a tolerance (*)" if noisy else "")
    at = [r["at_device_speed"] for r in rows if r.get("at_device_speed")]
    if at:
        text += (f"; at the device's speed around the live runs, {sum(a['verdict'] == 'PASS' for a in at)} of "
                 f"{len(at)}")
    return text


# -- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """``--url``: the server every cell is validated against, and what it does not publish."""

    url: str
    settings: Any
    """Its :class:`~experiments.engine_settings.EngineSettings`, read once."""
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None


def plan_cell(cell: Cell, profile: Path, model: str, traces: Path, num_requests: int | None, live_s: float,
              max_prompt_tokens: int | None, max_output_tokens: int | None, threads: int | None, seed: int,
              server: Server | None = None) -> Any:
    """The cell's resolved :class:`~experiments.validation.Plan` (an
    :class:`~experiments.validation.external.ExternalPlan` with ``server``; nothing served yet):
    its ``num_requests``, or (None) the requests arriving within ``live_s`` at its load."""
    from calibrate.profile import load_profile
    from experiments.validation.external import lengths_for, make_external_plan
    from experiments.validation.plan import default_lengths, make_plan
    from sim.policies.base import SchedulerConfig
    from sim.workload import TraceReplay

    if server is None:
        mp, mo = default_lengths(model, max_prompt_tokens, max_output_tokens)
    else:
        mp, mo = lengths_for(load_profile(profile), max_prompt_tokens, max_output_tokens)
    w = cell.workload

    def plan(n: int) -> Any:
        workload = TraceReplay(trace=w.path(traces), start=w.start, num_requests=n, arrival=w.arrival,
                               burstiness=w.burstiness, seed=seed, max_prompt_tokens=mp, max_output_tokens=mo)
        if server is not None:
            return make_external_plan(server.url, profile, workload, server.settings, server.max_num_seqs,
                                      server.max_num_batched_tokens, "fcfs", cell.load)
        return make_plan(profile, model, "cpu", None, threads, workload, SchedulerConfig(policy=cell.policy), None,
                         cell.load, seed)

    if num_requests is not None:
        return plan(num_requests)
    probe = plan(PROBE_REQUESTS)
    return plan(requests_for(live_s, cell.load, probe.capacity_rps))


def requests_for(live_s: float, load: float, saturation_rps: float) -> int:
    """Requests arriving within ``live_s`` at ``load`` x ``saturation_rps``, within :data:`REQUESTS_RANGE`."""
    lo, hi = REQUESTS_RANGE
    return max(lo, min(hi, round(live_s * load * saturation_rps)))


def estimate_s(plan: Any, repeats: int) -> float:
    """Seconds a cell will take: the simulated duration of its requests (what the live engine
    takes when the profile is right) per live run, plus the speed checks."""
    from calibrate.profile import CalibratedCost
    from experiments.validation.external import ExternalPlan
    from experiments.validation.runs import simulate_run
    from sim.cluster import make_router
    from sim.engine import simulate

    cost = CalibratedCost(plan.profile)
    if isinstance(plan, ExternalPlan):
        sim = simulate(plan.workload.requests(), plan.policy, cost, make_router("round_robin"), 1)
        return repeats * max(r.finish_s for r in sim.requests if r.finish_s is not None)
    sim = simulate_run(plan.workload.requests(), plan.live, cost)
    finish_s = max(r.finish_s for r in sim.requests if r.finish_s is not None)
    return repeats * (finish_s + SPEED_CHECK_S)


def cell_key(cell: Cell, args: argparse.Namespace, profile: Path) -> dict[str, Any]:
    """What a cell's result depends on; a stored cell is reused only when it matches."""
    return {"cell": cell.name, "profile": str(profile.resolve()), "requests": args.requests, "live_s": args.live_s,
            "repeats": args.repeats,
            "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens,
            "threads": args.threads, "seed": args.seed, "url": args.url, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            **({"warmup_runs": args.warmup_runs} if args.warmup_runs else {})}


def stored(directory: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's validation.json when it was written for ``key``."""
    path = directory / "validation.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if data.get("fidelity_cell") == key else None


def ensure_profile(args: argparse.Namespace, out: Path, echo: Callable[[str], None]) -> Path:
    """``--profile``, else ``OUT/profile.json`` (calibrated now when it is not there yet)."""
    if args.profile is not None:
        if not args.profile.is_file():
            raise SystemExit(f"--profile: {args.profile} does not exist (make one with servesim calibrate --model "
                             f"{args.model} --quick --threads 1 -o PROFILE)")
        return Path(args.profile)
    path = out / "profile.json"
    if path.is_file():
        echo(f"reusing the calibration in {path}")
        return path
    from calibrate.calibration import CalibrationError, poor_fit_problems, run_calibration
    from calibrate.profile import save_profile

    echo(f"calibrating {args.model} (quick grid, {args.threads or 'default'} thread(s)) into {path} ...")
    try:
        profile = run_calibration(args.model, quick=True, threads=args.threads, device="cpu", progress=False)
    except (ValueError, CalibrationError) as e:
        raise SystemExit(f"calibration failed: {e}") from None
    problems = poor_fit_problems(profile.fit_check) if profile.fit_check else []
    if problems:
        raise SystemExit(f"poor fit: {'; '.join(problems)}; not written. Calibrate on an idle machine, or give "
                         "--profile of one made with servesim calibrate --accept-poor-fit.")
    out.mkdir(parents=True, exist_ok=True)
    save_profile(profile, path)
    echo(f"calibrated in {profile.calibration_s:.0f} s")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", type=Path, default=None, help="the one calibration to validate [default: calibrate]")
    p.add_argument("--model", default=None, help="the profile's model [default: the profile's, else small]")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS), help="fractions of saturation")
    p.add_argument("--policies", default=None, help=f"comma-separated policies [default: {','.join(POLICIES)}; "
                   "with --url: vllm, the only one a vLLM server runs]")
    p.add_argument("--url", default=None, help="validate against this server (http://HOST:PORT, vLLM's API and "
                   "/metrics) instead of servesim's live engine; needs --profile (servesim calibrate --engine "
                   "vllm --url URL --device cpu)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="--url: the server's max_num_seqs, which it "
                   "does not publish [default: vLLM's, assumed]")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="--url: the server's "
                   "max_num_batched_tokens [default: vLLM's, assumed]")
    p.add_argument("--live-s", type=float, default=None, help=f"seconds of arrivals per live run, which sizes each "
                   f"cell [full {SIZES['full'][0]:g}, --quick {SIZES['quick'][0]:g}]")
    p.add_argument("--requests", type=int, default=None, help="requests per cell instead of --live-s")
    p.add_argument("--repeats", type=int, default=None, help=f"live runs per cell [full {SIZES['full'][1]}, "
                   f"--quick {SIZES['quick'][1]}]")
    p.add_argument("--warmup-runs", type=int, default=None, help="--url: replay each cell this many times first, "
                   "not compared (a vLLM server's first replays ran 5-14%% slower) [default: 1 with --url]")
    p.add_argument("--build-tokens", type=int, default=None, help="--url: before the first cell, run one step of "
                   "every token count up to N on the server, so that vLLM's CPU backend has built each kernel "
                   "[default: 512 with a CPU profile, else 0; 0 for a server calibrate --url has just built]")
    p.add_argument("--quick", action="store_true", help="small cells, one live run each: proves it end to end")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="[the model's validation default]")
    p.add_argument("--max-output-tokens", type=int, default=None, help="[the model's validation default]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [default: the profile's]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="the shared traces directory")
    p.add_argument("--tolerance", action="append", default=[], metavar="NAME:PCT",
                   help="as servesim validate's (mean:10, p99:20, step:5)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and the estimated runtime, serve nothing")
    p.add_argument("--strict", action="store_true", help="exit 1 when a cell fails")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/fidelity"))
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    args.live_s = size[0] if args.live_s is None else args.live_s
    args.repeats = size[1] if args.repeats is None else args.repeats
    if args.requests is not None and args.requests < 2:
        p.error(f"--requests: at least 2, got {args.requests}")
    if args.repeats < 1:
        p.error(f"--repeats: at least 1, got {args.repeats}")
    if args.warmup_runs is not None and (args.warmup_runs < 0 or (args.warmup_runs and args.url is None)):
        p.error("--warmup-runs: " + ("only with --url (servesim's live engine warms up every shape itself)"
                                     if args.warmup_runs > 0 else f"0 or more, got {args.warmup_runs}"))
    if args.build_tokens is not None and (args.build_tokens < 0 or (args.build_tokens and args.url is None)):
        p.error("--build-tokens: " + ("only with --url (servesim's live engine warms up every shape itself)"
                                      if args.build_tokens > 0 else f"0 or more, got {args.build_tokens}"))
    if args.warmup_runs is None:
        from experiments.validation.external import EXTERNAL_WARMUP_RUNS

        args.warmup_runs = EXTERNAL_WARMUP_RUNS if args.url is not None else 0
    if not (math.isfinite(args.live_s) and args.live_s > 0):
        p.error(f"--live-s: seconds > 0 expected, got {args.live_s}")
    try:
        args.load_list = [float(x) for x in args.loads.split(",") if x]
    except ValueError:
        p.error(f"--loads: {args.loads!r} is not a comma-separated list of fractions")
    if not args.load_list or any(not (0 < x < 10) for x in args.load_list):
        p.error(f"--loads: fractions of saturation > 0 expected, got {args.loads!r}")
    args.workload_list = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in args.workload_list if w not in WORKLOADS]
    if unknown or not args.workload_list:
        p.error(f"--workloads: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(WORKLOADS)}")
    from sim.policies import POLICIES as REGISTERED

    policies = args.policies or ("vllm" if args.url else ",".join(POLICIES))
    args.policy_list = [x for x in policies.split(",") if x]
    bad = [x for x in args.policy_list if x not in REGISTERED]
    if bad or not args.policy_list:
        p.error(f"--policies: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(sorted(REGISTERED))}")
    if args.url is not None:
        if args.policy_list != ["vllm"]:
            p.error("--policies: with --url the server schedules, so the simulation runs the vllm policy only")
        if args.profile is None:
            p.error("--url needs --profile: a calibration of that server (servesim calibrate --engine vllm --url "
                    "URL --device cpu -o PROFILE)")
        if args.threads is not None:
            p.error("--threads: a server's threads are its own; give them when you start it")
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        value = getattr(args, name)
        if value is not None and (args.url is None or value < 1):
            p.error(f"--{name.replace('_', '-')}: " + ("a positive number expected" if args.url else "only with --url"))
    from experiments.validation.verdict import Tolerances

    try:
        args.tolerances = Tolerances.parse(args.tolerance)
    except ValueError as e:
        p.error(f"--tolerance: {e}")
    return args


def _profile_model(path: Path) -> str | None:
    try:
        model = json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _echo(line: str) -> None:
    print(line, flush=True)  # progress shows in a log file as it happens


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = _echo) -> int:
    args = parse_args(argv)
    out: Path = args.output
    if not args.traces.is_dir() and any(WORKLOADS[w].relative for w in args.workload_list):
        raise SystemExit(f"--traces: {args.traces} is not a directory (the shared traces: mooncake/, lengths/)")
    if args.profile is not None and args.model is None:
        args.model = _profile_model(args.profile)
    args.model = args.model or "small"
    profile = ensure_profile(args, out, echo) if not args.dry_run or args.profile else None
    if profile is None:
        raise SystemExit("--dry-run needs --profile (the estimate prices the cells with it)")
    server = connect(args) if args.url else None
    todo = cells(args.workload_list, args.load_list, args.policy_list)
    plans, estimates = {}, {}
    for cell in todo:
        try:
            plans[cell.name] = plan_cell(cell, profile, args.model, args.traces, args.requests, args.live_s,
                                         args.max_prompt_tokens, args.max_output_tokens, args.threads, args.seed,
                                         server)
        except ValueError as e:
            raise SystemExit(f"{cell.name}: {e}") from None
        estimates[cell.name] = estimate_s(plans[cell.name], args.repeats)
    keys = {c.name: cell_key(c, args, profile) for c in todo}
    done = {c.name: stored(out / "cells" / c.name, keys[c.name]) for c in todo}
    left_s = sum(estimates[c.name] for c in todo if done[c.name] is None)
    echo(f"{len(todo)} cells ({len(args.workload_list)} workloads x {len(args.load_list)} loads x "
         f"{len(args.policy_list)} policies), {sizing(args)}, {args.repeats} live run(s); profile "
         f"{profile}; {sum(d is not None for d in done.values())} already done; estimated {left_s / 60:.0f} min "
         "to go (simulated durations; a busy machine takes longer)")
    if args.dry_run:
        for cell in todo:
            plan = plans[cell.name]
            echo(f"  {cell.name}: {plan.workload.num_requests} requests, saturation {plan.capacity_rps:.2f} req/s, "
                 f"prompts x {plan.prompt_scale:.3f}, "
                 f"outputs x {plan.output_scale:.3f}, ~{estimates[cell.name]:.0f} s"
                 + (" (done)" if done[cell.name] is not None else ""))
        return 0
    rows = []
    started = time.perf_counter()
    if server is not None and any(d is None for d in done.values()):
        build_once(server, args, profile, echo)
    spent_s = estimated_done_s = 0.0
    for k, cell in enumerate(todo, 1):
        directory = out / "cells" / cell.name
        data = done[cell.name]
        if data is None:
            left = sum(estimates[c.name] for c in todo[k - 1:] if done[c.name] is None)
            ratio = spent_s / estimated_done_s if estimated_done_s else 1.0
            echo(f"[{k}/{len(todo)}] {cell.name}: ~{estimates[cell.name]:.0f} s; ~{left * ratio / 60:.0f} min left")
            t0 = time.perf_counter()
            run_cell(plans[cell.name], directory, args, server)
            data = json.loads((directory / "validation.json").read_text())
            data["fidelity_cell"] = keys[cell.name]
            (directory / "validation.json").write_text(json.dumps(data, indent=2) + "\n")
            spent_s += time.perf_counter() - t0
            estimated_done_s += estimates[cell.name]
        else:
            echo(f"[{k}/{len(todo)}] {cell.name}: stored")
        r = row(cell, data, args.tolerances)
        rows.append(r)
        names = ", ".join(r["failed"][:3]) + (", ..." if len(r["failed"]) > 3 else "")
        echo(f"      {r['verdict']}" + (f" ({len(r['failed'])} checks failed: {names})" if r["failed"] else ""))
    legend = LEGEND.format(tolerances=judge_text(args.tolerances, steps=server is None))
    text = format_text(rows)
    echo("")
    echo(text)
    echo(legend)
    echo(totals(rows))
    command = "python experiments/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text(
        f"# One calibration, workloads it never saw\n\n`{command}`\n\nProfile `{profile}` (model {args.model}"
        f"{'' if server is None else f'; server {server.url}'}); "
        f"{sizing(args)}, {args.repeats} live run(s)"
        f"{f' after {args.warmup_runs} warm-up run(s)' if args.warmup_runs else ''}."
        f"\n\n{format_markdown(rows)}\n\n{legend}\n\n"
        f"{totals(rows)}.\n")
    (out / "fidelity.json").write_text(json.dumps(
        {"command": command, "profile": str(profile), "model": args.model, "requests": args.requests,
         "live_s": args.live_s,
         "repeats": args.repeats, "tolerances_pct": args.tolerances.to_dict(), "rows": rows,
         "wall_s": time.perf_counter() - started}, indent=2) + "\n")
    echo(f"wrote {out}/fidelity.md, fidelity.json and cells/ ({time.perf_counter() - started:.0f} s)")
    return 1 if args.strict and any(r["verdict"] != "PASS" for r in rows) else 0


def connect(args: argparse.Namespace) -> Server:
    """``--url``: the server's settings, read once for every cell."""
    from experiments.validation.external import ExternalError, engine_settings

    try:
        settings = engine_settings(args.url)
    except ExternalError as e:
        raise SystemExit(f"--url {args.url}: {e}") from None
    return Server(args.url, settings, args.max_num_seqs, args.max_num_batched_tokens)


def build_once(server: Server, args: argparse.Namespace, profile: Path, echo: Callable[[str], None]) -> None:
    """``--url``: one step of every token count up to ``--build-tokens`` on the server before the
    first cell (vLLM's CPU backend builds a kernel per token count; the server keeps them)."""
    from calibrate.errors import CalibrationError
    from calibrate.profile import load_profile
    from calibrate.vllm_blackbox import CPU_BUILD_TOKENS, build_kernels
    from sim.policies.vllm import DEFAULT_MAX_NUM_BATCHED_TOKENS

    upto = args.build_tokens
    if upto is None:
        upto = CPU_BUILD_TOKENS if load_profile(profile).device.startswith("cpu") else 0
    try:
        build_kernels(server.url, upto, echo, budget=server.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                      max_model_len=server.settings.max_model_len)
    except CalibrationError as e:
        raise SystemExit(f"--url {server.url}: building the server's kernels: {e}") from None


def run_cell(plan: Any, directory: Path, args: argparse.Namespace, server: Server | None) -> None:
    """One cell: ``servesim validate``'s job (``--url``'s with a server), quietly; writes ``directory``."""
    from experiments.validation.output import execute

    if server is None:
        execute(plan, directory, progress=False, echo=lambda _: None, repeats=args.repeats, tolerances=args.tolerances)
        return
    from experiments.loadgen import BenchConfig
    from experiments.validation.external import ExternalError, execute_external

    try:
        execute_external(plan, BenchConfig(url=server.url, seed=args.seed, progress=False), directory, args.repeats,
                         args.tolerances, echo=lambda _: None, warmup=args.warmup_runs)
    except ExternalError as e:
        raise SystemExit(f"{directory.name}: {e}") from None


def sizing(args: argparse.Namespace) -> str:
    if args.requests is not None:
        return f"{args.requests} requests per cell"
    lo, hi = REQUESTS_RANGE
    return f"each cell the requests arriving in {args.live_s:g} s at its load ({lo}-{hi})"


def judge_text(tolerances: Any, steps: bool = True) -> str:
    """The verdict's rule; ``steps`` False for a black box (no step-median check)."""
    t = tolerances
    text = (f"PASS when mean TTFT/TPOT/E2EL and throughput are within {t.mean_pct:g}%, p99 TTFT/TPOT/E2EL within "
            f"{t.p99_pct:g}%")
    return text + (f" and the step median within {t.step_pct:g}%" if steps else
                   " (a server's steps are not seen: no step-median check)")


if __name__ == "__main__":
    sys.exit(main())
