"""The family matrix: for every MoE family the worker serves, a tiny random checkpoint (save_pretrained with the
embedded tokenizer), the engine's greedy tokens equal transformers' generate() on the same checkpoint in fp32:
with chunked prefill and mixed batches, with parks at random layer boundaries (the real core loop), and over
paged KV (prompts of several blocks, longer than any sliding window, in non-contiguous block tables). Families
the engine cannot run exactly are refused at load with a message naming the family and what is missing.
DeepSeek-V3's multi-head latent attention caches the compressed latent; its pools are also checked through the
host-pool swap and int8 tiers of --kv-policy alise.

CPU, fp32, hidden 64, 3 layers, 4 experts: a few seconds per family. README, "Serving a real Hugging Face MoE
checkpoint", lists the same matrix.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from worker import model_loader as ml, native  # noqa: E402
from worker.engine_core import EngineConfig, EngineCore  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402
from worker.request import Priority, Request, SamplingParams  # noqa: E402

torch.set_num_threads(1)

WINDOW = 16      # sliding window of the *_swa variants: every prompt below crosses it, and so do the decodes
BLOCK = 16       # KV block size: every prompt spans several blocks
NEW_TOKENS = 8

COMMON = dict(
    vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


def _config(name: str, **kwargs):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls(**{**COMMON, **kwargs})


DEEPSEEK = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                n_group=2, topk_group=1, first_k_dense_replace=1, num_key_value_heads=4)

# family -> (config builder, the per-layer windows the runner must use)
SUPPORTED = {
    "qwen3_moe": (lambda: _config("Qwen3MoeConfig", head_dim=16, moe_intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2), [0, 0, 0]),
    "qwen3_moe_swa": (lambda: _config("Qwen3MoeConfig", head_dim=16, moe_intermediate_size=32, num_experts=4,
                                      num_experts_per_tok=2, use_sliding_window=True, sliding_window=WINDOW),
                      [WINDOW] * 3),
    "qwen2_moe": (lambda: _config("Qwen2MoeConfig", moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                  num_experts=4, num_experts_per_tok=2), [0, 0, 0]),
    # transformers makes layers 0 and 2 sliding (every other layer below max_window_layers), layer 1 full.
    "qwen2_moe_swa": (lambda: _config("Qwen2MoeConfig", moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
                      [WINDOW, 0, WINDOW]),
    "mixtral": (lambda: _config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2), [0, 0, 0]),
    "mixtral_swa": (lambda: _config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=WINDOW), [WINDOW] * 3),
    "olmoe": (lambda: _config("OlmoeConfig", num_experts=4, num_experts_per_tok=2), [0, 0, 0]),
    "phimoe": (lambda: _config("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2), [0, 0, 0]),
    "phimoe_swa": (lambda: _config("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2,
                                   sliding_window=WINDOW), [WINDOW] * 3),
    # Through its family adapter: MoE block named block_sparse_moe, embedding/residual/logit multipliers.
    "granitemoe": (lambda: _config("GraniteMoeConfig", num_local_experts=4, num_experts_per_tok=2,
                                   embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                                   attention_multiplier=0.1), [0, 0, 0]),
    # Attention sinks in prefill and decode, sliding and full layers alternating (layer_types).
    "gpt_oss": (lambda: _config("GptOssConfig", num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                sliding_window=WINDOW), [WINDOW, 0, WINDOW]),
    # Multi-head latent attention (K head 24, V head 12; the rank-32 latent is what is cached), a dense first
    # layer (first_k_dense_replace), then MoE layers with a shared expert and the sigmoid, group-limited router.
    "deepseek_v3": (lambda: _config("DeepseekV3Config", **DEEPSEEK), [0, 0, 0]),
    # The same with yarn rope scaling: the attention's scaling carries yarn's mscale, which must reach the
    # paged attention (factor 4 over 128 original positions).
    "deepseek_v3_yarn": (lambda: _config("DeepseekV3Config", **DEEPSEEK, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0,
        beta_fast=32, beta_slow=1, rope_theta=10000.0)), [0, 0, 0]),
    "glm4_moe": (lambda: _config("Glm4MoeConfig", head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
                                 num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1),
                 [0, 0, 0]),
}

# Families whose decode steps run natively (worker/native_stages.py): (attention blocks, MoE blocks); every
# other family runs its transformers modules throughout.
NATIVE = {"qwen3_moe": (True, True), "qwen3_moe_swa": (True, True), "qwen2_moe": (True, False),
          "qwen2_moe_swa": (True, False), "mixtral": (True, True), "mixtral_swa": (True, True)}

# family -> (config builder, what the refusal must say besides the family's name)
UNSUPPORTED = {
    # Multi-head latent attention in a family not checked here (DeepSeek-V3's is served).
    "deepseek_v2": (lambda: _config("DeepseekV2Config", n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, kv_lora_rank=32, q_lora_rank=48,
                                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_group=1,
                                    topk_group=1, first_k_dense_replace=1),
                    ("DeepseekV2", "multi-head latent attention", "K head 24, V head 12", "deepseek_v3")),
    "granitemoeshared": (lambda: _config("GraniteMoeSharedConfig", num_local_experts=4, num_experts_per_tok=2,
                                         shared_intermediate_size=64, embedding_multiplier=12.0,
                                         residual_multiplier=0.22, logits_scaling=8.0),
                         ("GraniteMoeShared", "residual_multiplier = 0.22", "family adapter")),
    "llama4_text": (lambda: _config("Llama4TextConfig", num_local_experts=4, num_experts_per_tok=1,
                                    intermediate_size_mlp=128, head_dim=16, attention_chunk_size=32),
                    ("Llama4Text", "chunked_attention")),
}


@pytest.fixture(scope="module")
def tokenizer():
    return ml.load_default_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """One tiny random checkpoint per family, saved once for the module."""
    made = {}

    def _get(family):
        if family not in made:
            config = SUPPORTED[family][0]()
            path = tmp_path_factory.mktemp(family)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config)
            model.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))
            made[family] = path
        return made[family]
    return _get


def _prompts(seed: int, lengths=(23, 70, 117)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 8192) for _ in range(n)] for n in lengths]


def _reference(path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' own generate() on the checkpoint, greedy, fp32, its stock sdpa attention and masks (eager
    for gpt-oss, which has no sdpa path)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                 attn_implementation=ml._reference_attention(
                                                     transformers.AutoConfig.from_pretrained(str(path)))).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def _requests(prompts, new_tokens=NEW_TOKENS, first=Priority.LATENCY_SENSITIVE):
    return [Request(f"r{i}", ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                    first if i == 0 else Priority.BEST_EFFORT, arrival_time=float(i))
            for i, ids in enumerate(prompts)]


def _run_chunked(runner, reqs, budget=24, blocks=64):
    """All requests at once under a small token budget: prefills are cut into chunks that start past 0 and
    are longer than the window, mixed in one step with other requests' decodes; block tables interleave."""
    core = EngineCore(runner, EngineConfig(max_num_batched_tokens=budget, kv_budget_tokens=blocks * BLOCK,
                                           block_size=BLOCK))
    core.run_to_completion(reqs)


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_family_engine_matches_generate(family, checkpoints, run_with_random_layer_yields):
    path = checkpoints(family)
    prompts = _prompts(seed=len(family))
    expected = _reference(path, prompts)

    loaded = ml.load_model(str(path), dtype="float32")
    runner = ModelRunner(loaded, num_blocks=64, block_size=BLOCK)
    assert runner.windows == SUPPORTED[family][1]
    if native.library() is not None:
        stages = runner.native
        assert (stages is not None and all(stages.attention),
                stages is not None and all(stages.moe)) == NATIVE.get(family, (False, False))

    reqs = _requests(prompts)
    _run_chunked(runner, reqs)
    assert [r.output_token_ids for r in reqs] == expected, "chunked prefill"

    reqs = _requests(prompts)
    core, done = run_with_random_layer_yields(runner, reqs, seed=1)
    assert sum(o.finished for o in done) == len(reqs)
    assert core.num_layer_preemptions > 0
    assert [r.output_token_ids for r in reqs] == expected, "parked at random layer boundaries"


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_is_refused_at_load(family, tmp_path, tokenizer):
    build, needles = UNSUPPORTED[family]
    config = build()
    # The refusal comes from config.json alone, before any weight is read (and before any worker starts).
    config.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError) as exc:
        ml.load_model(str(tmp_path))
    message = str(exc.value)
    assert message.startswith("model_dir:")
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("window", [0, 1, 5, 16])
@pytest.mark.parametrize("start,q_len", [(0, 1), (0, 5), (0, 40), (3, 9), (20, 1), (20, 30), (47, 17)])
def test_prefill_mask_is_transformers_mask(window, start, q_len):
    """A chunk's mask, first chunk or not, equals the rows of transformers' own causal / sliding-window mask
    function for those query positions (keys before the returned first key are all masked there)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    from worker.paged_cache import prefill_mask

    fn = sliding_window_causal_mask_function(window) if window else causal_mask_function
    kv_len = start + q_len
    zero = torch.tensor(0)
    want = fn(zero, zero, torch.arange(start, kv_len)[:, None], torch.arange(kv_len)[None, :])
    first, mask = prefill_mask(start, q_len, window, "cpu")
    got = torch.zeros(q_len, kv_len, dtype=torch.bool)
    got[:, first:] = torch.ones(q_len, q_len, dtype=torch.bool).tril() if mask is None else mask
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen2_moe_swa", "mixtral_swa", "gpt_oss"])
def test_windows_and_sinks_through_the_gathered_decode(family, checkpoints, monkeypatch):
    """The decode fallback a GPU (or a machine without a C compiler) runs honours windows and sinks too."""
    from worker import paged_decode

    monkeypatch.setattr(paged_decode, "uses_native", lambda pool: False)
    path = checkpoints(family)
    prompts = _prompts(seed=len(family) + 1, lengths=(40, 90))
    expected = _reference(path, prompts)
    runner = ModelRunner(ml.load_model(str(path), dtype="float32"), num_blocks=64, block_size=BLOCK)
    runner.native = None  # the native decode stages attend in C too
    reqs = _requests(prompts)
    _run_chunked(runner, reqs)
    assert [r.output_token_ids for r in reqs] == expected


def _run_engine(loaded, reqs, blocks, cost_model, **cfg):
    """The engine under KV pressure with a given cost model (as tests/worker/test_kv_policy_engine.py drives
    it), so the moves it forces really happen."""
    runner = ModelRunner(loaded, blocks, BLOCK)
    config = EngineConfig(policy="priority", kv_budget_tokens=blocks * BLOCK, block_size=BLOCK,
                          max_num_batched_tokens=256, admission_output_fraction=0.0, **cfg)
    core = EngineCore(runner, config, lambda outputs: None)
    core.scheduler.kv.set_cost_model(cost_model)
    core.run_to_completion(reqs)
    return core


def test_deepseek_v3_caches_the_latent_and_moves_it_between_tiers(checkpoints):
    """Multi-head latent attention caches the compressed latent, as vLLM does: per token and layer
    kv_lora_rank + qk_rope_head_dim elements (32 + 8 here), not heads x (qk_head_dim + v_head_dim) = 4 x (24 + 12)
    uncompressed. Under --kv-policy alise those pools (K and V of different head sizes) are swapped to the host
    and back into other blocks (lossless: still generate()'s tokens) and quantized to int8 and back."""
    from worker import kv_tiers

    path = checkpoints("deepseek_v3")
    loaded = ml.load_model(str(path), dtype="float32")
    runner = ModelRunner(loaded, num_blocks=8, block_size=BLOCK)
    assert [tuple(l.keys.shape) for l in runner.cache.layers] == [(8, BLOCK, 1, 32)] * 3
    assert [tuple(l.values.shape) for l in runner.cache.layers] == [(8, BLOCK, 1, 8)] * 3
    assert runner.cache.bytes == 3 * 8 * BLOCK * (32 + 8) * 4

    rng = random.Random(7)
    prompts = [[rng.randrange(3, 8192) for _ in range(rng.randint(40, 120))] for _ in range(8)]
    expected = _reference(path, prompts, new_tokens=16)
    # The pools' real sizes (3 layers x (32 + 8) fp32, or int8 + two scales), recompute made expensive.
    forced = dict(block_bytes=BLOCK * 480, int8_block_bytes=BLOCK * 144, prefill_s_per_token=1.0,
                  decode_step_s=0.01, swap_out_bytes_per_s=1e9, swap_in_bytes_per_s=1e9,
                  quantize_bytes_per_s=1e9, dequantize_bytes_per_s=1e9)

    reqs = _requests(prompts, 16, first=Priority.BEST_EFFORT)
    core = _run_engine(loaded, reqs, 24, kv_tiers.CostModel(**forced), kv_policy="alise", kv_int8="off")
    assert core.kv_store.block_bytes == 3 * BLOCK * (32 + 8) * 4
    assert {"swap_out", "swap_in"} <= set(core.scheduler.kv.move_counts)
    assert core.kv_store.host.used_bytes == 0
    assert [r.output_token_ids for r in reqs] == expected, "swapped to the host and back"

    reqs = _requests(prompts, 16, first=Priority.BEST_EFFORT)
    core = _run_engine(loaded, reqs, 24, kv_tiers.CostModel(**forced), kv_policy="alise", kv_int8="be",
                       kv_host_budget_tokens=0)
    counts = core.scheduler.kv.move_counts
    assert counts.get("quantize", 0) >= 1 and counts["quantize"] == counts["dequantize"]
    assert core.kv_store.int8 == {} and core.kv_store.int8_bytes == 0
    out = [r.output_token_ids for r in reqs]
    assert all(len(o) == 16 and o[0] == e[0] for o, e in zip(out, expected))  # lossy past a preemption
