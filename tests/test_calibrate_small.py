"""The small preset in calibration: a quick grid and live runs sized for a CPU (no timing here)."""

from __future__ import annotations

from calibrate.calibration import CPU_KV_MEMORY_BYTES
from calibrate.grid import make_grid
from calibrate.live import MIN_RUN_REQUESTS, LivePlan, fit_to_budget, predicted_run_s
from sim.models import get_model
from sim.policies.base import SchedulerConfig
from sim.request import Request


def test_live_runs_are_cut_to_half_the_budget_of_arrivals():
    """A slow model's run keeps the requests arriving in half the time budget; a fast one keeps all."""
    plan = LivePlan.for_model(2048, quick=True)
    assert plan.max_arrival_s == plan.time_budget_s / 2
    assert plan.run_requests(4.76) == plan.num_requests  # tiny at half load: unchanged
    assert plan.run_requests(0.5) == int(0.5 * plan.max_arrival_s)
    assert plan.run_requests(0.01) == MIN_RUN_REQUESTS
    assert LivePlan(num_requests=3, max_arrival_s=1.0).run_requests(0.01) == 3
    assert LivePlan(num_requests=48).run_requests(0.01) == 48  # no bound given: every request


def test_small_quick_grid_within_max_model_len_and_cpu_pool():
    """small's quick grid at --max-model-len 1024 has all three kinds, every sequence within 1024."""
    spec = get_model("small")
    assert spec.family == "llama" and spec.num_kv_heads * 3 == spec.num_heads and spec.tie_embeddings
    blocks = CPU_KV_MEMORY_BYTES // (spec.kv_bytes_per_token("float32") * 16)
    grid = make_grid(1024, blocks, 16, quick=True)
    assert {p.kind for p in grid} == {"prefill", "decode", "mixed"}
    assert all(max(p.seq_lengths()) <= 1024 and p.kv_blocks(16) <= blocks for p in grid)


def test_a_run_is_cut_to_what_the_time_left_serves():
    """The longest prefix predicted to finish in time, never under the minimum; none if that does not fit."""
    reqs = list(range(10))
    predict = lambda rs: 10.0 * len(rs)  # noqa: E731
    assert fit_to_budget(reqs, 100.0, predict) == reqs
    assert fit_to_budget(reqs, 55.0, predict) == reqs[:5]
    assert fit_to_budget(reqs, 10.0 * MIN_RUN_REQUESTS, predict) == reqs[:MIN_RUN_REQUESTS]
    assert fit_to_budget(reqs, 10.0 * MIN_RUN_REQUESTS - 1, predict) == []
    assert fit_to_budget(reqs[:2], 25.0, predict) == reqs[:2]  # fewer than the minimum: all, if they fit
    assert fit_to_budget(reqs[:2], 15.0, predict) == []


class _TenMs:
    def predict_ms(self, shape) -> float:
        return 10.0


def test_predicted_run_is_the_simulated_last_completion():
    """One request (a prefill, then two decodes) at 10 ms a step is done 30 ms after it arrives;
    the requests given are not touched."""
    reqs = [Request(0, 0.5, 8, 3)]
    got = predicted_run_s(reqs, SchedulerConfig(policy="continuous"), 64, 16, _TenMs())  # type: ignore[arg-type]
    assert abs(got - 0.53) < 1e-9
    assert reqs[0].finish_s is None and reqs[0].num_generated == 0
