"""The policy registry is the one list: a policy registered in one place reaches the CLI and the test matrix."""

from __future__ import annotations

import subprocess
import sys

from sim.policies import POLICIES
from sim.policies.base import register
from sim.policies.continuous import ContinuousPolicy
from tests.checks import policy_matrix

# A new policy module as a user would write one: a class and one @register line.
THROWAWAY = '''
from sim.policies.base import register
from sim.policies.continuous import ContinuousPolicy

@register("throwaway", summary="a test's copy of continuous", preempt_modes=("recompute",))
class Throwaway(ContinuousPolicy):
    pass
'''


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``servesim ARGS`` in a fresh interpreter in which the throwaway policy was registered first."""
    code = THROWAWAY + f"\nfrom experiments.cli import main\nmain({list(args)!r})\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_registered_policy_appears_in_simulate_help_and_runs():
    """`servesim simulate --help` lists a newly registered policy with its summary, and it simulates."""
    helped = _cli("simulate", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "throwaway" in helped.stdout and "a test's copy of continuous" in " ".join(helped.stdout.split())
    ran = _cli("simulate", "--policy", "throwaway", "-n", "50", "--max-prompt-tokens", "512")
    assert ran.returncode == 0, ran.stderr
    assert "throwaway" in ran.stdout and "Traceback" not in ran.stderr


def test_registered_policy_joins_the_invariant_matrix():
    """The matrix of the invariant, fast-path and seam tests picks up a new policy with the modes it allows."""
    name = "throwaway-matrix"
    try:
        register(name, summary="a test's copy", preempt_modes=("recompute", "off"))(
            type("ThrowawayMatrix", (ContinuousPolicy,), {}))
        combos = {c for c in policy_matrix() if c[0] == name}
        assert {preempt for _, _, preempt in combos} == {"recompute", "off"}
        assert len(combos) == 2 * len({order for p, order, _ in policy_matrix() if p == "continuous"})
    finally:
        POLICIES.pop(name, None)
    assert all(c[0] != name for c in policy_matrix())
