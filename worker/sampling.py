"""Token sampling: greedy, or temperature + top-p with a per-request seeded generator."""

from __future__ import annotations

import torch

from worker.request import SamplingParams


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits: [n, vocab] float32, one row per request."""
        tokens = torch.argmax(logits, dim=-1).tolist()
        for i, (rid, p) in enumerate(zip(request_ids, params)):
            # A temperature this small is argmax; logits / it would overflow to inf and softmax give NaN,
            # which multinomial refuses (an exception that would take the engine thread down).
            if p.greedy or p.temperature < 1e-5:
                continue
            gen = self._generators.get(rid)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed)
                self._generators[rid] = gen
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                cumulative = torch.cumsum(sorted_probs, dim=-1)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                drop = cumulative - sorted_probs >= p.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                choice = torch.multinomial(sorted_probs, 1, generator=gen)
                tokens[i] = int(order[choice])
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=gen))
        return tokens
