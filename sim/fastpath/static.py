"""The fast path of static batching: a running batch's decode steps priced and accounted as one run.

Once a static batch has prefilled, every step until its longest output is done decodes the
whole batch (finished slots as padding), so no decision can change in between; arrivals matter
only while no batch runs.
"""

from __future__ import annotations

from sim.batch import Batch
from sim.metrics import GapRecorder, record_run_gaps
from sim.policies.base import SchedulerConfig
from sim.policies.static import StaticPolicy
from sim.request import Request, Status


class StaticRuns(StaticPolicy):
    """``static`` for the simulator's fast path; answers equal to stepping the plain policy."""

    @staticmethod
    def possible(config: SchedulerConfig) -> bool:
        return True

    def repeat_limit(self, batch: Batch) -> int:
        """Decode steps left in the running batch: its shape only grows in context until the end."""
        if self.steps_done == 0:
            return 1
        return max(r.output_tokens - r.num_generated for r in self.batch)

    def arrival_may_reschedule(self) -> bool:
        return not self.batch

    def on_steps_done(self, batch: Batch, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Account ``len(ends_s)`` steps of ``batch`` and record their inter-token gaps in ``itl``."""
        before = [(s.request.last_token_s, s.request.num_generated) for s in batch.seqs]
        if len(ends_s) == 1:
            finished = self.on_step_done(batch, ends_s[0])
        else:
            finished = self._on_run_done(batch, ends_s)
        record_run_gaps(itl, batch.seqs, before, ends_s)
        return finished

    def _on_run_done(self, batch: Batch, ends_s: list[float]) -> list[Request]:
        finished: list[Request] = []
        for s in batch.seqs:
            r = s.request
            produced = min(len(ends_s), r.output_tokens - r.num_generated)
            r.num_computed_tokens = s.start + produced
            r.record_tokens(ends_s[:produced])
            if r.is_done:
                r.status = Status.FINISHED
                r.finish_s = ends_s[produced - 1]
                finished.append(r)
        self.steps_done += len(ends_s)
        self._end_batch_if_done()
        return finished
