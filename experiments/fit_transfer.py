"""Held-out error of the step-cost fit on real GPU steps and on the shipped CPU profile, this
tree's fit side by side with an earlier commit's, in one run.

For every model and tensor-parallel degree of a splitwise-sim step file (real A100 timings,
``../shared/gpu-steps/``), three splits, each fitted on one part and scored on the other:

- ``random``: a random 70% of the rows, scored on the rest (``--seeds`` draws). The file
  repeats each measured shape about five times, so nearly every scored shape was also fitted.
- ``shapes``: a random 70% of the distinct step shapes (every repeat of a shape on one side).
- ``extrap``: fitted on small steps (at most 4096 prefill tokens and 16 decodes), scored on the
  larger ones: extrapolation, the hardest.

A cell is the median over draws of each draw's median and p90 absolute percentage error, with
the range over draws in brackets. Then the shipped ``profiles/tiny-cpu.json`` samples:
``calibrate``'s own 5-fold held-out error by kind, before and after. Between them, the
ablation: each feature held at 0 in turn, on the ``shapes`` split (half the draws). Rows that contradict
monotonicity (a step at least twice as fast as one doing no more work in every field) are
counted in ``odd`` and kept: a fit cannot and should not follow them.

    python experiments/fit_transfer.py
    python experiments/fit_transfer.py --base 6ec3845 --seeds 20
    python experiments/fit_transfer.py --base c820d9a --seeds 30 --first-seed 100
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate import fit as this_fit  # noqa: E402
from calibrate.profile import load_profile  # noqa: E402
from calibrate.samples import Sample  # noqa: E402
from calibrate.splitwise import read_splitwise  # noqa: E402
from sim.batch import shape_values  # noqa: E402

STEPS = ROOT.parent / "shared" / "gpu-steps" / "splitwise_a100_perf_model.csv"
PROFILE = ROOT / "profiles" / "tiny-cpu.json"
BASE = "6ec3845"
"""The last commit before the step features were rebuilt from the roofline's terms."""
SETS = (("llama2-70b", 2), ("llama2-70b", 4), ("llama2-70b", 8), ("bloom-176b", 8))
SMALL_PREFILL_TOKENS = 4096
SMALL_DECODE_SEQS = 16
Fitter = Callable[[Sequence[Sample]], object]


