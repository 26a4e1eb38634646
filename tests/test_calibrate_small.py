"""The small preset in calibration: a quick grid and live runs sized for a CPU (no timing here)."""

from __future__ import annotations

from calibrate.calibration import CPU_KV_MEMORY_BYTES
from calibrate.grid import make_grid
from calibrate.live import MIN_RUN_REQUESTS, LivePlan
from sim.models import get_model


def test_live_runs_are_cut_to_half_the_budget_of_arrivals():
    """A slow model's run keeps the requests arriving in half the time budget; a fast one keeps all."""
    plan = LivePlan.for_model(2048, quick=True)
    assert plan.max_arrival_s == plan.time_budget_s / 2
    assert plan.run_requests(4.76) == plan.num_requests  # tiny at half load: unchanged
    assert plan.run_requests(0.5) == int(0.5 * plan.max_arrival_s)
    assert plan.run_requests(0.01) == MIN_RUN_REQUESTS
    assert LivePlan(num_requests=5, max_arrival_s=1.0).run_requests(0.01) == 5
    assert LivePlan(num_requests=48).run_requests(0.01) == 48  # no bound given: every request


def test_small_quick_grid_within_max_model_len_and_cpu_pool():
    """small's quick grid at --max-model-len 1024 has all three kinds, every sequence within 1024."""
    spec = get_model("small")
    assert spec.family == "llama" and spec.num_kv_heads * 3 == spec.num_heads and spec.tie_embeddings
    blocks = CPU_KV_MEMORY_BYTES // (spec.kv_bytes_per_token("float32") * 16)
    grid = make_grid(1024, blocks, 16, quick=True)
    assert {p.kind for p in grid} == {"prefill", "decode", "mixed"}
    assert all(max(p.seq_lengths()) <= 1024 and p.kv_blocks(16) <= blocks for p in grid)
