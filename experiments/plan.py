"""Capacity across parallelism: the fewest GPUs (tp x pp x replicas) that serve a target rate
within SLOs, and the table of every layout tried.

Each (policy, layout) is a configuration for :func:`experiments.capacity.find_capacity`: its
highest rate per replica within the SLOs, then the replicas the target rate needs, verified in
simulation. A layout that the model cannot be split into, or whose GPUs cannot hold the
weights and a KV cache, is listed with the reason and not simulated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from experiments.capacity import CapacityReport, Slo, find_capacity
from experiments.sweep import Workload
from sim.config import SimConfig, resolve_capacity
from sim.models import get_model
from sim.parallel import Parallelism, check_parallelism

AUTO_TP = (1, 2, 4, 8)
AUTO_PP = (1, 2)


def parse_layouts(text: str, model: str) -> list[Parallelism]:
    """``"auto"`` (tp 1, 2, 4, 8 that split ``model``, each at pp 1 and 2) or ``"TPxPP,..."``
    (``"2x1,4x1,4x2"``; a bare ``"4"`` is pp 1)."""
    if text.strip() == "auto":
        spec = get_model(model)
        out = []
        for pp in AUTO_PP:
            for tp in AUTO_TP:
                try:
                    check_parallelism(spec, Parallelism(tp, pp))
                except ValueError:
                    continue
                out.append(Parallelism(tp, pp))
        return out
    layouts = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        tp_text, _, pp_text = part.lower().partition("x")
        try:
            layouts.append(Parallelism(int(tp_text), int(pp_text or 1)))
        except ValueError:
            raise ValueError(f"layout {part!r}: expected TPxPP with positive integers, e.g. 4x1 or 8x2") from None
    if not layouts:
        raise ValueError(f"layouts {text!r}: give auto or TPxPP,... e.g. 1x1,2x1,4x1")
    if len(set(layouts)) != len(layouts):
        raise ValueError(f"layouts {text!r} names a layout twice")
    return layouts


@dataclass(frozen=True)
class PlanRow:
    """One (policy, layout): its KV blocks, its highest rate per replica, the replicas and GPUs
    the target needs; ``why`` says why it was not simulated or did not reach the target."""

    label: str
    policy: str
    tp: int
    pp: int
    kv_blocks: int | None
    max_rate: float | None
    replicas: int | None
    why: str = ""

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int | None:
        return None if self.replicas is None else self.replicas * self.gpus_per_replica


@dataclass(frozen=True)
class Plan:
    rows: list[PlanRow]
    best: PlanRow | None
    """The fewest GPUs meeting the SLOs at the target (ties: the higher max rate per GPU)."""
    report: CapacityReport | None


def layout_label(policy_label: str, par: Parallelism) -> str:
    return f"{policy_label} tp{par.tp}xpp{par.pp}"


def plan_parallelism(configs: Sequence[tuple[str, SimConfig]], layouts: Sequence[Parallelism], workload: Workload,
                     slos: Sequence[Slo], target_rate: float, *, max_replicas: int = 64,
                     **search: object) -> Plan:
    """Every policy config at every layout; ``search`` goes to :func:`find_capacity`
    (goodput, goodput_fraction, start_rate, precision, jobs, progress)."""
    rows: dict[str, PlanRow] = {}
    runnable: list[tuple[str, SimConfig]] = []
    blocks: dict[str, int] = {}
    for policy, config in configs:
        for par in layouts:
            label = layout_label(policy, par)
            try:
                laid = dataclasses.replace(config, tp=par.tp, pp=par.pp, replicas=1)
                blocks[label] = resolve_capacity(laid).num_blocks
            except ValueError as e:
                # "no room for the KV cache of M: X usable per GPU, weights take ... (more GPUs ...)"
                why = str(e).split(" (more GPUs")[0]
                if why.startswith("no room for the KV cache"):
                    why = "does not fit: " + why.split(": ", 1)[-1]
                rows[label] = PlanRow(label, policy, par.tp, par.pp, None, None, None, why)
                continue
            runnable.append((label, laid))
            rows[label] = PlanRow(label, policy, par.tp, par.pp, blocks[label], None, None)
    report = None
    if runnable:
        report = find_capacity(runnable, workload, slos, target_rate=target_rate, max_replicas=max_replicas,
                               **search)  # type: ignore[arg-type]
        for label, _ in runnable:
            s, z = report.searches[label], report.sizings.get(label)
            why = ""
            if s.lo is None:
                why = f"misses the SLOs at any rate ({'; '.join(s.hi_why)})"
            elif z is None or z.replicas is None:
                why = f"SLOs missed up to {max_replicas} replicas"
            rows[label] = dataclasses.replace(rows[label], max_rate=s.lo, replicas=None if z is None else z.replicas,
                                              why=why)
    ordered = list(rows.values())
    meeting = [r for r in ordered if r.gpus is not None]
    best = min(meeting, key=lambda r: (r.gpus, -(r.max_rate or 0) / r.gpus_per_replica), default=None)
    return Plan(ordered, best, report)
