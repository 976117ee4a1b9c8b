"""The scheduler's KV bookkeeping in one place (pure Python, no torch).

The block allocator, the agent programs' pins, and under `--kv-policy alise` the books of offloaded KV (host
pool or int8 copies) with the moves the engine must make before the next step and the cost model that
prices them. The scheduler owns one and decides with it; the engine applies its moves and feeds it
measurements (host capacity, cost model), and never writes the scheduler's own state.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker import kv_tiers
from worker.kv_blocks import BlockAllocator
from worker.kv_pins import PinStore
from worker.request import Request

KV_POLICIES = ("recompute", "alise")


@dataclass
class KVMove:
    """A copy the engine must make before the next step runs.

    kind: swap_out / quantize (the victim's blocks, about to be reused), swap_in / dequantize (into the
    request's new blocks), drop (forget a host or int8 copy: the request ended while offloaded).
    """

    kind: str
    request_id: str
    block_ids: list[int]
    num_tokens: int


def int8_owner_id(request_id: str) -> str:
    """The allocator table that charges an int8 copy's bytes against the KV budget."""
    return "\0int8:" + request_id


class KVCacheManager:
    def __init__(self, allocator: BlockAllocator, kv_policy: str = "recompute", kv_int8: str = "be",
                 host_budget_tokens: int = 0, provisional_pin_s: float = 1.0):
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy: expected one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
        if kv_int8 not in [q.value for q in kv_tiers.QualityBound]:
            raise ValueError(f"kv_int8: expected one of off, be, all, got {kv_int8!r}")
        self.allocator = allocator
        self.pins = PinStore(allocator, provisional_pin_s)
        self.alise = kv_policy == "alise"
        self.quality = kv_tiers.QualityBound(kv_int8)
        self.offloaded: dict[str, tuple[kv_tiers.Action, int]] = {}   # request -> (tier, blocks)
        self.host_capacity_blocks = max(0, host_budget_tokens // allocator.block_size)
        self.host_used_blocks = 0
        self._moves: list[KVMove] = []
        self.move_counts: dict[str, int] = {}
        bs = allocator.block_size
        self.cost_model = kv_tiers.CostModel(  # priors until the engine measures the real ones
            block_bytes=bs * 8192, int8_block_bytes=bs * 2176, prefill_s_per_token=1e-4, decode_step_s=0.02,
            swap_out_bytes_per_s=2e9, swap_in_bytes_per_s=2e9, quantize_bytes_per_s=5e8,
            dequantize_bytes_per_s=5e8)

    # --- what the engine feeds in and takes out ----------------------------------------------------------
    def set_host_capacity(self, blocks: int) -> None:
        self.host_capacity_blocks = blocks

    def set_cost_model(self, model: kv_tiers.CostModel) -> None:
        self.cost_model = model

    def take_moves(self) -> list[KVMove]:
        """The copies to make before the next step, in order (a swap-out before any reuse of its blocks)."""
        moves, self._moves = self._moves, []
        return moves

    def int8_blocks(self) -> int:
        """Blocks of the budget charged to int8 copies (they hold no live KV)."""
        return sum(len(self.allocator.block_table(int8_owner_id(rid))) for rid in self.offloaded)

    # --- blocks of scheduled requests ----------------------------------------------------------------------
    def allocate(self, req: Request, total_tokens: int, expected_tokens: int) -> list[int]:
        """The request's block table for total_tokens; an offloaded request's KV is queued to come back into
        the first blocks of it."""
        entry = self.offloaded.get(req.request_id)
        if entry is not None and entry[0] is kv_tiers.Action.INT8:
            self.allocator.free(int8_owner_id(req.request_id))  # the copy is about to become blocks again
        table = list(self.allocator.allocate(req.request_id, total_tokens, expected_tokens=expected_tokens))
        if entry is not None:
            action, n = self.offloaded.pop(req.request_id)
            if action is kv_tiers.Action.SWAP:
                self._add_move("swap_in", req, table[:n])
                self.host_used_blocks -= n
            else:
                self._add_move("dequantize", req, table[:n])
        return table

    def release(self, req: Request) -> None:
        """A finished request's KV: pinned for its program's next turn, or freed."""
        self._forget_offloaded(req)
        if req.keeps_kv_for_next_turn:
            self.pins.retain(req.program_id, req.request_id, req.all_token_ids[:req.num_computed_tokens])
        else:
            self.allocator.free(req.request_id)
            if req.program_id and req.last_turn:
                self.pins.release(req.program_id, "last_turn")

    # --- preemption --------------------------------------------------------------------------------------
    def choose_victim(self, candidates: list[Request]) -> Request | None:
        """alise: kv_tiers' victim (class, then longest remaining time, keeping one that would be back before
        its KV finished moving); None when not alise or no candidate (the policy chooses)."""
        if not self.alise or not candidates:
            return None
        by_id = {r.request_id: r for r in candidates}
        plan = kv_tiers.plan_evictions([self._candidate(r) for r in candidates], 1, self.cost_model,
                                       self._host_free_bytes(), self.quality)
        return by_id[plan[0].request_id] if plan else None

    def offload(self, req: Request) -> bool:
        """alise: moves a victim's KV to the host pool or to int8 per the cost model and frees its blocks;
        False = recompute (the caller drops the KV)."""
        if not self.alise or req.beam is not None or req.num_computed_tokens == 0:
            return False
        decision = kv_tiers.choose_action(self._candidate(req), self.cost_model, self._host_free_bytes(),
                                          self.quality)
        n = self.allocator.blocks_needed(req.num_computed_tokens)
        blocks = self.allocator.block_table(req.request_id)[:n]
        if decision.action is kv_tiers.Action.SWAP:
            self._add_move("swap_out", req, blocks)
            self.host_used_blocks += n
        elif decision.action is kv_tiers.Action.INT8:
            self._add_move("quantize", req, blocks)
        else:
            return False
        self.allocator.free(req.request_id)
        if decision.action is kv_tiers.Action.INT8:  # its compact copy stays charged against the budget
            retained = self.cost_model.int8_retained_blocks(n)
            self.allocator.allocate(int8_owner_id(req.request_id), retained * self.allocator.block_size)
        self.offloaded[req.request_id] = (decision.action, n)
        return True

    def drop(self, req: Request) -> None:
        """Recompute preemption: the KV is gone; the request computes it again when it runs."""
        if req.num_computed_tokens:
            self.move_counts["recompute"] = self.move_counts.get("recompute", 0) + 1
        self.allocator.free(req.request_id)

    # --- internals ---------------------------------------------------------------------------------------
    def _candidate(self, req: Request) -> kv_tiers.Candidate:
        cls = kv_tiers.VictimClass.LS if req.is_ls else kv_tiers.VictimClass.BE
        return kv_tiers.Candidate(req.request_id, cls, self.allocator.blocks_needed(req.num_computed_tokens),
                                  req.num_computed_tokens, req.expected_remaining_tokens,
                                  order_key=req.order_key, arrival_time=req.arrival_time)

    def _host_free_bytes(self) -> int:
        return (self.host_capacity_blocks - self.host_used_blocks) * self.cost_model.block_bytes

    def _add_move(self, kind: str, req: Request, block_ids: list[int]) -> None:
        self._moves.append(KVMove(kind, req.request_id, list(block_ids), req.num_computed_tokens))
        self.move_counts[kind] = self.move_counts.get(kind, 0) + 1

    def _forget_offloaded(self, req: Request) -> None:
        entry = self.offloaded.pop(req.request_id, None)
        if entry is None:
            return
        action, n = entry
        self._moves.append(KVMove("drop", req.request_id, [], 0))
        if action is kv_tiers.Action.SWAP:
            self.host_used_blocks -= n
        else:
            self.allocator.free(int8_owner_id(req.request_id))
