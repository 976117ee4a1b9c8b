"""Runs the model one decoder layer at a time over a scheduled batch; owns torch and the KV pools.

A step is begun (embeddings, positions, rotary embeddings and the batch layout are built once, before layer
0), run layer by layer, and finished (final norm, LM head, sampling). `run_layers` may stop at any layer
boundary when asked to, keeping the hidden states, positions and layout in the StepState, so the step can
resume at the next layer later with no recomputation while other steps run in between (QLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from worker import emulated_bf16
from worker.logprobs import sampled_logprobs
from worker.outputs import ModelRunnerOutput
from worker.model_loader import LoadedModel, family_adapter, layer_windows
from worker.moe import EXPERTS_IMPLEMENTATION, ExpertsInParts, takes_native
from worker.native_stages import MOE_BLOCKS, NativeStages
from worker.paged_cache import (ATTN_IMPLEMENTATION, BatchLayout, KVSpan, PagedKVCache, PrefillSegment,
                                prefill_mask)
from worker.paged_decode import DecodeBatch
from worker.sampling import Sampler
from worker.scheduler import SchedulerOutput


@dataclass
class StepState:
    plan: SchedulerOutput
    hidden: torch.Tensor                 # [1, T, hidden]
    position_ids: torch.Tensor           # [1, T]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    layout: BatchLayout
    sample_rows: list[int]               # row of each sampling request's last token
    sample_index: list[int]              # index into plan.scheduled of each sampling request
    # Progress in half-layers: stage 2k is layer k's attention block, 2k + 1 its MLP/MoE block. A step can
    # be parked at any stage boundary (QLLM's finer-grained, expert-level preemption point).
    next_stage: int = 0
    pauses: int = 0
    has_beams: bool = False              # live beam-search beams are among the decode rows (worker/beam.py)
    # (cos, sin) for the native stages when this step runs them (worker/native_stages.py), else None
    native_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # A step with prefill chunks on the CPU path: its decode rows' attention runs natively and the chunks'
    # through the modules in parts of PREFILL_ROW_GROUP rows, each part a point the step may park at
    # (SplitAttention); else None.
    split: "SplitAttention | None" = None
    # Within an attention stage run in parts: the first decode row not run yet (num_decode once all are), then
    # the first prefill part not run yet (both 0 at a stage's start).
    next_row: int = 0
    next_part: int = 0
    # A MoE block whose experts run a range at a time (a yielding policy's steps through the modules), between
    # its ranges; else None.
    moe_parts: ExpertsInParts | None = None

    @property
    def next_layer(self) -> int:
        return self.next_stage // 2


@dataclass
class PrefillPart:
    """Consecutive prefill rows of a step [first_row, first_row + rows) as a batch of their own for the attention
    modules: pieces of the step's chunks, each attending to its request's KV up to its own last token."""

    first_row: int
    rows: int
    layout: BatchLayout
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


@dataclass
class SplitAttention:
    """A step with prefill chunks whose attention blocks are split: its decode rows run natively (their rotary;
    None without decode rows), then its chunks' rows in parts through the modules."""

    decode_rope: tuple[torch.Tensor, torch.Tensor] | None
    prefill_parts: list[PrefillPart]


# Parts a MoE block's experts run in when a step through the modules may park inside it (a range of experts
# each): the MoE block of a BE step that carries a prefill chunk is otherwise one long stretch.
MOE_PARTS = 4

# Prefill rows per attention call through the modules (on the CPU path): the attention of a 512-token chunk at
# a long context is otherwise one stretch of tens of ms an LS request waits out. Computed in order, the parts
# are chunked prefill inside the layer; every policy runs them, so the arithmetic does not depend on it.
PREFILL_ROW_GROUP = 128

# Decode rows per native attention call when a step may park inside its attention stages: at long contexts a
# stage over a few dozen BE decode rows is most of a layer's time, longer than an LS token may wait.
ATTENTION_ROW_GROUP = 8


