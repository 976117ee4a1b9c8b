"""A budgeted host pool for swapped-out KV blocks (ALISE's swap tier).

One preallocated slab of `budget_bytes`, laid out block-major, [capacity_blocks, layers, block_size,
kv_heads * (head_dim + value_head_dim)] (each token's keys, then its values: K and V may have different head
sizes, as DeepSeek-V3's latent pools do), so one request's blocks in a run of host slots are one contiguous
region and move in one copy. Host slots are handed out as runs (first fit, split over several runs only when
the slab is fragmented).

- On CUDA the slab is pinned CPU memory and the copies run on a side stream: swap-out gathers the request's
  blocks on the device (the compute stream waits for that gather only, so the freed blocks can be reused at
  once) and copies them to the host asynchronously; swap-in copies back on the side stream and the compute
  stream waits for it before the request's next step. The side stream is in order, so a swap-in never
  overtakes the swap-out it reads.
- On CPU the slab is a separate preallocated tensor, outside the KV pools' budget; copies are synchronous.

Both directions are timed on the real copies (CUDA events on a GPU, the wall clock on a CPU) and exposed as
bytes per second for the cost model (worker/kv_tiers.py).
"""

from __future__ import annotations

import time

import torch

from worker.kv_tiers import RateMeter

# Until the first real copy is measured.
PRIOR_BYTES_PER_S = {"cpu": 2e9, "cuda": 10e9}


class HostPoolFull(Exception):
    pass


