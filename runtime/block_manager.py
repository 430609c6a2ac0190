"""The paged KV cache's bookkeeping: ref-counted blocks and a hash-chained prefix cache.

Ownership (the invariants `check` verifies):

- A block is *referenced* (ref_count > 0) by exactly the live sequences whose block tables
  contain it, once per table; it is *free* (in `free`) exactly when ref_count == 0.
- A free block may still hold the K/V of a full block of tokens, registered in `cached` under
  its chain hash (hash of the previous block's hash and this block's tokens): a later request
  with the same prefix adopts it instead of recomputing. It keeps its contents until it is
  handed out again (evicted), least recently freed first.
- Blocks are freed when their sequence finishes, is aborted or is preempted; nothing else
  releases a block. The last block of a freed sequence is evicted before its first, since
  prefixes are the part other requests share.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from runtime.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once full and registered in the prefix cache
    tokens: tuple[int, ...] = ()  # the tokens behind `hash`, to rule out hash collisions


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            sizes = f"{num_blocks}, {block_size}"
            raise ValueError(f"num_blocks and block_size must be >= 1, got {sizes}")
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self._hashes: dict[int, list[int]] = {}  # seq id -> chain hashes of its full blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by live sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks for the table to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens, leaving at least one to compute."""
        if not self.prefix_caching:
            return []
        found: list[int] = []
        previous: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(previous, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            found.append(block_id)
            previous = h
        return found

    def can_admit(self, seq: Sequence, prefix: list[int], num_new_tokens: int) -> bool:
        """Whether `seq` fits with `prefix` adopted and `num_new_tokens` computed after it."""
        revived = sum(1 for b in prefix if self.blocks[b].ref_count == 0)  # leave the free list
        total = len(prefix) * self.block_size + num_new_tokens
        new = -(-total // self.block_size) - len(prefix)
        return revived + new <= len(self.free)

    def admit(self, seq: Sequence, prefix: list[int]) -> None:
        """Give a waiting sequence the cached prefix blocks; they count as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        hashes = []
        for block_id in prefix:
            block = self.blocks[block_id]
            assert block.hash is not None  # lookup_prefix only returns registered blocks
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            hashes.append(block.hash)
        seq.block_table = list(prefix)
        seq.num_computed_tokens = seq.num_cached_tokens = len(prefix) * self.block_size
        self._hashes[seq.seq_id] = hashes

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` tokens; False, changing nothing, if short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict: its contents are about to be overwritten
                del self.cached[block.hash]
                block.hash, block.tokens = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly computed full blocks into the prefix cache."""
        if not self.prefix_caching:
            return
        hashes = self._hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            # Another sequence may have computed the same block first: keep that one cached.
            if h not in self.cached and block.hash is None:
                block.hash, block.tokens = h, tokens
                self.cached[h] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        """Release every block of the sequence (finish, abort or preemption)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._hashes.pop(seq.seq_id, None)

    def check(self, live: list[Sequence]) -> None:
        """Assert every invariant of the module docstring against the live sequences."""
        refs = [0] * len(self.blocks)
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id} refs"
            assert (block.ref_count == 0) == (block.block_id in self.free)
            if block.hash is not None:
                assert self.cached.get(block.hash) == block.block_id
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h