def _row_group_end(first: int, rows: int) -> int:
    """The end of the row group starting at `first`: ATTENTION_ROW_GROUP rows, and never a last group of one row
    (one row takes another kernel path, whose float sums may round differently from the whole call's)."""
    end = first + ATTENTION_ROW_GROUP
    return rows if rows - end <= 1 else end


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int):
        self.loaded = loaded
        model = loaded.model
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except Exception:  # older loaders validate names strictly; the config switch is what layers read
            model.config._attn_implementation = ATTN_IMPLEMENTATION
        if model.config._experts_implementation is not None:  # MoE families built on transformers' interface
            model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.num_layers = len(self.layers)
        # Each layer's sliding window (0: full causal), as the model's own masks use them; the attention
        # function gets its layer's value, so full and sliding layers mix freely (Qwen2-MoE, layer_types).
        self.windows = layer_windows(model.config)
        # Per-family naming and scalings (GraniteMoE's block_sparse_moe and multipliers); Llama-style defaults.
        self.adapter = family_adapter(model.config)
        self.moe_blocks = [getattr(layer, self.adapter.moe_attr) for layer in self.layers]
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = block_size
        # K and V pools shaped from the config (paged_cache.kv_shapes; the compressed latent for MLA).
        self.cache = PagedKVCache.for_config(model.config, self.num_layers, num_blocks, block_size, self.dtype,
                                             self.device)
        self.sampler = Sampler(self.device)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            emulated_bf16.install(model)  # bf16 GEMMs in float32 where the CPU only emulates bf16
        native = NativeStages(self.layers, self.moe_blocks, self.cache, self.adapter.residual_multiplier) \
            if self.device.type == "cpu" else None
        self.native = native if native is not None and native.any else None

    # --- step lifecycle ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def begin(self, plan: SchedulerOutput) -> StepState:
        """Lays out a plan's rows (the scheduler puts decodes first) and embeds them; the plan is not changed."""
        scheduled = plan.scheduled
        num_decodes = sum(1 for s in scheduled if s.is_decode)
        decodes, prefills = scheduled[:num_decodes], scheduled[num_decodes:]
        rows = decodes
        has_beams = any(s.request.beam is not None for s in decodes)
        if has_beams:  # a beam-search request decodes all its live beams, one row each
            rows = []
            for s in decodes:
                beam = s.request.beam
                rows.extend(beam.rows(s) if beam is not None and beam.started else (s,))
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for s in rows + prefills:
            ids.extend(s.token_ids)
            if s.num_tokens == 1:
                positions.append(s.start)
                slots.append(s.block_table[s.start // bs] * bs + s.start % bs)
            else:
                span = range(s.start, s.start + s.num_tokens)
                positions.extend(span)
                table = s.block_table
                slots.extend(table[pos // bs] * bs + pos % bs for pos in span)
        dev = self.device
        decode = None
        if rows:
            width = max(len(s.block_table) for s in rows)
            decode = DecodeBatch(
                block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in rows],
                                          dtype=torch.long),
                kv_lens=torch.tensor([s.start + 1 for s in rows], dtype=torch.long))
        layout = BatchLayout(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                             num_decode=len(rows), decode=decode, prefills=[])
        row = len(rows)
        for s in prefills:
            kv_len = s.start + s.num_tokens
            masks = {w: prefill_mask(s.start, s.num_tokens, w, dev) for w in set(self.windows)}
            layout.prefills.append(PrefillSegment(q_start=row, q_len=s.num_tokens,
                                                  span=self._span(s.block_table, kv_len), masks=masks))
            row += s.num_tokens
        # A request samples from the row of its last token this step.
        sample_rows, sample_index = [], []
        row = 0
        if has_beams:
            index_of = {id(s): i for i, s in enumerate(scheduled)}
            for s in rows + prefills:
                row += s.num_tokens
                if s.samples:
                    sample_rows.append(row - 1)
                    sample_index.append(index_of[id(getattr(s, "parent", s))])
        else:
            for i, s in enumerate(scheduled):
                row += s.num_tokens
                if s.samples:
                    sample_rows.append(row - 1)
                    sample_index.append(i)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.tensor([positions], dtype=torch.long, device=dev)
        hidden = self.decoder.embed_tokens(input_ids)
        if self.adapter.embedding_multiplier != 1:
            hidden = hidden * self.adapter.embedding_multiplier
        pos_emb = self.decoder.rotary_emb(hidden, position_ids)
        state = StepState(plan, hidden, position_ids, pos_emb, layout, sample_rows, sample_index,
                          has_beams=has_beams or any(s.request.beam is not None and s.samples for s in prefills))
        if self.native is not None:
            state.native_rope = self.native.prepare(state)
            if state.native_rope is None and prefills:
                decode_rope = self.native.prepare_decode_rows(state)
                if decode_rope is not None or not rows:
                    state.split = SplitAttention(decode_rope, self._prefill_parts(prefills, len(rows), state))
        return state

    def _prefill_parts(self, prefills, first_row: int, state: StepState) -> list[PrefillPart]:
        """The step's prefill rows (from `first_row` on) cut into parts of at most PREFILL_ROW_GROUP rows; a chunk
        may span parts, each piece attending to its request's KV up to the piece's last token."""
        cos, sin = state.position_embeddings
        parts: list[PrefillPart] = []
        pieces: list[PrefillSegment] = []
        fill = 0

        def close() -> None:
            nonlocal pieces, fill
            first = parts[-1].first_row + parts[-1].rows if parts else first_row
            end = first + fill
            layout = BatchLayout(slot_mapping=state.layout.slot_mapping[first:end], num_decode=0, decode=None,
                                 prefills=pieces)
            parts.append(PrefillPart(first, fill, layout, state.position_ids[:, first:end],
                                     (cos[:, first:end], sin[:, first:end])))
            pieces, fill = [], 0

        for s in prefills:
            done = 0
            while done < s.num_tokens:
                n = min(PREFILL_ROW_GROUP - fill, s.num_tokens - done)
                start = s.start + done
                masks = {w: prefill_mask(start, n, w, self.device) for w in set(self.windows)}
                pieces.append(PrefillSegment(q_start=fill, q_len=n, span=self._span(s.block_table, start + n),
                                             masks=masks))
                fill += n
                done += n
                if fill == PREFILL_ROW_GROUP:
                    close()
        if fill:
            close()
        return parts

    @torch.inference_mode()
    def run_layers(self, state: StepState, should_yield: Callable[[], bool] | None = None,
                   inner: bool = True) -> bool:
        """Runs from state.next_stage to the end; returns False if it parked at a boundary to let others run.

        With `should_yield` the step may stop between a layer's attention block and its MoE block, between
        layers and, with `inner`, inside a block: between groups of decode rows in a native attention block,
        before a step's prefill chunks and between their parts, between ranges of experts. state.hidden,
        state.next_row, state.next_part and state.moe_parts are all it needs to resume.
        """
        self.cache.set_layout(state.layout)
        inner_yield = should_yield if inner else None
        last = 2 * self.num_layers
        scale = self.adapter.residual_multiplier
        if state.pauses == 0 and state.next_stage == 0 and should_yield is not None and should_yield():
            state.pauses += 1  # LS arrived while this step was being built: park it before any work
            return False
        # (a resumed step always runs to its next boundary: it was handed its turn, and parking again at once
        # would hand LS the core for good while LS tokens are always due)
        while state.next_stage < last:
            index = state.next_stage // 2
            layer = self.layers[index]
            rope = state.native_rope
            if state.next_stage % 2 == 0:
                if not self._attention_stage(index, layer, state, scale, inner_yield):
                    state.pauses += 1
                    return False
            elif rope is None or not self.native.run_moe(index, state):
                if not self._moe_stage(index, layer, state, scale, inner_yield):
                    state.pauses += 1
                    return False
            state.next_stage += 1
            if state.next_stage < last and should_yield is not None and should_yield():
                state.pauses += 1
                return False
        return True

    def _attention_stage(self, index: int, layer, state: StepState, scale: float,
                         should_yield: Callable[[], bool] | None) -> bool:
        """Layer `index`'s attention block from where it stopped; False if it parked inside it."""
        split, rows = state.split, state.layout.num_decode
        rope = state.native_rope if split is None else split.decode_rope
        if (split is None or rows) and (rope is None or not self.native.attention_fits(index, state, rope)):
            self._attention_block(index, layer, state, scale)
            return True
        while state.next_row < rows:
            end = _row_group_end(state.next_row, rows) if should_yield is not None else rows
            self.native.run_attention(index, state, rope, self.windows[index], (state.next_row, end))
            state.next_row = end
            if should_yield is not None and (end < rows or split is not None) and should_yield():
                return False
        if split is not None:
            parts = split.prefill_parts
            while state.next_part < len(parts):
                self._prefill_attention(index, layer, state, scale, parts[state.next_part])
                state.next_part += 1
                if should_yield is not None and state.next_part < len(parts) and should_yield():
                    return False
        state.next_row = state.next_part = 0
        return True

    def _prefill_attention(self, index: int, layer, state: StepState, scale: float, part: PrefillPart) -> None:
        """One part of the step's prefill rows through the attention modules, as a batch of its own."""
        first, end = part.first_row, part.first_row + part.rows
        self.cache.set_layout(part.layout)
        try:
            normed = layer.input_layernorm(state.hidden[:, first:end])
            attn, _ = layer.self_attn(hidden_states=normed, attention_mask=None, position_ids=part.position_ids,
                                      cache=self.cache, use_cache=True, position_embeddings=part.position_embeddings,
                                      qllm_layout=part.layout, qllm_window=self.windows[index])
        finally:
            self.cache.set_layout(state.layout)
        state.hidden[:, first:end] += attn if scale == 1 else attn * scale

    def _attention_block(self, index: int, layer, state: StepState, scale: float) -> None:
        normed = layer.input_layernorm(state.hidden)
        attn, _ = layer.self_attn(hidden_states=normed, attention_mask=None, position_ids=state.position_ids,
                                  cache=self.cache, use_cache=True, position_embeddings=state.position_embeddings,
                                  qllm_layout=state.layout, qllm_window=self.windows[index])
        state.hidden = state.hidden + (attn if scale == 1 else attn * scale)

    def _moe_stage(self, index: int, layer, state: StepState, scale: float,
                   should_yield: Callable[[], bool] | None) -> bool:
        """Layer `index`'s MoE block through the modules, from where it stopped: when the step may park, its
        experts run a range at a time (the router first, as the block's own forward does). False if it parked
        inside it."""
        block = self.moe_blocks[index]
        if state.moe_parts is None:
            rows = state.hidden.shape[0] * state.hidden.shape[1]
            if (should_yield is None or type(block).__name__ not in MOE_BLOCKS
                    or not takes_native(block.experts, rows)):
                self._moe_block(index, layer, state, scale)
                return True
            x = layer.post_attention_layernorm(state.hidden).view(-1, state.hidden.shape[-1])
            _, weights, ids = block.gate(x)
            state.moe_parts = ExpertsInParts(block.experts, x, ids, weights)
        parts = state.moe_parts
        count = -(-parts.num_experts // MOE_PARTS)
        while True:
            parts.run(count)
            if parts.done:
                break
            if should_yield():
                return False
        state.moe_parts = None
        moe = parts.result().view(state.hidden.shape)
        state.hidden = state.hidden + (moe if scale == 1 else moe * scale)
        return True

    def _moe_block(self, index: int, layer, state: StepState, scale: float) -> None:
        moe = self.moe_blocks[index](layer.post_attention_layernorm(state.hidden))
        if self.adapter.moe_returns_tuple:
            moe = moe[0]
        state.hidden = state.hidden + (moe if scale == 1 else moe * scale)

    @torch.inference_mode()
    def finish(self, state: StepState) -> ModelRunnerOutput:
        """Final norm, LM head on the sampling rows only, then sampling (and logprobs for who asks); a beam
        request gets its rows' log-probabilities, from which the engine advances its search."""
        if not state.sample_rows:
            return ModelRunnerOutput()
        rows = torch.tensor(state.sample_rows, dtype=torch.long, device=self.device)
        hidden = self.decoder.norm(state.hidden[0, rows])
        logits = self.native.lm_head(hidden, self.model.lm_head) if state.native_rope is not None else None
        if logits is None:
            logits = self.model.lm_head(hidden)
        if self.adapter.logits_scaling != 1:
            logits = logits / self.adapter.logits_scaling
        logits = logits.float()
        scheduled = [state.plan.scheduled[i] for i in state.sample_index]
        ids = [s.request.request_id for s in scheduled]
        tokens = self.sampler.sample(logits, ids, [s.request.sampling for s in scheduled])
        output = ModelRunnerOutput(dict(zip(ids, tokens)), sampled_logprobs(logits, tokens, scheduled))
        if state.has_beams:
            groups: dict[str, list[int]] = {}
            for j, s in enumerate(scheduled):
                if s.request.beam is not None:
                    groups.setdefault(s.request.request_id, []).append(j)
            output.beam_logprobs = {rid: torch.log_softmax(logits[js], dim=-1) for rid, js in groups.items()}
        return output

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies KV blocks (source, destination) in every layer; gather first, then scatter, so a
        permutation of regions is safe."""
        if not copies:
            return
        src = torch.tensor([a for a, _ in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([b for _, b in copies], dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.keys[dst] = layer.keys[src]
            layer.values[dst] = layer.values[src]

    def _span(self, block_table: list[int], kv_len: int) -> KVSpan:
        n_blocks = -(-kv_len // self.block_size)
        blocks = block_table[:n_blocks]
        if blocks[-1] - blocks[0] == n_blocks - 1 and all(b - a == 1 for a, b in zip(blocks, blocks[1:])):
            return KVSpan(kv_len, first_block=blocks[0])
        return KVSpan(kv_len, block_ids=torch.tensor(blocks, dtype=torch.long, device=self.device))

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