def load_base_fit(rev: str) -> ModuleType:
    """``calibrate/fit.py`` as of ``rev``, imported as a module of its own."""
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:calibrate/fit.py"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"--base {rev}: cannot read calibrate/fit.py there: {out.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="servesim-fit-")) / "base_fit.py"
    path.write_text(out.stdout)
    spec = importlib.util.spec_from_file_location("base_fit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_fit"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def splits(samples: list[Sample], how: str, seeds: int, first: int = 0) -> Iterator[tuple[list[Sample], list[Sample]]]:
    """Fitted and scored parts of ``samples``, one pair per draw (seeds ``first`` on)."""
    if how == "random":
        for seed in range(first, first + seeds):
            order = np.random.default_rng(seed).permutation(len(samples))
            cut = int(0.7 * len(samples))
            yield [samples[i] for i in order[:cut]], [samples[i] for i in order[cut:]]
    elif how == "shapes":
        shapes = sorted({s.shape for s in samples}, key=shape_values)
        for seed in range(first, first + seeds):
            order = np.random.default_rng(seed).permutation(len(shapes))
            fitted = {shapes[i] for i in order[: int(0.7 * len(shapes))]}
            yield [s for s in samples if s.shape in fitted], [s for s in samples if s.shape not in fitted]
    else:
        def small(s: Sample) -> bool:
            return s.shape.prefill_tokens <= SMALL_PREFILL_TOKENS and s.shape.decode_seqs <= SMALL_DECODE_SEQS
        yield [s for s in samples if small(s)], [s for s in samples if not small(s)]


def ape_pct(model: object, samples: list[Sample], kind: str) -> np.ndarray:
    return np.array([abs(model.predict_ms(s.shape) - s.step_ms) / s.step_ms * 100  # type: ignore[attr-defined]
                     for s in samples if s.kind == kind])


def odd_rows(samples: list[Sample]) -> int:
    """Rows at least twice as fast as another row whose shape is no larger in every field."""
    values = np.array([shape_values(s.shape) for s in samples], dtype=float)
    ms = np.array([s.step_ms for s in samples])
    count = 0
    for i in range(len(samples)):
        dominated = (values <= values[i]).all(axis=1)
        count += bool((ms[dominated] > 2 * ms[i]).any())
    return count


def cell(values: list[float]) -> str:
    v = np.array(values)
    return f"{np.median(v):5.1f} [{v.min():4.1f}-{v.max():5.1f}]"


def gpu_table(fitters: dict[str, Fitter], steps: Path, seeds: int, first: int = 0) -> None:
    print(f"real A100 steps: {steps.name}; median over draws [range] of each draw's absolute % error\n")
    head = f"{'set':<15}{'odd':>4} {'split':<7}{'fit':<6}"
    print(head + "".join(f"{k + ' ' + q:>21}" for k in ("prefill", "decode") for q in ("median", "p90")))
    for model_name, tp in SETS:
        samples = [Sample(shape, ms) for shape, ms in read_splitwise(steps, model_name, tp).steps]
        odd = odd_rows(samples)
        for how in ("random", "shapes", "extrap"):
            for label, fitter in fitters.items():
                stats: dict[tuple[str, str], list[float]] = {}
                for fitted, scored in splits(samples, how, seeds, first):
                    model = fitter(fitted)
                    for kind in ("prefill", "decode"):
                        e = ape_pct(model, scored, kind)
                        stats.setdefault((kind, "median"), []).append(float(np.median(e)))
                        stats.setdefault((kind, "p90"), []).append(float(np.percentile(e, 90)))
                print(f"{model_name + ' tp' + str(tp):<15}{odd:>4} {how:<7}{label:<6}"
                      + "".join(f"{cell(stats[key]):>21}" for key in stats), flush=True)


def ablation_table(steps: Path, seeds: int, first: int = 0) -> None:
    """What each feature earns on shapes the fit never saw: the ``shapes`` split's median
    prefill and decode p90 with the feature held at 0."""
    data = {(m, tp): [Sample(shape, ms) for shape, ms in read_splitwise(steps, m, tp).steps] for m, tp in SETS}
    print(f"\nablation, 'shapes' split ({seeds} draws): median over draws of prefill p90 / decode p90 %, "
          "with the feature held at 0\n")
    print(f"{'feature held at 0':<26}" + "".join(f"{m + ' tp' + str(tp):>18}" for m, tp in SETS))
    for name in ("(none)", *(f for f in this_fit.FEATURES if f != "const")):
        exclude = () if name == "(none)" else (name,)
        cells = []
        for samples in data.values():
            p90: dict[str, list[float]] = {"prefill": [], "decode": []}
            for fitted, scored in splits(samples, "shapes", seeds, first):
                model = this_fit.fit_step_model(fitted, exclude=exclude)
                for kind, values in p90.items():
                    values.append(float(np.percentile(ape_pct(model, scored, kind), 90)))
            cells.append(f"{np.median(p90['prefill']):6.1f} / {np.median(p90['decode']):4.1f}")
        print(f"{name:<26}" + "".join(f"{c:>18}" for c in cells), flush=True)


def profile_table(fits: dict[str, ModuleType], profile: Path) -> None:
    samples = load_profile(profile).samples
    print(f"\n{profile.name}: {len(samples)} steps; calibrate's 5-fold held-out error (seed 0), "
          "median / p90 / bias %\n")
    print(f"{'fit':<6}" + "".join(f"{kind:>22}" for kind in this_fit.ROWS))
    for label, module in fits.items():
        table = module.error_table(samples, module.held_out_predictions(samples, 5, 0))
        print(f"{label:<6}" + "".join(
            f"{'-':>22}" if kind not in table else
            f"{table[kind]['median_ape_pct']:>7.2f}/{table[kind]['p90_ape_pct']:6.2f}/{table[kind]['bias_pct']:+6.2f}"
            for kind in this_fit.ROWS), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=BASE, help=f"The commit whose fit is 'before' (default {BASE}).")
    parser.add_argument("--steps", type=Path, default=STEPS, help="A splitwise-sim step CSV.")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="A profile whose samples are refitted.")
    parser.add_argument("--seeds", type=int, default=10, help="Random draws per split.")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seed of the first draw (another set of draws: a check that a change holds beyond the "
                        "default ten).")
    opts = parser.parse_args()
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    if opts.first_seed < 0:
        parser.error("--first-seed must be >= 0")
    fits = {"before": load_base_fit(opts.base), "after": this_fit}
    gpu_table({label: module.fit_step_model for label, module in fits.items()}, opts.steps, opts.seeds,
              opts.first_seed)
    ablation_table(opts.steps, max(1, opts.seeds // 2), opts.first_seed)
    profile_table(fits, opts.profile)


if __name__ == "__main__":
    main()
