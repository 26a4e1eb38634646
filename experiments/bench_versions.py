"""Simulator speed of this tree against an earlier commit, side by side in one run.

Checks out ``--base`` (a commit) into a temporary git worktree and runs
:func:`experiments.bench_sim._run` - the same simulation job - in a fresh process in each tree,
alternating the two trees ``--repeats`` times so that the machine's drift falls on both alike.
Prints each job's median wall time per tree and the ratio this tree / base (below 1: faster),
and checks that both trees give the same tokens and summary.

With ``--instructions`` each job runs once per tree under valgrind's cachegrind instead, with
Python's hash seed fixed, and the ratio is of instructions executed. On a shared, noisy machine
that shows a difference of 1%, which wall time cannot (a count repeats to about 0.01%; a job
runs about 50x slower, so use small ones). The counts include starting Python and the imports
(0.6-0.8G instructions). Both trees are byte-compiled first, so no job pays for compiling.

    python experiments/bench_versions.py --base db25674
    python experiments/bench_versions.py --base HEAD~3 --synthetic-requests 20000 --repeats 5
    python experiments/bench_versions.py --base db25674 --synthetic-requests 20000 --profile profiles/tiny-cpu.json
    python experiments/bench_versions.py --base db25674 --instructions --synthetic-requests 5000 --modes fast
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("static", "continuous", "chunked")
_CHILD = ("import json, sys; from experiments.bench_sim import _run; "
          "print(json.dumps(_run(tuple(json.loads(sys.argv[1])))))")
# With --profile: each tree's _run prices steps with its own copy of the profile (an older
# tree's bench_sim takes no profile, so its run_simulation is handed one).
_CHILD_PROFILE = ("import json, sys, sim.simulation as s; from calibrate.profile import load_profile; "
                  "profile = load_profile(sys.argv[2]); plain = s.run_simulation; "
                  "s.run_simulation = lambda config, requests, *_: plain(config, requests, profile); "
                  "from experiments.bench_sim import _run; "
                  "print(json.dumps(_run(tuple(json.loads(sys.argv[1])))))")


VALGRIND = ("valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null")
_INSTRUCTIONS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _run_in(tree: Path, job: tuple, profile: str | None = None, instructions: bool = False) -> dict:
    command = [sys.executable, "-c", _CHILD, json.dumps(job)] if profile is None else \
        [sys.executable, "-c", _CHILD_PROFILE, json.dumps(job), profile]
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if instructions:
        command = [*VALGRIND, *command]
        env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in both trees, every run
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"job {job} failed in {tree}:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if instructions:
        counted = _INSTRUCTIONS.search(out.stderr)
        if counted is None:
            raise SystemExit(f"job {job} in {tree}: valgrind printed no instruction count:\n{out.stderr[-2000:]}")
        row["instructions"] = int(counted.group(1).replace(",", ""))
    return row


def _compile(tree: Path) -> None:
    """Byte-compile the tree's packages, so that no measured job pays for compiling them (the
    first job in a fresh checkout would: about 0.17G instructions, 1% of an azure-conv job)."""
    packages = [name for name in ("sim", "calibrate", "runtime", "experiments") if (tree / name).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], cwd=tree, check=True, capture_output=True)


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
    parser.add_argument("--profile", default=None,
                        help="Price steps with this profile, a path inside each tree (e.g. profiles/tiny-cpu.json): "
                             "each tree reads its own copy. Answers differ where the fitted model changed.")
    parser.add_argument("--instructions", action="store_true",
                        help="Count instructions under valgrind (once per tree and job) instead of timing.")
    parser.add_argument("--modes", default="fast,step", help="fast (runs of steps at once), step, or both.")
    opts = parser.parse_args()
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if not modes or any(m not in ("fast", "step") for m in modes):
        parser.error(f"--modes: give fast, step or fast,step, not {opts.modes!r}")
    if opts.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind on PATH (Debian: apt install valgrind)")
    if opts.instructions:
        opts.repeats = 1  # a count does not vary with the machine's load
    unit = "G ins" if opts.instructions else "s"
    with tempfile.TemporaryDirectory(prefix="servesim-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), opts.base], check=True,
                       capture_output=True)
        try:
            for tree in (base, ROOT):
                _compile(tree)
            print(f"{'workload':<11}{'requests':>9} {'policy':<11}{'mode':<5}{'base ' + unit:>11}"
                  f"{'this ' + unit:>11}{'this/base':>10}  same", flush=True)
            for workload, n in (("azure-conv", 0), ("poisson", opts.synthetic_requests)):
                for policy in opts.policies.split(","):
                    for exact in [mode == "step" for mode in modes]:
                        job = (workload, n, policy, exact, opts.seed)
                        walls: dict[str, list[float]] = {"base": [], "this": []}
                        rows: dict[str, dict] = {}
                        for _ in range(opts.repeats):
                            for name, tree in (("base", base), ("this", ROOT)):
                                rows[name] = _run_in(tree, job, opts.profile, opts.instructions)
                                walls[name].append(rows[name]["instructions"] / 1e9 if opts.instructions
                                                   else rows[name]["wall_s"])
                        b, t = statistics.median(walls["base"]), statistics.median(walls["this"])
                        print(f"{workload:<11}{rows['this']['requests']:>9} {policy:<11}"
                              f"{'step' if exact else 'fast':<5}{b:>11.3f}{t:>11.3f}"
                              f"{t / b:>10.{4 if opts.instructions else 2}f}  "
                              f"{'yes' if _same(rows['base'], rows['this']) else 'NO'}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)


if __name__ == "__main__":
    main()
