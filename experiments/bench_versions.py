"""Simulator speed of this tree against an earlier commit, side by side in one run.

Checks out ``--base`` (a commit) into a temporary git worktree and runs
:func:`experiments.bench_sim._run` - the same simulation job - in a fresh process in each tree,
alternating the two trees ``--repeats`` times so that the machine's drift falls on both alike.
Prints each job's median wall time per tree and the ratio this tree / base (below 1: faster),
and checks that both trees give the same tokens and summary.

    python experiments/bench_versions.py --base db25674
    python experiments/bench_versions.py --base HEAD~3 --synthetic-requests 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("static", "continuous", "chunked")
_CHILD = ("import json, sys; from experiments.bench_sim import _run; "
          "print(json.dumps(_run(tuple(json.loads(sys.argv[1])))))")


def _run_in(tree: Path, job: tuple) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], cwd=tree, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"job {job} failed in {tree}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same(a: dict, b: dict) -> bool:
    return a["tokens"] == b["tokens"] and all(abs(a["summary"][k] - v) <= 1e-9 * max(1.0, abs(v))
                                              for k, v in b["summary"].items() if k in a["summary"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The commit to compare against.")
    parser.add_argument("--synthetic-requests", type=int, default=100_000)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="servesim-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), opts.base], check=True,
                       capture_output=True)
        try:
            print(f"{'workload':<11}{'requests':>9} {'policy':<11}{'mode':<5}{'base s':>9}{'this s':>9}"
                  f"{'this/base':>10}  same", flush=True)
            for workload, n in (("azure-conv", 0), ("poisson", opts.synthetic_requests)):
                for policy in opts.policies.split(","):
                    for exact in (False, True):
                        job = (workload, n, policy, exact, opts.seed)
                        walls: dict[str, list[float]] = {"base": [], "this": []}
                        rows: dict[str, dict] = {}
                        for _ in range(opts.repeats):
                            for name, tree in (("base", base), ("this", ROOT)):
                                rows[name] = _run_in(tree, job)
                                walls[name].append(rows[name]["wall_s"])
                        b, t = statistics.median(walls["base"]), statistics.median(walls["this"])
                        print(f"{workload:<11}{rows['this']['requests']:>9} {policy:<11}"
                              f"{'step' if exact else 'fast':<5}{b:>9.3f}{t:>9.3f}{t / b:>10.2f}  "
                              f"{'yes' if _same(rows['base'], rows['this']) else 'NO'}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)


if __name__ == "__main__":
    main()
