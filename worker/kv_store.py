"""Where offloaded KV lives under `--kv-policy alise`, and the copies that move it (owns torch; the engine
calls it on the core thread between steps).

The scheduler decides (worker/scheduler/base.py, worker/kv_tiers.py) and queues `KVMove`s; this store makes
them against the model runner's pools before the next step runs: swap_out / swap_in through the host pool
(worker/host_pool.py), quantize / dequantize through worker/kv_quant.py (the int8 copies are kept here),
drop for a request that ended while offloaded. It measures every move and builds the cost model the
scheduler uses from those measurements and the engine's step timings.
"""

from __future__ import annotations

from worker import kv_tiers
from worker.host_pool import HostKVPool
from worker.kv_quant import KVQuantizer, QuantizedKV, int8_block_bytes


class KVTierStore:
    def __init__(self, cache, block_size: int, host_budget_tokens: int, device):
        self.cache = cache
        layer = cache.layers[0]
        _, bs, kv_heads, head_dim = layer.keys.shape
        value_head_dim = layer.values.shape[-1]  # may differ from keys' (DeepSeek-V3's latent pools)
        self.num_layers = len(cache.layers)
        self.host = HostKVPool(self.num_layers, block_size, kv_heads, head_dim, layer.keys.dtype,
                               (host_budget_tokens // block_size) * self._block_bytes(), device,
                               value_head_dim=value_head_dim)
        self.quantizer = KVQuantizer()
        self.int8: dict[str, QuantizedKV] = {}
        self.int8_bytes = 0
        self.block_bytes = self.host.block_bytes
        self.int8_block_bytes = int8_block_bytes(self.num_layers, block_size, kv_heads, head_dim, value_head_dim)

    def _block_bytes(self) -> int:
        k, v = self.cache.layers[0].keys, self.cache.layers[0].values
        return self.num_layers * (k[0].numel() * k.element_size() + v[0].numel() * v.element_size())

    @property
    def key_pools(self):
        return [layer.keys for layer in self.cache.layers]

    @property
    def value_pools(self):
        return [layer.values for layer in self.cache.layers]

    def apply(self, moves) -> None:
        keys, values = self.key_pools, self.value_pools
        for m in moves:
            if m.kind == "swap_out":
                self.host.swap_out(m.request_id, keys, values, m.block_ids)
            elif m.kind == "swap_in":
                self.host.swap_in(m.request_id, keys, values, m.block_ids)
            elif m.kind == "quantize":
                q = self.quantizer.quantize_blocks(keys, values, m.block_ids, m.num_tokens)
                self.int8[m.request_id] = q
                self.int8_bytes += q.nbytes
            elif m.kind == "dequantize":
                q = self.int8.pop(m.request_id)
                self.int8_bytes -= q.nbytes
                self.quantizer.dequantize_into(q, keys, values, m.block_ids)
            elif m.kind == "drop":
                self.host.drop(m.request_id)
                q = self.int8.pop(m.request_id, None)
                if q is not None:
                    self.int8_bytes -= q.nbytes
            else:
                raise ValueError(f"unknown KV move {m.kind!r}")

    def reset(self) -> None:
        """Forgets every offloaded copy (after a failed step failed the requests they belonged to)."""
        for rid in list(self.host._held):
            self.host.drop(rid)
        self.int8.clear()
        self.int8_bytes = 0

    def calibrate(self, num_blocks: int) -> None:
        """Times one round trip of each kind over num_blocks free blocks (their contents do not matter), so
        the first decisions use this machine's rates rather than priors."""
        blocks = list(range(min(num_blocks, self.cache.num_blocks)))
        if not blocks:
            return
        keys, values = self.key_pools, self.value_pools
        tokens = len(blocks) * self.cache.block_size
        self.quantizer.dequantize_into(self.quantizer.quantize_blocks(keys, values, blocks, tokens), keys, values,
                                       blocks)
        if self.host.has_room(len(blocks)):
            self.host.swap_out("\0calibrate", keys, values, blocks)
            self.host.swap_in("\0calibrate", keys, values, blocks)

    def cost_model(self, prefill_s_per_token: float, decode_step_s: float) -> kv_tiers.CostModel:
        return kv_tiers.CostModel(
            block_bytes=self.block_bytes, int8_block_bytes=self.int8_block_bytes,
            prefill_s_per_token=prefill_s_per_token, decode_step_s=decode_step_s,
            swap_out_bytes_per_s=self.host.swap_out_bytes_per_s, swap_in_bytes_per_s=self.host.swap_in_bytes_per_s,
            quantize_bytes_per_s=self.quantizer.quantize_rate.bytes_per_s,
            dequantize_bytes_per_s=self.quantizer.dequantize_rate.bytes_per_s)
