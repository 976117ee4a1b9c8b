"""KV block accounting (pure Python): the budget, the free blocks and each request's block table.

The tensors live in worker/paged_cache.py; this module only decides which block ids a request owns, so the
scheduler can check admission against the budget without touching torch (as vLLM's KVCacheManager).

A request admitted with a known expected size gets, when one is free, one contiguous run of blocks for all
of it: its KV is then a plain slice of the pool that attention reads in place, where scattered blocks must
first be gathered into a new tensor (a copy per layer per step that dominates CPU decode at long contexts).
Growth past the run, or a cache too fragmented for one, falls back to single blocks.
"""

from __future__ import annotations

FREE, USED = 1, 0


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._flags = bytearray([FREE]) * num_blocks  # bytearray.find locates free runs in C
        self._num_free = num_blocks
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return self._num_free * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def extra_blocks_for(self, request_id: str, total_tokens: int) -> int:
        """How many more blocks the request needs to hold total_tokens."""
        return max(0, self.blocks_needed(total_tokens) - len(self.block_table(request_id)))

    def can_allocate(self, request_id: str, total_tokens: int) -> bool:
        return self.extra_blocks_for(request_id, total_tokens) <= self._num_free

    def allocate(self, request_id: str, total_tokens: int, expected_tokens: int = 0) -> list[int]:
        """Grows the request's table to hold total_tokens; returns the full table.

        A request with no blocks yet and an expected size gets a contiguous run for all of it when the
        cache has one (and the blocks to spare); otherwise it gets what it needs now, block by block.
        """
        extra = self.extra_blocks_for(request_id, total_tokens)
        if extra > self._num_free:
            raise OutOfBlocks(f"{request_id} needs {extra} blocks, {self._num_free} free")
        table = self._tables.setdefault(request_id, [])
        if not table and expected_tokens > total_tokens:
            run = self.blocks_needed(expected_tokens)
            start = self._flags.find(bytes([FREE]) * run) if run <= self._num_free else -1
            if start >= 0:
                self._take(table, range(start, start + run))
                return table
        if extra and table:
            # Grow in place when the blocks right after the table's last one are free: the context stays
            # one run (a request that took over a pinned prefix grows past it this way).
            nxt = table[-1] + 1
            if self._flags[nxt:nxt + extra] == bytes([FREE]) * extra:
                self._take(table, range(nxt, nxt + extra))
                return table
        if extra:
            start = self._flags.find(bytes([FREE]) * extra)
            if start >= 0:
                self._take(table, range(start, start + extra))
            else:
                picked, pos = [], 0
                while len(picked) < extra:
                    pos = self._flags.find(FREE, pos)
                    picked.append(pos)
                    pos += 1
                self._take(table, picked)
        return table

    def _take(self, table: list[int], blocks) -> None:
        for b in blocks:
            self._flags[b] = USED
            table.append(b)
        self._num_free -= len(blocks)

    def free(self, request_id: str) -> int:
        table = self._tables.pop(request_id, [])
        for b in table:
            self._flags[b] = FREE
        self._num_free += len(table)
        return len(table)

    def transfer(self, src_id: str, dst_id: str, num_blocks: int | None = None) -> list[int]:
        """Hands the first num_blocks blocks (all when None) of src's table to dst, which must hold none, and
        frees the rest of src's. The KV in the moved blocks stays where it is: this is how a finished agent
        turn's KV becomes a pin, and a pin's prefix becomes the next turn's."""
        if self._tables.get(dst_id):
            raise ValueError(f"{dst_id} already holds blocks")
        table = self._tables.pop(src_id, [])
        keep = len(table) if num_blocks is None else max(0, min(num_blocks, len(table)))
        moved, rest = table[:keep], table[keep:]
        for b in rest:
            self._flags[b] = FREE
        self._num_free += len(rest)
        if moved:
            self._tables[dst_id] = moved
        return moved

    def holders(self) -> list[str]:
        return list(self._tables)
