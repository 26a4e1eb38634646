"""Direct invariant tests of the KV block manager and of the fast path's lockstep decode group.

``BlockManager`` is driven by a hypothesis state machine against a plain model of who holds
which blocks: no block is ever lost or held twice, every check-and-act pair agrees
(``can_allocate``/``allocate``, ``can_swap_out``/``swap_out``, ``can_swap_in``/``swap_in``),
swaps conserve blocks, and freeing everything returns every block. ``LockstepDecodes`` is
checked against stepping each member one token at a time.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sim.fastpath.lockstep import LockstepDecodes
from sim.kv import BlockManager, blocks_for
from sim.metrics import GapRecorder
from sim.request import Request

REQUEST_IDS = st.integers(min_value=0, max_value=5)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / free / swap calls, each checked against a model."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 8), host_blocks=st.integers(0, 16))
    def setup(self, num_blocks: int, block_size: int, host_blocks: int) -> None:
        self.kv = BlockManager(num_blocks, block_size, host_blocks)
        self.requests = {i: Request(i, 0.0, 1, 1) for i in range(6)}
        self.device: dict[int, int] = {}  # request id -> blocks held on the device
        self.host: dict[int, int] = {}  # request id -> blocks held in swap space

    # -- rules -----------------------------------------------------------------------------------
    @rule(rid=REQUEST_IDS, tokens=st.integers(0, 200), reserve=st.integers(0, 4))
    def allocate(self, rid: int, tokens: int, reserve: int) -> None:
        if rid in self.host:
            return  # a swapped request is swapped in, not grown
        r, kv = self.requests[rid], self.kv
        held = self.device.get(rid, 0)
        extra = max(0, blocks_for(tokens, kv.block_size) - held)
        assert kv.extra_blocks(r, tokens) == extra
        free_before = kv.num_free
        assert kv.can_allocate(r, tokens, reserve) == (extra + reserve <= free_before)
        if kv.can_allocate(r, tokens):
            new = kv.allocate(r, tokens)
            assert len(new) == extra and kv.num_free == free_before - extra
            if extra or rid in self.device:
                self.device[rid] = held + extra
            assert kv.blocks_held(r) * kv.block_size >= tokens
        else:
            with pytest.raises(RuntimeError, match="can_allocate"):
                kv.allocate(r, tokens)
            assert kv.num_free == free_before and kv.blocks_held(r) == held  # a refused call changes nothing

    @precondition(lambda self: self.device and self.kv.num_free > 0)
    @rule(data=st.data())
    def append_block(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.device)))
        self.kv.append_block(self.requests[rid])
        self.device[rid] += 1

    @rule(rid=REQUEST_IDS)
    def free(self, rid: int) -> None:
        freed = self.device.pop(rid, 0) + self.host.pop(rid, 0)
        used_before = self.kv.num_used + self.kv.num_host_used
        self.kv.free(self.requests[rid])
        assert self.kv.num_used + self.kv.num_host_used == used_before - freed

    @precondition(lambda self: self.device)
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.device)))
        r, kv, held = self.requests[rid], self.kv, self.device[rid]
        assert kv.can_swap_out(r) == (held <= kv.num_host_blocks - kv.num_host_used)
        if not kv.can_swap_out(r):
            with pytest.raises(RuntimeError, match="can_swap_out"):
                kv.swap_out(r)
            assert kv.blocks_held(r) == held
            return
        device_ids = list(kv.tables[rid])
        pairs = kv.swap_out(r)
        assert [d for d, _ in pairs] == device_ids  # every block copied, in table order
        assert [h for _, h in pairs] == kv.host_tables[rid]
        del self.device[rid]
        self.host[rid] = held

    @precondition(lambda self: self.host)
    @rule(data=st.data(), reserve=st.integers(0, 3))
    def swap_in(self, data, reserve: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.host)))
        r, kv, held = self.requests[rid], self.kv, self.host[rid]
        assert kv.can_swap_in(r, reserve) == (held + reserve <= kv.num_free)
        if not kv.can_swap_in(r):
            with pytest.raises(RuntimeError, match="swap in"):
                kv.swap_in(r)
            assert len(kv.host_tables[rid]) == held
            return
        host_ids = list(kv.host_tables[rid])
        pairs = kv.swap_in(r)
        assert [h for h, _ in pairs] == host_ids
        assert [d for _, d in pairs] == kv.tables[rid]
        del self.host[rid]
        self.device[rid] = held  # as many blocks come back as went out

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def no_block_lost_or_shared(self) -> None:
        kv = self.kv
        held = [b for table in kv.tables.values() for b in table]
        assert len(held) == len(set(held)), "a device block held twice"
        assert set(held).isdisjoint(kv._free), "a held block is also free"
        assert sorted(held + kv._free) == list(range(kv.num_blocks)), "a device block leaked"
        host = [b for table in kv.host_tables.values() for b in table]
        assert len(host) == len(set(host)) and set(host).isdisjoint(kv._host_free)
        assert sorted(host + kv._host_free) == list(range(kv.num_host_blocks)), "a host block leaked"

    @invariant()
    def counts_match_the_model(self) -> None:
        kv = self.kv
        assert kv.num_used == sum(self.device.values()) == kv.num_blocks - kv.num_free
        assert kv.num_host_used == sum(self.host.values())
        for rid, n in self.device.items():
            assert kv.blocks_held(self.requests[rid]) == n
        assert not set(self.device) & set(self.host), "a request on the device and in swap space at once"

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for r in self.requests.values():
            self.kv.free(r)
        assert self.kv.num_free == self.kv.num_blocks and self.kv.num_used == 0
        assert self.kv.num_host_used == 0
        assert not self.kv.tables and not self.kv.host_tables


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(num_blocks=st.integers(1, 64), block_size=st.integers(1, 32), tokens=st.integers(0, 4096))
def test_fits_at_all_is_the_empty_pool(num_blocks, block_size, tokens):
    """fits_at_all(n) holds exactly when n tokens fit in the whole, empty pool."""
    kv = BlockManager(num_blocks, block_size)
    assert kv.fits_at_all(tokens) == (tokens <= num_blocks * block_size)
    assert kv.fits_at_all(tokens) == kv.can_allocate(Request(0, 0.0, 1, 1), tokens)


def test_block_ids_depend_only_on_the_calls():
    """The same sequence of calls hands out the same block ids (free lists are stacks)."""

    def ids() -> list[list[int]]:
        kv = BlockManager(10, 4, 4)
        a, b, c = (Request(i, 0.0, 1, 1) for i in range(3))
        kv.allocate(a, 9)
        kv.allocate(b, 5)
        kv.swap_out(a)
        kv.allocate(c, 12)
        kv.free(b)
        kv.swap_in(a)
        return [kv.tables[0], kv.tables[2], kv._free]

    assert ids() == ids()
    # a: 0-2, b: 3-4; a's swap-out frees 0-2 for c; b's free puts 3, 4 on top, so a gets 3, 4, 5.
    assert ids() == [[3, 4, 5], [0, 1, 2], [9, 8, 7, 6]]


def test_bad_sizes_are_refused():
    """A pool of no blocks, a zero block size or negative swap space is an error naming the field."""
    for args, field in (((0, 4), "num_blocks"), ((4, 0), "block_size"), ((4, 4, -1), "num_host_blocks")):
        with pytest.raises(ValueError, match=field):
            BlockManager(*args)


# -- the fast path's lockstep decode group ------------------------------------------------------

members_strategy = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 6), st.integers(1, 30)),  # prompt, generated so far, left to generate
    min_size=1, max_size=6,
)


def decoding(rid: int, prompt: int, generated: int, left: int, last_token_s: float) -> Request:
    """A request that has sampled ``generated`` tokens and decodes next (its cache lacks only the last one)."""
    r = Request(rid, 0.0, prompt, generated + left)
    r.num_generated = generated
    r.num_computed_tokens = prompt + generated - 1
    r.last_token_s = last_token_s
    r.token_times_s = []
    return r


@settings(max_examples=150, deadline=None)
@given(first=members_strategy, later=members_strategy, block_size=st.sampled_from([0, 1, 3, 8]),
       runs=st.lists(st.integers(1, 12), min_size=1, max_size=8), data=st.data())
def test_lockstep_group_matches_stepping_each_member(first, later, block_size, runs, data):
    """Context, finishes, block boundaries, gaps and leave()'s counts equal stepping every member one token per step."""
    group = LockstepDecodes(block_size)
    held: dict[int, int] = {}  # request id -> blocks the model holds
    model: dict[int, Request] = {}  # a copy of each member stepped one token at a time
    real: dict[int, Request] = {}
    want_gaps: Counter[float] = Counter()
    itl = GapRecorder()
    ids = itertools.count()
    clock = [0.0]

    def join(spec: tuple[int, int, int]) -> None:
        rid = next(ids)
        prompt, generated, left = spec
        real[rid] = decoding(rid, prompt, generated, left, clock[0])
        model[rid] = decoding(rid, prompt, generated, left, clock[0])
        held[rid] = blocks_for(prompt + generated - 1, block_size) if block_size else 0
        group.join(real[rid], (float(rid),), held[rid])

    for spec in first:
        join(spec)
    pending_joins = list(later)
    for k in runs:
        if not len(group):
            break
        k = min(k, group.steps_to_finish())  # a run ends at the first finish, as repeat_limit makes it
        assert group.steps_to_finish() == min(m.output_tokens - m.num_generated for m in model.values())
        assert group.context_tokens == sum(m.num_computed_tokens for m in model.values())
        if block_size:
            for step in range(group.steps + 1, group.steps + k + 1):
                for m in group.needing_blocks(step):
                    rid = m.request.id
                    assert group.tokens_to_hold(m, step) > held[rid] * block_size, "a block given too early"
                    held[rid] += 1
                for rid, r in model.items():
                    tokens = r.num_computed_tokens + (step - group.steps)
                    assert tokens <= held[rid] * block_size, f"request {rid} outgrew its blocks at step {step}"
                if step == group.steps + 1 and k > 1:
                    # The first step's blocks are given: how far could a run go on a few free blocks?
                    free = data.draw(st.integers(0, 6))
                    limit = group.block_limited_steps(k, free, joining=[])
                    assert limit == _steps_on_free_blocks(model, held, block_size, k, free)
        ends = [clock[0] + 0.25 * (j + 1) for j in range(k)]
        clock[0] = ends[-1]
        for r in model.values():
            for t in ends:
                want_gaps[t - r.last_token_s] += 1
                r.num_computed_tokens += 1
                r.num_generated += 1
                r.last_token_s = t
                assert r.token_times_s is not None
                r.token_times_s.append(t)
        done = group.advance(ends, itl)
        assert sorted(r.id for r in done) == sorted(rid for rid, r in model.items() if r.is_done)
        # Members leave when done, and some at random (as a preemption takes them out).
        leaving = [r.id for r in done] + data.draw(st.lists(st.sampled_from(sorted(model)), max_size=2, unique=True))
        for rid in dict.fromkeys(leaving):
            group.leave(real[rid])
            r, m = real[rid], model.pop(rid)
            assert (r.num_computed_tokens, r.num_generated, r.last_token_s, r.token_times_s) == \
                   (m.num_computed_tokens, m.num_generated, m.last_token_s, m.token_times_s)
            assert real[rid] not in group
        if pending_joins and data.draw(st.booleans()):
            join(pending_joins.pop())
    gaps, counts = itl.arrays()
    got: Counter[float] = Counter()
    for g, c in zip(gaps.tolist(), counts.tolist(), strict=True):
        got[g] += c
    assert got == want_gaps, "pooled inter-token gaps differ from stepping one at a time"


def _steps_on_free_blocks(model: dict[int, Request], held: dict[int, int], block_size: int, k: int,
                          free_blocks: int) -> int:
    """Steps of a run of up to k (the first one's blocks given) before one needs more than ``free_blocks``."""
    extra = dict(held)
    steps = 1
    for j in range(2, k + 1):
        for rid, r in model.items():
            if r.num_computed_tokens + j > extra[rid] * block_size:
                extra[rid] += 1
                free_blocks -= 1
        if free_blocks < 0:
            break
        steps = j
    return steps
