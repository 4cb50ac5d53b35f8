"""BlockManager: the paged KV pool's bookkeeping.

Blocks are ref-counted so sequences can share a prefix. A full block whose K/V are computed is
registered under a hash that chains over every token before it, so another sequence with the same
prefix finds it. Freed blocks go onto one free list that is also the LRU order of the prefix
cache: a freed block keeps its hash until it is handed out again, so a repeated prompt can still
hit it. All operations are O(1) per block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvpilot_engine.sequence import Sequence

_ROOT_HASH = 0x6B7670696C6F74  # the parent of every sequence's first block


def root_hash(seq: Sequence) -> int:
    """The parent of the sequence's first block: the base model's, or one per LoRA adapter, so
    the chained hashes of the same tokens differ between adapters."""
    return _ROOT_HASH if not seq.lora_key else hash((_ROOT_HASH, "lora", seq.lora_key))


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    # Kept to verify a hash hit, so a 64-bit collision can never serve another prompt's K/V.
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the front is handed out first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Prefix-cache counters in tokens, as vLLM's prefix_cache_queries/hits.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- state -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing -----------------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(seq)
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))

    def _lookup(self, seq: Sequence, i: int) -> int | None:
        block_id = self._cached.get(seq.block_hashes[i])
        if block_id is None:
            return None
        block = self.blocks[block_id]
        parent = seq.block_hashes[i - 1] if i else root_hash(seq)
        tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
        if block.parent_hash != parent or block.token_ids != tokens:
            return None
        return block_id

    # ---- admission ---------------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Longest run of cached full blocks that prefix `seq`. Takes no references.

        At least the last token is always left to compute: its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        num_full = (len(seq) - 1) // self.block_size
        self._update_hashes(seq, num_full)
        hits: list[int] = []
        for i in range(num_full):
            block_id = self._lookup(seq, i)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        # Counted once per admission, not per attempt, so a request that waits for blocks
        # does not inflate the hit rate.
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def _blocks_to_allocate(self, seq: Sequence, num_new_tokens: int, computed: list[int]) -> int:
        # `computed` hits are tokens about to become computed; they are not in
        # seq.num_computed_tokens yet.
        total = seq.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        return self.blocks_needed(total) - len(seq.block_table) - len(computed)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed: list[int] = ()) -> bool:
        need = self._blocks_to_allocate(seq, num_new_tokens, computed)
        # A cached hit that sits on the free list is taken off it, so it is not a free block.
        reclaimed = sum(1 for b in computed if self.blocks[b].ref_count == 0)
        return need <= len(self._free) - reclaimed

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: list[int] = ()) -> bool:
        """Make `seq.block_table` cover its computed tokens plus `num_new_tokens`.

        `computed` are prefix-cache hits from get_computed_blocks, taken on admission (the caller
        then adds their tokens to num_computed_tokens).
        Returns False, changing nothing, when the pool is short."""
        if not self.can_allocate(seq, num_new_tokens, computed):
            return False
        need = self._blocks_to_allocate(seq, num_new_tokens, computed)
        for block_id in computed:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if computed:
            seq.num_registered_blocks = len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evicting the LRU cached block: nobody can hit it any more.
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
            block.parent_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    # ---- after a step ------------------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V are now computed, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                block.parent_hash = seq.block_hashes[i - 1] if i else root_hash(seq)
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._cached[h] = block.block_id
        seq.num_registered_blocks = num_full

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` tokens' (rejected drafts' slots). They were
        allocated for uncomputed tokens, so none is registered in the prefix cache."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None
                self._free.move_to_end(block.block_id, last=block.block_hash is not None)

    def free(self, seq: Sequence) -> None:
        # Tail first, so a sequence's prefix blocks are the last of its blocks to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    # Nothing can hit it: hand it out before any cached block.
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            block = self.blocks[block_id]
            block.block_hash = None
            block.parent_hash = None
            block.token_ids = ()
        self._cached.clear()

    def check_invariants(self, live: list[Sequence]) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (tests call this)."""
        refs = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_table:
                refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count}, held {refs[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_count {block.ref_count} but "
                f"free={block.block_id in self._free}"
            )
        for h, b in self._cached.items():
            assert self.blocks[b].block_hash == h
