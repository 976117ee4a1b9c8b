"""KV block accounting (pure Python): the budget, the free list and each request's block table.

The tensors live in worker/paged_cache.py; this module only decides which block ids a request owns, so the
scheduler can check admission against the budget without touching torch (as vLLM's KVCacheManager).
"""

from __future__ import annotations


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Block ids handed out LIFO so recently freed (cache-warm) blocks are reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def extra_blocks_for(self, request_id: str, total_tokens: int) -> int:
        """How many more blocks the request needs to hold total_tokens."""
        return max(0, self.blocks_needed(total_tokens) - len(self.block_table(request_id)))

    def can_allocate(self, request_id: str, total_tokens: int) -> bool:
        return self.extra_blocks_for(request_id, total_tokens) <= len(self._free)

    def allocate(self, request_id: str, total_tokens: int) -> list[int]:
        """Grows the request's table to hold total_tokens; returns the full table."""
        extra = self.extra_blocks_for(request_id, total_tokens)
        if extra > len(self._free):
            raise OutOfBlocks(f"{request_id} needs {extra} blocks, {len(self._free)} free")
        table = self._tables.setdefault(request_id, [])
        for _ in range(extra):
            table.append(self._free.pop())
        return table

    def free(self, request_id: str) -> int:
        table = self._tables.pop(request_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def holders(self) -> list[str]:
        return list(self._tables)
