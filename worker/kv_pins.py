"""Agent-program KV pins on the worker: keep a finished turn's KV, hand its prefix to the program's next turn.

Continuum's worker side. When a non-final turn of an agent program ends, its blocks (the KV of every token
it computed: prompt and output but the last sampled token) move from the request to a pin under the
program id instead of being freed. The pin lives `provisional_s` until the kvmanager decides (SetPin: keep
it for a TTL, or free it now); it also lapses on this worker's own clock, so a lost kvmanager never leaks
memory. When the program's next turn is admitted, the longest common token prefix of the pin and the new
prompt becomes the new request's computed context (its first blocks move over, the rest of the pin is
freed), and only the suffix is prefilled. The KV is reused as it was computed, so greedy tokens equal a
full recompute (tests/worker/test_kv_pins_engine.py).

Pins are memory held on speculation: they yield to real work. The scheduler evicts them, lowest keep_score
first (the kvmanager's estimate that the program comes back in time), ties soonest expiry first, when an
LS request or a running request's growth needs their blocks, or when nothing runs at all. A BE admission
does not evict them: that is the point of pinning (the program's next turn, earlier in program order,
finds its context), and the TTL bounds the wait.

Pure Python: the pool tensors never move; only block ownership in the BlockAllocator changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from worker.kv_blocks import BlockAllocator


@dataclass
class Pin:
    program_id: str
    token_ids: list[int]       # the tokens whose KV the pin's blocks hold, in order
    expires_at: float          # on the store's clock; math.inf = no expiry
    keep_score: float
    provisional: bool = True   # not yet confirmed by the kvmanager

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def owner_id(program_id: str) -> str:
    """The allocator table that holds a program's pinned blocks (request ids never start with NUL)."""
    return "\0pin:" + program_id


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PinStore:
    def __init__(self, allocator: BlockAllocator, provisional_s: float = 1.0, provisional_keep_score: float = 0.5,
                 clock=time.monotonic):
        self.allocator = allocator
        self.provisional_s = provisional_s
        self.provisional_keep_score = provisional_keep_score
        self.clock = clock
        self._pins: dict[str, Pin] = {}
        self._next_expiry = math.inf
        # Counters for metrics: why pins ended, and prompt tokens served from pins.
        self.ended: dict[str, int] = {}
        self.reused_tokens = 0
        self._pinned_tokens = 0
        self._claims: dict[str, Pin] = {}  # request id -> the pin it took a prefix of, until confirmed

    # --- queries ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pins)

    def __contains__(self, program_id: str) -> bool:
        return program_id in self._pins

    @property
    def pinned_tokens(self) -> int:
        # A plain counter: other threads read it (worker stats) while the engine thread changes the pins.
        return self._pinned_tokens

    def get(self, program_id: str) -> Pin | None:
        return self._pins.get(program_id)

    def pins(self) -> list[Pin]:
        return list(self._pins.values())

    # --- lifecycle ------------------------------------------------------------------------------------------
    def retain(self, program_id: str, request_id: str, token_ids: list[int]) -> Pin | None:
        """Moves a finished turn's blocks to the program's pin (replacing an older pin of the program).

        token_ids are the tokens whose KV was computed; blocks past them are freed. None (and the blocks
        freed) when there is nothing to keep."""
        self.release(program_id, "replaced")
        if not token_ids:
            self.allocator.free(request_id)
            return None
        self.allocator.transfer(request_id, owner_id(program_id), self.allocator.blocks_needed(len(token_ids)))
        pin = Pin(program_id, list(token_ids), self.clock() + self.provisional_s, self.provisional_keep_score)
        self._add(pin)
        return pin

    def set(self, program_id: str, ttl_s: float, keep_score: float) -> Pin | None:
        """The kvmanager's decision: keep for ttl_s from now (<= 0 frees it). None when nothing is held."""
        pin = self._pins.get(program_id)
        if pin is None:
            return None
        if not ttl_s > 0:
            self.release(program_id, "unpinned")
            return None
        pin.expires_at = self.clock() + ttl_s
        pin.keep_score = keep_score
        pin.provisional = False
        self._next_expiry = min(self._next_expiry, pin.expires_at)
        return pin

    def release(self, program_id: str, reason: str = "released") -> int:
        """Frees a program's pin; returns the tokens it held (0 when there was none)."""
        pin = self._pins.pop(program_id, None)
        if pin is None:
            return 0
        self._pinned_tokens -= pin.tokens
        self.allocator.free(owner_id(program_id))
        self.ended[reason] = self.ended.get(reason, 0) + 1
        return pin.tokens

    def release_all(self, reason: str) -> None:
        for pid in list(self._pins):
            self.release(pid, reason)

    def expire(self) -> int:
        """Frees pins whose time is up; returns how many."""
        now = self.clock()
        if now < self._next_expiry:
            return 0
        gone = [pid for pid, p in self._pins.items() if p.expires_at <= now]
        for pid in gone:
            self.release(pid, "expired")
        self._next_expiry = min((p.expires_at for p in self._pins.values()), default=math.inf)
        return len(gone)

    def evict_one(self, reason: str, keep: str = "") -> bool:
        """Frees the pin least worth keeping (lowest keep_score, then soonest expiry), other than `keep`'s.
        False when there is none to free."""
        victim = min((p for p in self._pins.values() if p.program_id != keep),
                     key=lambda p: (p.keep_score, p.expires_at, p.program_id), default=None)
        if victim is None:
            return False
        self.release(victim.program_id, reason)
        return True

    # --- reuse ----------------------------------------------------------------------------------------------
    def claim(self, program_id: str, request_id: str, prompt_token_ids: list[int]) -> int:
        """Gives the request the pin's longest common prefix with its prompt; returns its length in tokens.

        At least the prompt's last token is left to compute (its logits sample the first new token). The
        pin's blocks past the prefix are freed. 0 (and the pin untouched) when nothing matches. The claim
        stays open until `confirm` (the request started) or `unclaim` (it could not start after all)."""
        pin = self._pins.get(program_id)
        if pin is None:
            return 0
        n = min(common_prefix_len(pin.token_ids, prompt_token_ids), len(prompt_token_ids) - 1)
        if n <= 0:
            return 0
        del self._pins[program_id]
        self._pinned_tokens -= pin.tokens
        self.allocator.transfer(owner_id(program_id), request_id, self.allocator.blocks_needed(n))
        pin.token_ids = pin.token_ids[:n]
        self._claims[request_id] = pin
        return n

    def confirm(self, request_id: str) -> None:
        pin = self._claims.pop(request_id, None)
        if pin is not None:
            self.ended["claimed"] = self.ended.get("claimed", 0) + 1
            self.reused_tokens += pin.tokens

    def unclaim(self, request_id: str) -> None:
        """Undoes an open claim: the prefix becomes the program's pin again, with its expiry and score, so a
        waiting request never sits on blocks the scheduler cannot reclaim."""
        pin = self._claims.pop(request_id, None)
        if pin is None:
            return
        self.allocator.transfer(request_id, owner_id(pin.program_id))
        self._add(pin)

    def _add(self, pin: Pin) -> None:
        self._pins[pin.program_id] = pin
        self._pinned_tokens += pin.tokens
        self._next_expiry = min(self._next_expiry, pin.expires_at)