class HostKVPool:
    def __init__(self, num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 budget_bytes: int, device: torch.device | str = "cpu", value_head_dim: int | None = None):
        self.device = torch.device(device)
        self.num_layers = num_layers
        self.key_width = kv_heads * head_dim                        # elements of one token's keys (one layer)
        self.value_width = kv_heads * (value_head_dim or head_dim)  # ... and of its values
        self.block_shape = (num_layers, block_size, self.key_width + self.value_width)
        elem = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = num_layers * block_size * (self.key_width + self.value_width) * elem
        self.capacity_blocks = max(0, budget_bytes // self.block_bytes)
        self.is_cuda = self.device.type == "cuda"
        self.slab = torch.empty((self.capacity_blocks, *self.block_shape), dtype=dtype,
                                pin_memory=self.is_cuda and torch.cuda.is_available())
        self._free = bytearray([1]) * self.capacity_blocks
        self._num_free = self.capacity_blocks
        self._held: dict[str, list[tuple[int, int]]] = {}   # request -> [(first slot, length), ...]
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        prior = PRIOR_BYTES_PER_S["cuda" if self.is_cuda else "cpu"]
        self.out_rate = RateMeter(prior)
        self.in_rate = RateMeter(prior)
        self._pending: list[tuple[RateMeter, int, object, object]] = []  # CUDA: (meter, bytes, start, end)

    # --- budget --------------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        return self._num_free

    @property
    def free_bytes(self) -> int:
        return self._num_free * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return (self.capacity_blocks - self._num_free) * self.block_bytes

    def has_room(self, num_blocks: int) -> bool:
        return num_blocks <= self._num_free

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def num_blocks(self, request_id: str) -> int:
        return sum(n for _, n in self._held.get(request_id, ()))

    def _take(self, n: int) -> list[tuple[int, int]]:
        run = self._free.find(b"\x01" * n)
        if run >= 0:
            segments = [(run, n)]
        else:  # fragmented: the first free runs, in slot order
            segments, pos, left = [], 0, n
            while left:
                start = self._free.find(1, pos)
                end = self._free.find(0, start)
                length = min(left, (self.capacity_blocks if end < 0 else end) - start)
                segments.append((start, length))
                left -= length
                pos = start + length
        for start, length in segments:
            self._free[start:start + length] = b"\x00" * length
        self._num_free -= n
        return segments

    def drop(self, request_id: str) -> int:
        """Forgets a request's host copy (it finished or was cancelled while swapped out)."""
        segments = self._held.pop(request_id, [])
        for start, length in segments:
            self._free[start:start + length] = b"\x01" * length
        n = sum(length for _, length in segments)
        self._num_free += n
        return n

    # --- copies --------------------------------------------------------------------------------------
    def swap_out(self, request_id: str, key_pools: list[torch.Tensor], value_pools: list[torch.Tensor],
                 block_ids: list[int]) -> None:
        """Copies the blocks (all layers) to host slots; the caller frees the device blocks afterwards."""
        n = len(block_ids)
        if request_id in self._held:
            raise ValueError(f"request_id: {request_id!r} is already swapped out")
        if n > self._num_free:
            raise HostPoolFull(f"{request_id} needs {n} host blocks, {self._num_free} free")
        segments = self._take(n)
        self._held[request_id] = segments
        ids = torch.tensor(block_ids, dtype=torch.long, device=key_pools[0].device)
        timer = self._start()
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(compute)          # the KV written by earlier steps
            with torch.cuda.stream(self.stream):
                staged = self._gather(key_pools, value_pools, ids)
            compute.wait_stream(self.stream)          # the gather only: the device blocks are free after it
            with torch.cuda.stream(self.stream):
                self._copy_segments_out(staged, segments, non_blocking=True)
        else:
            self._copy_segments_out(self._gather(key_pools, value_pools, ids), segments, non_blocking=False)
        self._stop(timer, self.out_rate, n * self.block_bytes)

    def swap_in(self, request_id: str, key_pools: list[torch.Tensor], value_pools: list[torch.Tensor],
                block_ids: list[int]) -> None:
        """Copies a swapped-out request back into block_ids (as many as it swapped out) and frees its host
        slots. On CUDA the compute stream waits for the copy before anything it runs next."""
        segments = self._held.get(request_id)
        if segments is None:
            raise KeyError(f"request_id: {request_id!r} is not swapped out")
        n = sum(length for _, length in segments)
        if len(block_ids) != n:
            raise ValueError(f"block_ids: {request_id!r} swapped out {n} blocks, got {len(block_ids)}")
        device = key_pools[0].device
        ids = torch.tensor(block_ids, dtype=torch.long, device=device)
        timer = self._start()
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(compute)          # nothing still reads or writes the target blocks
            with torch.cuda.stream(self.stream):
                staged = self._copy_segments_in(segments, device, non_blocking=True)
                self._scatter(staged, key_pools, value_pools, ids)
            compute.wait_stream(self.stream)
        else:
            self._scatter(self._copy_segments_in(segments, device, non_blocking=False), key_pools, value_pools, ids)
        self._stop(timer, self.in_rate, n * self.block_bytes)
        self.drop(request_id)  # safe on CUDA too: later copies into these slots queue behind this one

    def _gather(self, key_pools, value_pools, ids) -> torch.Tensor:
        """[n, layers, block_size, key_width + value_width] on the pools' device."""
        per_layer = [torch.cat((k.index_select(0, ids).flatten(2), v.index_select(0, ids).flatten(2)), dim=-1)
                     for k, v in zip(key_pools, value_pools)]
        return torch.stack(per_layer, dim=1)

    def _scatter(self, staged, key_pools, value_pools, ids) -> None:
        kw = self.key_width
        for layer, (k, v) in enumerate(zip(key_pools, value_pools)):
            k.index_copy_(0, ids, staged[:, layer, :, :kw].reshape(-1, *k.shape[1:]).to(k.dtype))
            v.index_copy_(0, ids, staged[:, layer, :, kw:].reshape(-1, *v.shape[1:]).to(v.dtype))

    def _copy_segments_out(self, staged, segments, non_blocking: bool) -> None:
        offset = 0
        for start, length in segments:
            self.slab[start:start + length].copy_(staged[offset:offset + length], non_blocking=non_blocking)
            offset += length

    def _copy_segments_in(self, segments, device, non_blocking: bool) -> torch.Tensor:
        parts = [self.slab[start:start + length].to(device, non_blocking=non_blocking) for start, length in segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # --- measuring ----------------------------------------------------------------------------------
    def _start(self):
        if self.stream is None:
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        return start

    def _stop(self, timer, meter: RateMeter, nbytes: int) -> None:
        if self.stream is None:
            meter.observe(nbytes, time.perf_counter() - timer)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self._pending.append((meter, nbytes, timer, end))
        self._collect()

    def _collect(self) -> None:
        """Adds the CUDA copies that have completed to the rates, without waiting for the others."""
        still = []
        for meter, nbytes, start, end in self._pending:
            if end.query():
                meter.observe(nbytes, start.elapsed_time(end) / 1000.0)
            else:
                still.append((meter, nbytes, start, end))
        self._pending = still

    @property
    def swap_out_bytes_per_s(self) -> float:
        if self._pending:
            self._collect()
        return self.out_rate.bytes_per_s

    @property
    def swap_in_bytes_per_s(self) -> float:
        if self._pending:
            self._collect()
        return self.in_rate.bytes_per_s
