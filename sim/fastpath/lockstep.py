"""Running decodes advanced in lockstep: the bookkeeping of the simulator's fast path.

Under iteration-level scheduling every step decodes every running request that has sampled
its last token, each one token further. So between two decisions nothing about a decoding
request changes except by the number of steps taken, and the group keeps, per member, its
counts when it joined and the step count then: a member's ``num_computed_tokens`` after
``steps`` steps is ``computed0 + steps - joined``. The work of a step is O(1) for the group
and O(members that finish or cross a KV block boundary), not O(members).

A member's :class:`Request` fields are stale while it is in the group: :meth:`leave` brings
them up to date (the policy calls it when a member finishes or is preempted). Two heaps give
the next events in step numbers: when each member finishes, and when each next needs a KV
block (when the policy does not reserve blocks up front).
"""

from __future__ import annotations

import heapq
import itertools
from array import array

import numpy as np

from sim.metrics import GapRecorder
from sim.queues import OrderKey
from sim.request import Request


class _Member:
    __slots__ = ("computed0", "generated0", "joined", "key", "next_block", "request", "serial")

    def __init__(self, request: Request, key: OrderKey, joined: int, serial: int) -> None:
        self.request = request
        self.key = key
        self.serial = serial
        self.joined = joined
        self.computed0 = request.num_computed_tokens
        self.generated0 = request.num_generated
        self.next_block = 0  # the step at which the member next needs a KV block (0: never)


class LockstepDecodes:
    """Decoding requests that every step advances by one token, with their next events.

    Steps are numbered from 1 in the order the replica runs them; ``steps`` have ended, the
    last at ``last_end_s``. ``block_size`` is the KV block size, or 0 when blocks are reserved
    for the whole output at admission (no member ever needs a new one).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.steps = 0
        self.last_end_s = 0.0
        self.members: dict[int, _Member] = {}
        self._context0 = 0  # sum over members of computed0 - joined
        # Heaps of (step, queue key, join number, member): a request that left and joined again
        # has a stale entry with the same key, which the join number keeps apart.
        self._finish: list[tuple[int, OrderKey, int, _Member]] = []
        self._blocks: list[tuple[int, OrderKey, int, _Member]] = []
        self._joins = 0
        self._fresh: list[tuple[_Member, float]] = []  # joined since the last step: (member, its last token time)
        self._ends: array | None = None  # every step's end time, kept when members keep token times

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, request: Request) -> bool:
        m = self.members.get(request.id)
        return m is not None and m.request is request

    @property
    def context_tokens(self) -> int:
        """Cached tokens the members attend to in the next step, summed."""
        return self._context0 + len(self.members) * self.steps

    # -- membership ----------------------------------------------------------------------------
    def join(self, request: Request, key: OrderKey, blocks_held: int) -> None:
        """``request`` has just sampled a token and decodes from the next step on."""
        m = _Member(request, key, self.steps, self._joins)
        self._joins += 1
        self.members[request.id] = m
        self._context0 += m.computed0 - m.joined
        heapq.heappush(self._finish, (m.joined + request.output_tokens - m.generated0, key, m.serial, m))
        if self.block_size:
            # Step t caches computed0 + t - joined tokens; the first that exceeds what is held.
            m.next_block = blocks_held * self.block_size - m.computed0 + m.joined + 1
            heapq.heappush(self._blocks, (m.next_block, key, m.serial, m))
        assert request.last_token_s is not None
        self._fresh.append((m, request.last_token_s))
        if request.token_times_s is not None and self._ends is None:
            self._ends = array("d", [0.0] * self.steps)

    def leave(self, request: Request) -> None:
        """Bring ``request``'s fields up to date and drop it from the group."""
        m = self.members.pop(request.id)
        self._context0 -= m.computed0 - m.joined
        k = self.steps - m.joined
        if k == 0:
            self._fresh = [f for f in self._fresh if f[0] is not m]
            return
        request.num_computed_tokens = m.computed0 + k
        request.num_generated = m.generated0 + k
        request.last_token_s = self.last_end_s
        if request.token_times_s is not None:
            assert self._ends is not None
            request.token_times_s.extend(self._ends[m.joined:self.steps])

    def _valid(self, m: _Member) -> bool:
        return self.members.get(m.request.id) is m

    # -- events --------------------------------------------------------------------------------
    def steps_to_finish(self) -> int:
        """Steps from now until the first member's last token (the member is then done)."""
        heap = self._finish
        while not self._valid(heap[0][3]):
            heapq.heappop(heap)
        return heap[0][0] - self.steps

    def needing_blocks(self, step: int) -> list[_Member]:
        """Members whose cache outgrows their blocks at ``step``, in queue order; each gets its
        next boundary pushed, so the caller must allocate (or preempt the member)."""
        heap = self._blocks
        if not heap or heap[0][0] > step:
            return []
        out, members, block_size = [], self.members, self.block_size
        while heap:
            next_block, key, serial, m = heap[0]
            if next_block > step:
                break
            if members.get(m.request.id) is m:
                out.append(m)
                m.next_block = next_block + block_size
                heapq.heapreplace(heap, (m.next_block, key, serial, m))
            else:
                heapq.heappop(heap)
        return out

    def tokens_to_hold(self, m: _Member, step: int) -> int:
        """Tokens ``m``'s cache holds once ``step`` is done."""
        return m.computed0 + step - m.joined

    def block_limited_steps(self, n: int, free_blocks: int, joining: list[tuple[int, int]]) -> int:
        """How many of the next ``n`` steps can run before one needs more blocks than
        ``free_blocks`` (the first step's blocks are already allocated). ``joining`` are
        (tokens cached, blocks held) after the first step of requests that join then."""
        bs = self.block_size
        if bs == 0 or (len(self.members) + len(joining)) * -(-(n - 1) // bs) <= free_blocks:
            return n
        first, last = self.steps + 2, self.steps + n
        starts = [m.next_block for m in self.members.values()]
        starts += [held * bs - cached + first for cached, held in joining]
        # Each sequence needs a block at its first boundary in [first, last] and every bs steps
        # after: (sequences, boundaries) steps, the ones past ``last`` dropped.
        begin = np.maximum(np.array(starts, dtype=np.int64), first)
        begin = begin[begin <= last]
        if begin.size == 0:
            return n
        events = (begin[:, None] + bs * np.arange((last - int(begin.min())) // bs + 1)).ravel()
        events = events[events <= last]
        if events.size <= free_blocks:
            return n
        # The step of the (free_blocks + 1)-th block asked for is the first the pool cannot supply.
        return max(1, int(np.partition(events, free_blocks)[free_blocks]) - self.steps - 1)

    # -- steps ---------------------------------------------------------------------------------
    def advance(self, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Every member decoded once in each step that ended at ``ends_s``; records the
        inter-token gaps and returns the members now done (still in the group)."""
        n = len(self.members)
        fresh = self._fresh
        continuing = n - len(fresh)
        if continuing:
            itl.add(ends_s[0] - self.last_end_s, continuing)
        for _, prev in fresh:
            itl.add(ends_s[0] - prev, 1)
        self._fresh = []
        if len(ends_s) > 1 and n:
            itl.add_many([b - a for a, b in itertools.pairwise(ends_s)], n)
        self.steps += len(ends_s)
        self.last_end_s = ends_s[-1]
        if self._ends is not None:
            self._ends.extend(ends_s)
        done = []
        heap = self._finish
        while heap and heap[0][0] <= self.steps:
            m = heapq.heappop(heap)[3]
            if self._valid(m):
                done.append(m.request)
        return done
