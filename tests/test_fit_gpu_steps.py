"""The step-cost fit on real GPU step timings (``../shared/gpu-steps/``, splitwise-sim's A100
measurements of Llama-2-70B at TP 2, 4, 8 and BLOOM-176B at TP 8): issue 15's transfer targets.

Each model set is fitted on the random 70% of its rows that ``experiments/fit_transfer.py`` draws
(seeds 0-9) and scored on the rest; a number is the median over the ten draws, as the script
prints it. One draw scores about 30 prefill steps, so its p90 is about the fourth-worst step and
moves by several points from draw to draw (BLOOM-176B: 7.9-11.8%); the median over the fixed
draws is the stable statistic. A deterministic numeric fit, no timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibrate.fit import fit_step_model
from calibrate.samples import Sample
from calibrate.splitwise import read_splitwise
from experiments.fit_transfer import SETS, ape_pct, splits

STEPS = Path(__file__).resolve().parents[2] / "shared" / "gpu-steps" / "splitwise_a100_perf_model.csv"
DRAWS = 10

# Decode held-out error (median, p90 %) of the fit before the prefill work of issue 15
# (commit c820d9a, same draws): the decode fit must not get worse than this, give or take
# a tenth of a point of rounding. Llama-2-70B TP 2's decodes are bimodal between runs (about
# 55 and 60 ms for the same shape), hence its 4-8%.
DECODE_BEFORE = {
    ("llama2-70b", 2): (4.65, 7.95),
    ("llama2-70b", 4): (0.97, 3.50),
    ("llama2-70b", 8): (1.39, 2.80),
    ("bloom-176b", 8): (0.68, 2.02),
}


def held_out(model_name: str, tp: int) -> dict[str, tuple[float, float]]:
    """Median over the draws of each draw's (median, p90) absolute % error, by kind."""
    samples = [Sample(shape, ms) for shape, ms in read_splitwise(STEPS, model_name, tp).steps]
    stats: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
    for fitted, scored in splits(samples, "random", DRAWS):
        model = fit_step_model(fitted)
        for kind, values in stats.items():
            e = ape_pct(model, scored, kind)
            values.append((float(np.median(e)), float(np.percentile(e, 90))))
    return {kind: tuple(np.median(values, axis=0)) for kind, values in stats.items()}  # type: ignore[misc]


@pytest.mark.skipif(not STEPS.exists(), reason="../shared/gpu-steps not present")
@pytest.mark.parametrize(("model_name", "tp"), SETS)
def test_prefill_targets_on_real_gpu_steps(model_name, tp):
    """Fitted on a seeded random 70% of real A100 steps, held-out prefills are within 5% median
    and 10% p90 and decodes no worse than before, for every model set."""
    err = held_out(model_name, tp)
    prefill_median, prefill_p90 = err["prefill"]
    assert prefill_median < 5, err
    assert prefill_p90 < 10, err
    decode_median, decode_p90 = err["decode"]
    before_median, before_p90 = DECODE_BEFORE[(model_name, tp)]
    assert decode_median <= before_median + 0.1, err
    assert decode_p90 <= before_p90 + 0.1, err
