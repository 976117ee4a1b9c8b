"""worker.model_loader: the embedded default (config, tokenizer, fixed-seed weights), export, and loading
checkpoint directories of the four MoE families the worker runs. CPU only, tiny models, a few seconds."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402

from worker import model_loader as ml  # noqa: E402

torch.set_num_threads(1)

TEXT = "Summarize the main ideas of Jeff Walker's Product Launch Formula, in 3 bullet points: ünïcödé 你好 🙂\n\tok"


@pytest.fixture(scope="module")
def default_model():
    return ml.build_default_model()


@pytest.fixture(scope="module")
def tokenizer():
    return ml.load_default_tokenizer()


def _ids(tok, text=TEXT):
    return torch.tensor([tok.encode(text)])


# ------------------------------------------------------------------------------------------ embedded default


def test_default_config_matches_contract():
    cfg = ml.default_config()
    assert cfg.model_type == "qwen3_moe"
    assert cfg.architectures == ["Qwen3MoeForCausalLM"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (256, 8, 8, 2)
    assert (cfg.moe_intermediate_size, cfg.intermediate_size, cfg.vocab_size) == (512, 512, 8192)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 64)
    assert cfg.max_position_embeddings == 4096
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert cfg.norm_topk_prob is True and cfg.tie_word_embeddings is False and cfg.mlp_only_layers == []
    assert cfg.sliding_window is None
    assert ml.layer_attention_types(cfg) == ["full_attention"] * 8


def test_tokenizer_vocab_special_tokens_and_round_trip(tokenizer):
    cfg = ml.default_config()
    assert len(tokenizer) == 8192
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == cfg.eos_token_id == cfg.pad_token_id == cfg.bos_token_id == 0
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    for text in (TEXT, "", " leading and trailing  ", "x = {'a': [1, 2]}\n\n\n#!"):
        ids = tokenizer.encode(text)
        assert all(0 <= i < 8192 for i in ids)
        assert tokenizer.decode(ids) == text
    # BPE actually merged: English compresses well below one token per byte.
    assert len(tokenizer.encode(TEXT)) < len(TEXT.encode()) / 2
    # Special tokens are single ids, and no BOS is prepended.
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shipped_tokenizer_is_small():
    assert (ml.EMBEDDED_DIR / "tokenizer.json").stat().st_size < 1_000_000


def test_default_model_is_deterministic_and_leaves_global_rng_alone(default_model):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    again = ml.build_default_model()
    assert torch.equal(torch.get_rng_state(), before)
    sd_a, sd_b = default_model.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    assert not again.training
    assert not any(p.requires_grad for p in again.parameters())
    assert all(p.dtype == torch.float32 for p in again.parameters())


def test_default_model_layout_and_logits(default_model, tokenizer):
    m = default_model
    for attr in ("embed_tokens", "layers", "rotary_emb", "norm"):
        assert hasattr(m.model, attr)
    assert len(m.model.layers) == 8 and m.lm_head.out_features == 8192
    logits = m(_ids(tokenizer)).logits
    assert logits.shape[-1] == 8192 and torch.isfinite(logits).all()


def test_bfloat16_build_is_the_float32_build_rounded(default_model):
    bf = ml.build_default_model("bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    w32 = default_model.model.layers[3].self_attn.q_proj.weight
    assert torch.equal(bf.model.layers[3].self_attn.q_proj.weight, w32.to(torch.bfloat16))
    # Like from_pretrained(dtype=...): the rotary inv_freq buffer stays float32.
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32


def test_load_model_default(tokenizer):
    lm = ml.load_model(None)
    assert lm.name == "qllm-embedded-qwen3moe"
    assert lm.max_context == 4096
    assert lm.eos_token_ids == [0]
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.tokenizer.eos_token_id == 0
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


# ------------------------------------------------------------------------------------------ export


def test_export_then_from_pretrained_gives_identical_logits(tmp_path, default_model, tokenizer):
    out = tmp_path / "export"
    ml.export_default(str(out))
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    # Both the transformers-5 names and the legacy ones engines pinned to transformers 4.x read.
    assert saved["num_experts"] == saved["num_local_experts"] == 8
    assert saved["rope_theta"] == 1_000_000.0 and saved["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = _ids(tokenizer)
    assert tok.encode(TEXT) == ids[0].tolist()
    assert tok.eos_token_id == 0
    # The ChatML template travels with the tokenizer: other engines render a chat (`messages`) as qllm does.
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, default_model(ids).logits)

    lm = ml.load_model(str(out))
    assert lm.name == "export" and lm.eos_token_ids == [0] and lm.max_context == 4096
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, default_model(ids).logits)


def test_export_cli(tmp_path):
    from qllm import cli

    assert cli.main(["export-model", str(tmp_path / "x"), "--dtype", "bfloat16"]) == 0
    saved = json.loads((tmp_path / "x" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" == saved["torch_dtype"]
    lm = ml.load_model(str(tmp_path / "x"), dtype="bfloat16")
    assert lm.model.lm_head.weight.dtype == torch.bfloat16
    # The exported bfloat16 checkpoint is the in-memory bfloat16 default, bit for bit.
    bf = ml.build_default_model("bfloat16")
    ids = _ids(lm.tokenizer)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, bf(ids).logits)


# ------------------------------------------------------------------------------------------ other families

COMMON = dict(
    vocab_size=8192,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

FAMILIES = {
    # Sliding window on layer 0 only (max_window_layers=1): exercises per-layer masks.
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
    ),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
}


def _save_checkpoint(path, config, tokenizer, generation_config=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def _layer_by_layer_logits(model, input_ids):
    """What the engine does: embed, each decoder layer called with keyword arguments, norm, lm_head."""
    base = model.model
    hidden = base.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    kwargs = dict(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    kinds = ml.layer_attention_types(model.config)
    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: makers[kind](**kwargs) for kind in set(kinds)}  # once per step, before layer 0
    pos_emb = base.rotary_emb(hidden, position_ids)
    for layer, kind in zip(base.layers, kinds, strict=True):
        hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, cache=None, use_cache=False,
                       position_embeddings=pos_emb)
    return model.lm_head(base.norm(hidden))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_load_and_run(tmp_path, tokenizer, family):
    config = FAMILIES[family]()
    gen = GenerationConfig(bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0)
    path = tmp_path / f"tiny-{family}"
    reference = _save_checkpoint(path, config, tokenizer, gen).eval()

    lm = ml.load_model(str(path))
    assert lm.name == f"tiny-{family}"
    assert lm.model.config.model_type == family
    assert lm.max_context == 512
    assert lm.eos_token_ids == [2, 0]
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    ids = _ids(lm.tokenizer)
    assert ids.shape[1] > 4  # longer than the qwen2_moe sliding window
    with torch.no_grad():
        logits = lm.model(ids).logits
        assert logits.shape == (1, ids.shape[1], 8192) and torch.isfinite(logits).all()
        assert torch.equal(logits, reference(ids).logits)
        torch.testing.assert_close(_layer_by_layer_logits(lm.model, ids), logits, rtol=0, atol=1e-5)
    if family == "qwen2_moe":
        assert ml.layer_attention_types(lm.model.config) == ["sliding_attention", "full_attention"]

    half = ml.load_model(str(path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.model.lm_head.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ errors


def test_missing_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ml.load_model(str(tmp_path / "nope"))


def test_dir_without_config_raises(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="no config.json"):
        ml.load_model(str(tmp_path))


def test_file_instead_of_dir_raises(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="not a directory"):
        ml.load_model(str(f))


@pytest.mark.parametrize(
    "content",
    ["this is not json {", json.dumps({"model_type": "no-such-architecture"}), json.dumps({"hello": "world"})],
    ids=["bad-json", "unknown-model-type", "no-model-type"],
)
def test_garbage_config_raises(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match="model_dir"):
        ml.load_model(str(tmp_path))


def test_non_decoder_layout_raises(tmp_path, tokenizer):
    # GPT-2 is a causal LM but has no model.layers of input_layernorm/self_attn/post_attention_layernorm/mlp.
    _save_checkpoint(tmp_path, GPT2Config(vocab_size=8192, n_embd=32, n_layer=1, n_head=2, n_positions=64), tokenizer)
    with pytest.raises(ValueError, match="layer by layer"):
        ml.load_model(str(tmp_path))


def test_encoder_model_raises(tmp_path):
    bert = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(bert))
    with pytest.raises(ValueError, match="model_dir"):
        ml.load_model(str(tmp_path))


def test_bad_dtype_and_device_raise():
    with pytest.raises(ValueError, match="dtype"):
        ml.load_model(None, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        ml.load_model(None, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ml.load_model(None, device="cuda")
    assert ml.parse_dtype(torch.float16) == torch.float16 and ml.parse_dtype("bf16") == torch.bfloat16


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from worker import model_loader

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(model_loader, "cpu_has_native_bf16", lambda: False)
    assert model_loader.resolve_dtype("auto", cpu) == torch.float32
    assert model_loader.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(model_loader, "cpu_has_native_bf16", lambda: True)
    assert model_loader.resolve_dtype("AUTO", cpu) == torch.bfloat16
    assert model_loader.resolve_dtype("float32", cpu) == torch.float32  # an explicit dtype always wins
    with pytest.raises(ValueError, match="dtype"):
        model_loader.resolve_dtype("int4", cpu)
