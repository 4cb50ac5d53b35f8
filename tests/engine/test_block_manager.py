"""BlockManager: block accounting, freeing, prefix caching (hash chaining) and LRU eviction.

Pure Python: no model and no torch. The stateful test drives random allocate / compute / decode /
free sequences against a shadow model of what each block holds, so a prefix-cache hit that would
serve the wrong K/V, a write into a shared block, or a leaked block fails it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.sequence import Sequence

_ids = itertools.count()


def make_seq(token_ids, **kw) -> Sequence:
    sid = next(_ids)
    ids = list(token_ids)
    return Sequence(
        seq_id=sid,
        request_id=f"req-{sid}",
        index=0,
        token_ids=ids,
        num_prompt_tokens=len(ids),
        sampling_params=SamplingParams(),
        arrival_time=float(sid),
        **kw,
    )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def snapshot(bm: BlockManager, seq: Sequence | None = None):
    """Everything an allocation may change: free list (in order), ref counts, the cache."""
    state = (
        list(bm._free),
        [(b.ref_count, b.block_hash, b.parent_hash, b.token_ids) for b in bm.blocks],
        dict(bm._cached),
        bm.num_free_blocks,
    )
    if seq is not None:
        state += (list(seq.block_table), seq.num_registered_blocks, seq.num_computed_tokens)
    return state


def admit_and_compute(bm: BlockManager, tokens) -> Sequence:
    """Admit a prompt (taking any prefix hits), compute all of it and register its full blocks."""
    seq = make_seq(tokens)
    hits = bm.get_computed_blocks(seq)
    # Hits are passed alongside num_computed_tokens (still 0), as the scheduler admits.
    assert bm.allocate_slots(seq, len(seq) - len(hits) * bm.block_size, hits)
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)
    return seq


def cached_and_freed(num_blocks: int, tokens) -> BlockManager:
    """A pool whose only history is one computed-then-finished prompt: its blocks are cached."""
    bm = BlockManager(num_blocks, 2)
    bm.free(admit_and_compute(bm, tokens))
    return bm


# ---- allocation ------------------------------------------------------------------------------
def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(0, 4)


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 15, 16, 17, 33])
def test_allocation_covers_exactly_ceil_blocks(block_size, num_tokens):
    bm = BlockManager(64, block_size)
    seq = make_seq(range(num_tokens))
    assert bm.blocks_needed(num_tokens) == ceil_div(num_tokens, block_size)
    assert bm.allocate_slots(seq, num_tokens)
    need = ceil_div(num_tokens, block_size)
    assert len(seq.block_table) == need
    assert len(set(seq.block_table)) == need
    assert bm.num_free_blocks == 64 - need
    for b in seq.block_table:
        assert bm.blocks[b].ref_count == 1
    bm.check_invariants([seq])


def test_incremental_allocation_adds_a_block_only_at_a_boundary():
    bm = BlockManager(8, 4)
    seq = make_seq(range(3))
    assert bm.allocate_slots(seq, 3)
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 3
    # Decodes: token 3 still fits block 0, token 4 needs block 1, tokens 5..7 fit it.
    expected = {3: 1, 4: 2, 5: 2, 6: 2, 7: 2, 8: 3}
    for pos, blocks in expected.items():
        seq.token_ids.append(100 + pos)
        assert bm.allocate_slots(seq, 1)
        assert len(seq.block_table) == blocks, pos
        seq.num_computed_tokens += 1
        bm.check_invariants([seq])
    assert bm.num_free_blocks == 8 - 3


def test_chunked_allocation_matches_one_shot():
    bm = BlockManager(16, 4)
    seq = make_seq(range(23))
    for chunk in (5, 7, 3, 8):
        assert bm.allocate_slots(seq, chunk)
        assert len(seq.block_table) == ceil_div(seq.num_computed_tokens + chunk, 4)
        seq.num_computed_tokens += chunk
    assert len(seq.block_table) == ceil_div(23, 4)
    # Asking again for tokens that are already covered takes nothing.
    seq.num_computed_tokens = 20
    before = snapshot(bm, seq)
    assert bm.allocate_slots(seq, 3)
    assert snapshot(bm, seq) == before


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, 4)
    other = make_seq(range(8))
    assert bm.allocate_slots(other, 8)  # 2 of 4 blocks held
    seq = make_seq(range(100, 113))  # 13 tokens: 4 blocks, only 2 free
    before = snapshot(bm, seq)
    assert not bm.can_allocate(seq, 13)
    assert not bm.allocate_slots(seq, 13)
    assert snapshot(bm, seq) == before
    assert seq.block_table == []
    # Exactly what is left still fits.
    assert bm.allocate_slots(seq, 8)
    assert bm.num_free_blocks == 0
    bm.check_invariants([other, seq])


def test_failed_growth_of_a_running_sequence_changes_nothing():
    bm = BlockManager(3, 2)
    a, b = make_seq(range(4)), make_seq(range(10, 12))
    assert bm.allocate_slots(a, 4)
    assert bm.allocate_slots(b, 2)
    a.num_computed_tokens = 4
    a.token_ids.append(99)
    before = snapshot(bm, a)
    assert not bm.allocate_slots(a, 1)
    assert snapshot(bm, a) == before


def test_failed_allocation_with_prefix_hits_changes_nothing():
    bm = BlockManager(4, 2)
    src = admit_and_compute(bm, [1, 2, 3, 4, 5])  # 3 blocks, 2 full ones cached
    filler = make_seq(range(50, 52))
    assert bm.allocate_slots(filler, 2)  # the pool is now full
    seq = make_seq([1, 2, 3, 4, 7, 8, 9])
    hits = bm.get_computed_blocks(seq)
    assert hits == src.block_table[:2]
    before = snapshot(bm, seq)
    assert not bm.allocate_slots(seq, 3, hits)  # needs 2 new blocks, none free
    assert snapshot(bm, seq) == before
    assert [bm.blocks[b].ref_count for b in hits] == [1, 1]


def test_free_returns_every_block_and_shared_blocks_once():
    bm = BlockManager(10, 2)
    a = admit_and_compute(bm, [1, 2, 3, 4, 5, 6, 7])
    b = admit_and_compute(bm, [1, 2, 3, 4, 9, 9, 9, 9])
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.num_free_blocks == 10 - 4 - 2
    bm.free(a)
    assert a.block_table == [] and a.num_registered_blocks == 0
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]
    bm.check_invariants([b])
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 10
    assert bm.usage == 0.0


def test_usage_counts_held_blocks_only():
    bm = BlockManager(4, 2)
    seq = admit_and_compute(bm, [1, 2, 3, 4])
    assert bm.usage == pytest.approx(0.5)
    bm.free(seq)
    assert bm.usage == 0.0
    assert bm.num_cached_blocks == 2  # cached but free: counts as free


# ---- prefix caching --------------------------------------------------------------------------
def test_prefix_hit_shares_computed_blocks():
    bm = BlockManager(16, 4)
    a = admit_and_compute(bm, range(10))  # blocks 0, 1 full; block 2 partial
    assert a.num_registered_blocks == 2
    assert bm.num_cached_blocks == 2
    b = make_seq([*range(8), 42, 43, 44])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    # get_computed_blocks takes no reference.
    assert [bm.blocks[h].ref_count for h in hits] == [1, 1]
    assert bm.allocate_slots(b, 3, hits)
    b.num_computed_tokens = 8
    assert b.block_table[:2] == hits
    assert len(b.block_table) == 3
    assert b.block_table[2] not in a.block_table
    assert [bm.blocks[h].ref_count for h in hits] == [2, 2]
    assert b.num_registered_blocks == 2
    bm.check_invariants([a, b])


@pytest.mark.parametrize("num_new", [1, 3, 4, 5, 8, 9])
def test_allocation_with_hits_covers_hits_plus_new_tokens(num_new):
    bm = BlockManager(16, 4)
    src = admit_and_compute(bm, range(12))
    seq = make_seq([*range(8), *range(100, 100 + num_new)])
    hits = bm.get_computed_blocks(seq)
    assert hits == src.block_table[:2]
    free_before = bm.num_free_blocks
    assert bm.allocate_slots(seq, num_new, hits)
    assert len(seq.block_table) == ceil_div(8 + num_new, 4)
    assert bm.num_free_blocks == free_before - ceil_div(num_new, 4)
    seq.num_computed_tokens = 8
    bm.check_invariants([src, seq])


def test_partial_block_is_never_cached():
    bm = BlockManager(8, 4)
    a = admit_and_compute(bm, range(7))
    assert bm.num_cached_blocks == 1
    # Same 7 tokens plus one: block 1 of `a` was partial, so only block 0 can hit.
    assert bm.get_computed_blocks(make_seq(range(9))) == a.block_table[:1]


def test_uncomputed_blocks_are_not_cached():
    bm = BlockManager(8, 4)
    a = make_seq(range(12))
    assert bm.allocate_slots(a, 12)
    a.num_computed_tokens = 5  # only block 0 is fully computed
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(make_seq(range(13))) == a.block_table[:1]
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3
    assert bm.get_computed_blocks(make_seq(range(13))) == a.block_table


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_full_block_prompt_leaves_the_last_token_uncomputed(k):
    bm = BlockManager(16, 4)
    a = admit_and_compute(bm, range(4 * k))
    assert bm.num_cached_blocks == k
    same = make_seq(range(4 * k))
    assert bm.get_computed_blocks(same) == a.block_table[: k - 1]
    longer = make_seq(range(4 * k + 1))
    assert bm.get_computed_blocks(longer) == a.block_table[:k]


def test_different_prefix_does_not_hit():
    bm = BlockManager(16, 4)
    admit_and_compute(bm, range(12))
    assert bm.get_computed_blocks(make_seq(range(1, 13))) == []
    assert bm.get_computed_blocks(make_seq([0, 1, 2, 99, 4, 5, 6, 7, 8])) == []


def test_a_changed_token_in_block_zero_breaks_the_whole_chain():
    bm = BlockManager(16, 4)
    a = admit_and_compute(bm, range(13))
    assert bm.num_cached_blocks == 3
    # Blocks 1 and 2 hold the very same tokens, but their prefix differs: no hit at all.
    assert bm.get_computed_blocks(make_seq([77, *range(1, 13)])) == []
    # A change in block 1 keeps block 0 and loses the rest.
    changed = list(range(13))
    changed[5] = 77
    assert bm.get_computed_blocks(make_seq(changed)) == a.block_table[:1]
    # A block that merely repeats block 1's tokens at block 0's position does not hit either.
    assert bm.get_computed_blocks(make_seq([4, 5, 6, 7, 8])) == []


def test_same_block_under_different_prefixes_is_cached_separately():
    bm = BlockManager(16, 4)
    x = admit_and_compute(bm, [0, 1, 2, 3, 4, 5, 6, 7, 8])
    y = admit_and_compute(bm, [9, 9, 9, 9, 4, 5, 6, 7, 8])  # block 1 equals x's block 1
    assert bm.num_cached_blocks == 4
    assert bm.get_computed_blocks(make_seq([0, 1, 2, 3, 4, 5, 6, 7, 0])) == x.block_table[:2]
    assert bm.get_computed_blocks(make_seq([9, 9, 9, 9, 4, 5, 6, 7, 0])) == y.block_table[:2]
    assert x.block_table[1] != y.block_table[1]


def test_hash_collision_is_caught_by_content_check():
    bm = BlockManager(8, 4)
    a = admit_and_compute(bm, range(8))
    b = make_seq([9, 9, 9, 9, 9])
    assert bm.get_computed_blocks(b) == []
    # Pretend b's first block hashes to a's cached block 0: the stored tokens must refuse it.
    bm._cached[b.block_hashes[0]] = a.block_table[0]
    assert bm.get_computed_blocks(b) == []


def test_prefix_caching_disabled():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = admit_and_compute(bm, range(9))
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_seq(range(9))) == []
    bm.free(a)
    assert bm.get_computed_blocks(make_seq(range(9))) == []


def test_identical_blocks_computed_twice_register_once():
    bm = BlockManager(8, 2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    assert bm.allocate_slots(a, 3) and bm.allocate_slots(b, 3)
    a.num_computed_tokens = b.num_computed_tokens = 3
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(make_seq([1, 2, 3])) == a.block_table[:1]
    bm.check_invariants([a, b])


def test_cache_survives_decode_tokens():
    bm = BlockManager(8, 2)
    a = admit_and_compute(bm, [1, 2, 3])
    for tok in (4, 5, 6):  # generated tokens fill blocks too
        a.token_ids.append(tok)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5, 6, 7])) == a.block_table[:3]


# ---- freed cached blocks and eviction ---------------------------------------------------------
def test_freed_cached_blocks_stay_hittable_and_are_reclaimed_from_the_free_list():
    bm = BlockManager(6, 4)
    a = admit_and_compute(bm, range(10))
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = make_seq([*range(8), 50, 51])
    hits = bm.get_computed_blocks(b)
    assert hits == table[:2]
    # The hits are on the free list: reclaiming them is not free space for the rest.
    assert bm.can_allocate(b, 2, hits)
    assert bm.allocate_slots(b, 2, hits)
    b.num_computed_tokens = 8
    assert b.block_table[:2] == table[:2]
    assert [bm.blocks[h].ref_count for h in hits] == [1, 1]
    assert bm.num_free_blocks == 6 - 3
    bm.check_invariants([b])


def test_reclaimed_hits_are_not_counted_as_free_space():
    bm = BlockManager(3, 2)
    a = admit_and_compute(bm, [1, 2, 3, 4, 5])  # 3 blocks, 2 cached
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 6, 7, 8, 9])  # 2 hits + 2 new blocks; only 1 block is not a hit
    hits = bm.get_computed_blocks(b)
    assert len(hits) == 2
    before = snapshot(bm, b)
    assert not bm.can_allocate(b, 4, hits)
    assert not bm.allocate_slots(b, 4, hits)
    assert snapshot(bm, b) == before
    assert bm.allocate_slots(b, 2, hits)  # 1 new block fits
    bm.check_invariants([b])


def test_non_cached_free_blocks_are_handed_out_before_cached_ones():
    bm = BlockManager(4, 4)
    a = admit_and_compute(bm, range(8))  # two cached blocks
    a_table = list(a.block_table)
    tmp = make_seq(range(100, 106))
    assert bm.allocate_slots(tmp, 6)  # two blocks never computed: not cached
    tmp_table = list(tmp.block_table)
    bm.free(a)
    bm.free(tmp)  # freed last, yet handed out first
    fresh = make_seq(range(200, 208))
    assert bm.allocate_slots(fresh, 8)
    assert sorted(fresh.block_table) == sorted(tmp_table)
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(make_seq(range(9))) == a_table


def test_eviction_is_lru_blocks_freed_earlier_go_first():
    bm = BlockManager(4, 2)
    a = admit_and_compute(bm, [1, 2, 3, 4])
    b = admit_and_compute(bm, [5, 6, 7, 8])
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    # Both prompts are cached and hittable.
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0])) == a_table
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])) == b_table
    # One new block evicts from `a` (freed first); within `a`, the tail block goes first.
    c = make_seq([9, 9])
    assert bm.allocate_slots(c, 2)
    assert c.block_table == [a_table[1]]
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0])) == a_table[:1]
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])) == b_table
    assert bm.num_cached_blocks == 3
    # The next one takes a's first block; b survives until a is gone.
    d = make_seq([8, 8])
    assert bm.allocate_slots(d, 2)
    assert d.block_table == [a_table[0]]
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0])) == []
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])) == b_table
    bm.check_invariants([c, d])


def test_a_hit_refreshes_lru_position():
    bm = BlockManager(4, 2)
    a = admit_and_compute(bm, [1, 2, 3, 4])
    b = admit_and_compute(bm, [5, 6, 7, 8])
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    # Reuse a's prefix: its blocks come off the free list, the new block evicts from b.
    again = make_seq([1, 2, 3, 4, 0])
    hits = bm.get_computed_blocks(again)
    assert hits == a_table
    assert bm.allocate_slots(again, 1, hits)
    again.num_computed_tokens = 4
    assert again.block_table == [*a_table, b_table[1]]
    bm.free(again)
    # a was used after b: b's remaining block goes before any of a's.
    c = make_seq(range(10, 14))
    assert bm.allocate_slots(c, 4)
    assert c.block_table == [b_table[1], b_table[0]]
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0])) == a_table
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 0])) == []
    bm.check_invariants([c])


def test_evicted_block_loses_its_hash():
    bm = cached_and_freed(2, [1, 2, 3, 4])
    assert bm.num_cached_blocks == 2
    b = make_seq([7, 7, 7, 7])
    assert bm.allocate_slots(b, 4)
    assert bm.num_cached_blocks == 0
    for blk in b.block_table:
        assert bm.blocks[blk].block_hash is None
        assert bm.blocks[blk].token_ids == ()
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 0])) == []
    bm.check_invariants([b])


def test_reset_prefix_cache():
    bm = cached_and_freed(4, [1, 2, 3, 4])
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_seq([1, 2, 3, 4, 5])) == []
    bm.check_invariants([])


# ---- counters --------------------------------------------------------------------------------
def test_record_prefix_lookup_accumulates():
    bm = BlockManager(4, 2)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.record_prefix_lookup(10, 4)
    bm.record_prefix_lookup(7, 0)
    bm.record_prefix_lookup(3, 2)
    assert bm.prefix_cache_queries == 20
    assert bm.prefix_cache_hits == 6
    # Lookups themselves count nothing: only the admission records.
    bm.get_computed_blocks(make_seq([1, 2, 3]))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 6)


# ---- stateful: random operation sequences --------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / compute / decode / free against a shadow model of block contents."""

    seqs = Bundle("seqs")

    @initialize(
        num_blocks=st.integers(1, 10),
        block_size=st.sampled_from([1, 2, 3, 4]),
        prefix_caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, prefix_caching):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.bs = block_size
        self.live: list[Sequence] = []
        # What K/V a block holds, as the whole token prefix up to its end; None: not full yet.
        self.content: dict[int, tuple[int, ...] | None] = {}

    # helpers
    def _total(self, seq: Sequence, num_new: int, hits: list[int]) -> int:
        # Hits are not in num_computed_tokens when they are passed in.
        return seq.num_computed_tokens + len(hits) * self.bs + num_new

    def _expect_ok(self, seq: Sequence, num_new: int, hits: list[int]) -> bool:
        need = ceil_div(self._total(seq, num_new, hits), self.bs) - len(seq.block_table)
        need -= len(hits)
        reclaimed = sum(1 for h in hits if self.bm.blocks[h].ref_count == 0)
        return need <= self.bm.num_free_blocks - reclaimed

    def _allocate(self, seq: Sequence, num_new: int, hits: list[int]) -> bool:
        expect = self._expect_ok(seq, num_new, hits)
        old_table = list(seq.block_table)
        before = snapshot(self.bm, seq)
        ok = self.bm.allocate_slots(seq, num_new, hits)
        assert ok == expect
        if not ok:
            assert snapshot(self.bm, seq) == before
            return False
        want = max(len(old_table), ceil_div(self._total(seq, num_new, hits), self.bs))
        assert len(seq.block_table) == want
        assert seq.block_table[: len(old_table)] == old_table
        assert seq.block_table[len(old_table) : len(old_table) + len(hits)] == hits
        for b in seq.block_table[len(old_table) + len(hits) :]:
            assert self.bm.blocks[b].ref_count == 1
            assert self.bm.blocks[b].block_hash is None
            self.content[b] = None  # a fresh block: whatever it held is gone
        return True

    @rule(
        target=seqs,
        tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12),
        chunk=st.integers(1, 12),
    )
    def admit(self, tokens, chunk):
        seq = make_seq(tokens)
        hits = self.bm.get_computed_blocks(seq)
        assert len(hits) <= (len(seq) - 1) // self.bs
        if not self.bm.enable_prefix_caching:
            assert hits == []
        assert len(set(hits)) == len(hits)
        for i, h in enumerate(hits):
            # A hit must hold exactly this prompt's K/V for that block.
            assert self.content.get(h) == tuple(tokens[: (i + 1) * self.bs])
        num_new = min(chunk, len(seq) - len(hits) * self.bs)
        before_hits = {h: self.bm.blocks[h].ref_count for h in hits}
        if not self._allocate(seq, num_new, hits):
            return multiple()
        seq.num_computed_tokens = len(hits) * self.bs
        for h in hits:
            assert self.bm.blocks[h].ref_count == before_hits[h] + 1
        self.live.append(seq)
        return seq

    @rule(seq=seqs, data=st.data())
    def compute(self, seq, data):
        if seq not in self.live:
            return
        limit = min(len(seq), len(seq.block_table) * self.bs) - seq.num_computed_tokens
        if limit <= 0:
            return
        k = data.draw(st.integers(1, limit))
        start = seq.num_computed_tokens
        for p in range(start, start + k):
            # Writing K/V into a block another sequence reads would corrupt it.
            assert self.bm.blocks[seq.block_table[p // self.bs]].ref_count == 1
        seq.num_computed_tokens += k
        for i in range(start // self.bs, seq.num_computed_tokens // self.bs):
            self.content[seq.block_table[i]] = tuple(seq.token_ids[: (i + 1) * self.bs])
        self.bm.cache_full_blocks(seq)

    @rule(seq=seqs, token=st.integers(0, 2), chunk=st.integers(1, 6))
    def extend(self, seq, token, chunk):
        if seq not in self.live:
            return
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(token)  # a decode: the sampled token is computed next
        num_new = min(chunk, len(seq) - seq.num_computed_tokens)
        self._allocate(seq, num_new, [])

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.live:
            return
        held = list(seq.block_table)
        before = {b: self.bm.blocks[b].ref_count for b in held}
        self.bm.free(seq)
        self.live.remove(seq)
        assert seq.block_table == []
        for b in held:
            assert self.bm.blocks[b].ref_count == before[b] - 1

    @invariant()
    def bookkeeping(self):
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        bm.check_invariants(self.live)
        held = {b for s in self.live for b in s.block_table}
        assert len(held) + bm.num_free_blocks == bm.num_blocks
        if not self.live:
            assert bm.num_free_blocks == bm.num_blocks
        for s in self.live:
            assert len(set(s.block_table)) == len(s.block_table)
            assert s.num_computed_tokens <= len(s.block_table) * self.bs
        for h, b in bm._cached.items():
            blk = bm.blocks[b]
            assert blk.block_hash == h
            # A cached block's stored tokens are what it really holds.
            full = self.content.get(b)
            assert full is not None
            assert full[-self.bs :] == blk.token_ids
        if not bm.enable_prefix_caching:
            assert bm.num_cached_blocks == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase
