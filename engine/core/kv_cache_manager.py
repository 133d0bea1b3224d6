"""Paged KV-cache block manager with prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots, allocated once by
the worker. This module only does the bookkeeping: which blocks a sequence owns
(its block table), reference counts, and the prefix cache.

Prefix caching: once every token of a block is computed, the block is keyed by
``(parent_hash, block_tokens)`` where ``parent_hash`` is the hash of the previous
block's key, so a key names the whole prefix up to and including the block (the
first block's parent is the LoRA adapter's salt, None for the base model). A
later sequence whose prompt starts with the same tokens takes those blocks
instead of recomputing them. Freed blocks keep their key and stay findable until
they are evicted, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.core.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]


def root_hash(seq: Sequence) -> int | None:
    """The "parent" of a sequence's first block: None for the base model, the
    adapter's salt for a LoRA request, so blocks never cross adapters (the same
    tokens give other K/V under another adapter)."""
    lora = seq.lora_request
    return None if lora is None else lora.cache_salt


class KVCacheBlock:
    __slots__ = ("block_id", "ref_count", "key")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.key: BlockKey | None = None  # set once the block is full and computed

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, refs={self.ref_count}, cached={self.key is not None})"


class KVCacheManager:
    """Hands out KV-cache blocks to sequences; the only owner of block tables."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # free blocks in eviction order: the first one is reused first
        self.free_blocks: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached_blocks: dict[BlockKey, KVCacheBlock] = {}

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks that starts ``seq``, and how many
        tokens they hold. At least one token is always left to compute, because
        the step that computes it yields the logits to sample from."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        tokens = seq.token_ids
        hits: list[KVCacheBlock] = []
        parent_hash = root_hash(seq)
        for i in range((len(tokens) - 1) // bs):
            key = (parent_hash, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self.cached_blocks.get(key)
            if block is None:
                break
            hits.append(block)
            parent_hash = hash(key)
        return hits, len(hits) * bs

    # ------------------------------------------------------------------ changes

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] | None = None,
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq`` after its computed
        ones (and after ``computed_blocks``, prefix-cache hits of a sequence that owns
        no blocks yet). Returns False, changing nothing, when too few blocks are free."""
        computed_blocks = computed_blocks or []
        if computed_blocks and seq.block_table:
            raise ValueError("computed_blocks are only for a sequence that owns no blocks")
        num_cached = len(computed_blocks) * self.block_size
        total = seq.num_computed_tokens + num_cached + num_new_tokens
        num_required = self.num_blocks_for(total) - len(seq.block_table) - len(computed_blocks)
        # a hit on a free block takes it out of the free pool too
        num_revived = sum(1 for b in computed_blocks if b.ref_count == 0)
        if max(num_required, 0) + num_revived > len(self.free_blocks):
            return False
        for block in computed_blocks:
            self._take(block)
            seq.block_table.append(block.block_id)
            seq.block_hashes.append(hash(block.key))
        for _ in range(num_required):
            seq.block_table.append(self._pop_free_block().block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks of ``seq`` that became full and computed, so that later
        sequences can find them. Called after each step that computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent_hash = seq.block_hashes[i - 1] if i else root_hash(seq)
            key = (parent_hash, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if key not in self.cached_blocks:
                # another sequence may have computed the same block in the same step;
                # the first keeps the key and this copy is freed as a plain block
                block = self.blocks[seq.block_table[i]]
                block.key = key
                self.cached_blocks[key] = block
            seq.block_hashes.append(hash(key))

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks of ``seq`` past the first ``num_tokens`` tokens
        (those a speculative step reserved for drafts that were refused)."""
        keep = max(self.num_blocks_for(num_tokens), len(seq.block_hashes))
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block.block_id] = block
                if block.key is None:
                    self.free_blocks.move_to_end(block.block_id, last=False)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``. Cached blocks stay findable until evicted;
        the sequence's last blocks are queued for eviction before its first ones,
        since a shared prefix is more likely to be asked for again."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = block
                if block.key is None:  # nothing to keep: reuse it first
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block key (blocks in use keep their data): sleep mode
        calls it when the cache's contents go away."""
        for block in self.cached_blocks.values():
            block.key = None
        self.cached_blocks.clear()

    # ------------------------------------------------------------------ internals

    def _take(self, block: KVCacheBlock) -> None:
        if block.ref_count == 0:
            del self.free_blocks[block.block_id]
        block.ref_count += 1

    def _pop_free_block(self) -> KVCacheBlock:
        _, block = self.free_blocks.popitem(last=False)
        if block.key is not None:  # evict it from the prefix cache
            del self.cached_blocks[block.key]
            block.key = None
        block.ref_count = 1
        return block
