"""Load the model a worker serves: a local Hugging Face MoE checkpoint directory, or the embedded default.

The embedded default is a small Qwen3-MoE (worker/embedded/config.json) with fixed-seed random weights and a
byte-level BPE tokenizer trained by scripts/build_tokenizer.py (worker/embedded/tokenizer.json). Nothing is
ever downloaded: every Hugging Face call here is local_files_only.

The engine (worker/model_runner.py) runs the decoder layer by layer, so a checkpoint is accepted only when its
causal-LM class has the Llama-style layout the engine calls into:

    model.model.embed_tokens, model.model.layers[i], model.model.rotary_emb, model.model.norm, model.lm_head
    layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, layer.mlp

Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, PhiMoE and GLM-4.5 have it in transformers 5.24; GraniteMoE differs
only in naming and scalings, gpt-oss in its MoE block's return value, which their FamilyAdapters state. Call
decoder layers with keyword arguments only: Mixtral's layer takes `position_embeddings` second, the others
take it last. Use `layer_attention_types(config)` / `layer_windows(config)` to know which mask (full or
sliding-window, and its window) each layer expects. Families with attention the paged path cannot run exactly
(chunked attention; multi-head latent attention other than DeepSeek-V3's) are refused at load with the reason;
gpt-oss's attention sinks and DeepSeek-V3's multi-head latent attention (its compressed latent cached, K and V
of different head sizes) are run (worker/paged_cache.py). DeepSeek-V3's dense first layers and its MoE layers
(sigmoid, group-limited router, shared experts) are both its layer's `mlp`, which the runner calls as is.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEFAULT_NAME = "qllm-embedded-qwen3moe"
DEFAULT_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ATTN_IMPLEMENTATION = "sdpa"  # fixed so the engine's masks match on every machine

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}

_MODEL_ATTRS = ("embed_tokens", "layers", "rotary_emb", "norm")
_LAYER_ATTRS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel  # eval mode, on device, weights in dtype, requires_grad off
    tokenizer: PreTrainedTokenizerFast
    name: str  # DEFAULT_NAME for the embedded default, else the directory's name
    max_context: int  # config.max_position_embeddings
    eos_token_ids: list[int]  # from generation_config, else config, else tokenizer; may be several
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------- argument parsing


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or the matching torch.dtype) -> torch.dtype; else ValueError."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"dtype: unsupported value {dtype!r}; use one of float32, float16, bfloat16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slower
    than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' picks what the hardware runs fastest: bfloat16 on a GPU and on CPUs with native bf16, float32
    elsewhere; any other value is parse_dtype's."""
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return parse_dtype(dtype)


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' -> torch.device; ValueError when CUDA is asked for but unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: cannot parse {device!r}; use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    raise ValueError(f"device: unsupported device type {dev.type!r}; use 'cpu' or 'cuda[:N]'")


# --------------------------------------------------------------------------------------------- embedded default


def default_config() -> transformers.PretrainedConfig:
    """The embedded default's config (worker/embedded/config.json), a Qwen3MoeConfig."""
    return AutoConfig.from_pretrained(str(EMBEDDED_DIR), local_files_only=True)


def load_default_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded byte-level BPE tokenizer: 8192 tokens, <|endoftext|> (eos = pad) is id 0."""
    return PreTrainedTokenizerFast.from_pretrained(str(EMBEDDED_DIR), local_files_only=True)


def build_default_model(dtype: str | torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """The embedded default with fixed-seed random weights, in eval mode, on CPU, requires_grad off.

    Weights are drawn in float32 under torch.manual_seed(DEFAULT_SEED) inside a forked RNG (the caller's global
    RNG state is left untouched) and then cast, so every call on a machine gives the same weights and a
    bfloat16/float16 build is exactly the float32 build rounded.
    """
    dt = parse_dtype(dtype)
    config = default_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
        )
    model.generation_config = default_generation_config(config)
    if dt != torch.float32:
        _cast_parameters(model, dt)
    return _freeze(model)


def _cast_parameters(model: transformers.PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast the weights only. Buffers keep their dtype: the rotary inv_freq must stay float32, exactly as
    from_pretrained(dtype=...) leaves it (model.to(dtype) would round it to bfloat16 and shift every angle)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    model.config.dtype = dtype


def default_generation_config(config: transformers.PretrainedConfig | None = None) -> GenerationConfig:
    config = config or default_config()
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _freeze(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- loading


def load_model(
    model_dir: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """Load the model a worker serves. model_dir None => the embedded default; else a local HF checkpoint dir.

    Raises ValueError (with the reason) for a bad dtype or device, a missing directory, a directory without a
    readable config.json, an architecture that is not a decoder-only causal LM with the layer layout the
    engine runs (see the module docstring), or weights/tokenizer that fail to load.
    """
    dev = parse_device(device)
    dt = resolve_dtype(dtype, dev)

    if model_dir is None:
        model = build_default_model(dt).to(dev)
        tokenizer = load_default_tokenizer()
        name = DEFAULT_NAME
    else:
        path = Path(model_dir).expanduser()
        config = _load_config(path)
        _check_architecture(config, path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                config=config,
                dtype=dt,
                local_files_only=True,
                attn_implementation=_reference_attention(config),
            )
        except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
            raise ValueError(f"model_dir: cannot load weights from {str(path)!r}: {exc}") from exc
        model = _freeze(model.to(dev))  # from_pretrained already cast the weights (buffers stay float32)
        _check_layout(model, path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"model_dir: cannot load a tokenizer from {str(path)!r}: {exc}") from exc
        name = path.resolve().name

    eos_ids = _eos_token_ids(model, tokenizer)
    if tokenizer.pad_token_id is None and eos_ids:
        # The engine pads batches itself; a pad token only keeps tokenizer batch calls working.
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_ids[0])
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        max_context=_max_context(model.config, tokenizer),
        eos_token_ids=eos_ids,
        device=dev,
        dtype=dt,
    )


def _load_config(path: Path) -> transformers.PretrainedConfig:
    if not path.exists():
        raise ValueError(f"model_dir: {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"model_dir: {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model_dir: {str(path)!r} has no config.json (not a Hugging Face checkpoint directory)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model_dir: cannot read {str(path / 'config.json')!r}: {exc}") from exc


def _check_architecture(config: transformers.PretrainedConfig, path: Path) -> None:
    """Reject, before any weight is read, what the layer-by-layer engine cannot run."""
    model_type = getattr(config, "model_type", None) or "?"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model_dir: {str(path)!r} holds an encoder-decoder model ({model_type}); need a decoder-only causal LM")
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model_dir: {str(path)!r} holds a {model_type!r} model, which is not a causal LM")
    reasons = _unsupported_features(config)
    if reasons:
        raise ValueError(f"model_dir: {str(path)!r} holds a {_family(config)} model, which the worker cannot serve "
                         f"exactly yet: it {'; it '.join(reasons)}")
    # Instantiate on the meta device (no memory, no weights) just to inspect the module layout.
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any construction failure means we cannot run it
        raise ValueError(f"model_dir: cannot build a {model_type!r} causal LM from {str(path)!r}: {exc}") from exc
    _check_layout(skeleton, path)
    _check_attention_modules(skeleton, path)


@dataclass(frozen=True)
class FamilyAdapter:
    """How the runner calls one family's decoder where it differs from the Llama-style layout: the name of the
    layer's MoE/MLP block, and the scalings the family's own forward applies around the decoder layers."""

    moe_attr: str = "mlp"
    moe_returns_tuple: bool = False     # the block returns (hidden, router scores) (gpt-oss)
    embedding_multiplier: float = 1.0   # embeddings *= this before layer 0
    residual_multiplier: float = 1.0    # each block's output *= this before it joins the residual stream
    logits_scaling: float = 1.0         # logits /= this


# One small adapter per family that needs one (model_type -> adapter from its config); every other family
# gets the default.
ADAPTERS = {
    "granitemoe": lambda c: FamilyAdapter("block_sparse_moe", embedding_multiplier=float(c.embedding_multiplier),
                                          residual_multiplier=float(c.residual_multiplier),
                                          logits_scaling=float(c.logits_scaling)),
    "gpt_oss": lambda c: FamilyAdapter(moe_returns_tuple=True),
}


def family_adapter(config: transformers.PretrainedConfig) -> FamilyAdapter:
    make = ADAPTERS.get(getattr(config, "model_type", None))
    return make(config) if make is not None else FamilyAdapter()


def _reference_attention(config: transformers.PretrainedConfig) -> str:
    """sdpa, or eager for a family whose transformers class has no sdpa path (gpt-oss: sinks). The engine
    replaces it with the paged attention; this is what the model's own forward uses."""
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return ATTN_IMPLEMENTATION if getattr(cls, "_supports_sdpa", True) else "eager"


def _family(config: transformers.PretrainedConfig) -> str:
    """The family's name as transformers spells its config class: DeepseekV3, GptOss, Llama4Text, ..."""
    return type(config).__name__.removesuffix("Config")


# Families with multi-head latent attention the paged path runs (worker/paged_cache.py caches the latent that
# their attention module hands to cache.update; tests/worker/test_families.py checks each against generate()).
# Another family with kv_lora_rank is refused until it is checked the same way.
LATENT_ATTENTION_FAMILIES = ("deepseek_v3",)


# Per-family features the engine does not run yet, each found from the config alone (before any weight is
# read): a checkpoint of such a family is refused at load, never served with wrong tokens.
def _unsupported_features(config: transformers.PretrainedConfig) -> list[str]:
    reasons = []
    rank = getattr(config, "kv_lora_rank", None)
    if rank and getattr(config, "model_type", None) not in LATENT_ATTENTION_FAMILIES:
        k_head = (getattr(config, "qk_nope_head_dim", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
        v_head = getattr(config, "v_head_dim", None)
        reasons.append(
            f"uses multi-head latent attention (K head {k_head}, V head {v_head}, KV compressed to rank {rank}), "
            f"which the worker serves only for the families it is verified on ({', '.join(LATENT_ATTENTION_FAMILIES)}"
            "): this family's attention module may differ (sparse indexers, another cache layout)")
    known = {"full_attention", "sliding_attention"}
    layer_types = list(getattr(config, "layer_types", None) or [])
    for kind in dict.fromkeys(t for t in layer_types if t not in known):
        detail = ""
        if kind == "chunked_attention" and getattr(config, "attention_chunk_size", None):
            detail = f" (attention_chunk_size {config.attention_chunk_size})"
        reasons.append(f"declares {kind} layers{detail}, which the paged attention does not support yet (it runs "
                       "full and sliding-window causal attention)")
    # Scalings the model's own forward applies around the decoder layers: the runner applies them only through
    # a family adapter; without one, serving would give silently wrong tokens.
    scales = [f"{name} = {value}" for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
              if isinstance(value := getattr(config, name, None), (int, float)) and value != 1]
    if scales and getattr(config, "model_type", None) not in ADAPTERS:
        reasons.append(f"scales by {', '.join(scales)}, which the layer-by-layer runner applies only through a "
                       f"family adapter ({', '.join(sorted(ADAPTERS))}), and there is none for this family yet")
    return reasons


def _check_attention_modules(model: torch.nn.Module, path: Path | str) -> None:
    """Attention the paged path cannot run exactly: K/V projections whose shape is not the pools'
    num_key_value_heads x head_dim. (Per-head sinks, gpt-oss, are run: worker/paged_cache.py.)"""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_width = getattr(config, "num_key_value_heads", None) or heads
    kv_width *= head_dim
    latent_attrs = ("expand_kv", "kv_b_proj", "layer_idx", "qk_nope_head_dim", "v_head_dim")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if getattr(config, "kv_lora_rank", None):  # latent attention: what worker/paged_cache.py calls on it
            lacking = [a for a in latent_attrs if not hasattr(attn, a)]
            if lacking:
                raise ValueError(
                    f"model_dir: {str(path)!r} holds a {_family(config)} model, whose decoder layer {i} "
                    f"attention ({type(attn).__name__}) lacks {', '.join(lacking)}, which the paged multi-head "
                    "latent attention calls")
            continue
        for name in ("k_proj", "v_proj"):
            proj = getattr(attn, name, None)
            out = getattr(proj, "out_features", None)
            if out is not None and out != kv_width:
                raise ValueError(
                    f"model_dir: {str(path)!r} holds a {_family(config)} model, whose decoder layer {i} projects "
                    f"{name} to {out} features, not num_key_value_heads x head_dim = {kv_width}, which the paged "
                    "KV pools hold")


def _check_layout(model: torch.nn.Module, path: Path | str) -> None:
    kind = type(model).__name__
    base = getattr(model, "model", None)
    missing = [] if base is not None else ["model"]
    if base is not None:
        missing += [f"model.{a}" for a in _MODEL_ATTRS if getattr(base, a, None) is None]
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        missing.append("lm_head")
    if missing:
        raise ValueError(
            f"model_dir: {str(path)!r} holds {kind}, which lacks {', '.join(missing)}; the worker runs "
            "decoder-only causal LMs layer by layer (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, ...)"
        )
    layers = base.layers
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model_dir: {str(path)!r} holds {kind}, whose model.layers is not a non-empty ModuleList")
    moe_attr = family_adapter(model.config).moe_attr if hasattr(model, "config") else "mlp"
    wanted = tuple(moe_attr if a == "mlp" else a for a in _LAYER_ATTRS)
    for i, layer in enumerate(layers):
        lacking = [a for a in wanted if getattr(layer, a, None) is None]
        if "mlp" in lacking:
            other = next((a for a in ("block_sparse_moe", "feed_forward", "moe") if hasattr(layer, a)), None)
            if other is not None:
                raise ValueError(
                    f"model_dir: {str(path)!r} holds {kind}, whose decoder layer {i} names its MoE/MLP block "
                    f"{other!r}; the worker calls layer.mlp and has no adapter for this family yet")
        if lacking:
            raise ValueError(
                f"model_dir: {str(path)!r} holds {kind}, whose decoder layer {i} ({type(layer).__name__}) lacks "
                f"{', '.join(lacking)}; the worker needs input_layernorm/self_attn/post_attention_layernorm/mlp"
            )
        params = inspect.signature(layer.forward).parameters
        if "position_embeddings" not in params or not ({"cache", "past_key_values"} & params.keys()):
            raise ValueError(
                f"model_dir: {str(path)!r} holds {kind}, whose decoder layer {i} ({type(layer).__name__}) does not "
                "take position_embeddings and a cache; the worker cannot run it layer by layer"
            )


def _eos_token_ids(model: transformers.PreTrainedModel, tokenizer) -> list[int]:
    candidates = []
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        candidates.append(getattr(gen, "eos_token_id", None))
    candidates.append(getattr(model.config, "eos_token_id", None))
    candidates.append(getattr(tokenizer, "eos_token_id", None))
    for value in candidates:
        ids = _as_id_list(value)
        if ids:
            return ids
    return []


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    out: list[int] = []
    for v in value:
        if isinstance(v, int) and v not in out:
            out.append(v)
    return out


def _max_context(config: transformers.PretrainedConfig, tokenizer) -> int:
    value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    fallback = getattr(tokenizer, "model_max_length", None)
    if isinstance(fallback, int) and 0 < fallback < 10_000_000:
        return fallback
    raise ValueError("model_dir: the config has no max_position_embeddings and the tokenizer no model_max_length")


def layer_attention_types(config: transformers.PretrainedConfig) -> list[str]:
    """Per decoder layer, 'full_attention' or 'sliding_attention': which causal mask that layer takes.

    Mirrors the model classes' own forward in transformers 5.24: Qwen2-MoE picks per layer from
    config.layer_types; Mixtral and Qwen3-MoE use one sliding-window mask for all layers when
    config.sliding_window is set (Qwen3-MoE clears it unless use_sliding_window); OLMoE is always full.
    """
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types[:n])
    if getattr(config, "model_type", None) != "olmoe" and getattr(config, "sliding_window", None):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def layer_windows(config: transformers.PretrainedConfig) -> list[int]:
    """Per decoder layer, its sliding window W, or 0 for full causal attention.

    transformers' sliding-window mask (masking_utils.sliding_window_overlay) lets a query at position q see
    the keys at positions q - W < k <= q: the last W positions, its own included.
    """
    window = getattr(config, "sliding_window", None) or 0
    return [window if kind == "sliding_attention" else 0 for kind in layer_attention_types(config)]


# --------------------------------------------------------------------------------------------- export


# Keys that transformers 5 renames or folds on save but that engines built on transformers 4.x (and some
# converters) still read; written alongside the new ones so the exported directory loads everywhere.
def _legacy_config_keys(config: transformers.PretrainedConfig, dtype: torch.dtype) -> dict:
    extra: dict = {"torch_dtype": DTYPE_NAMES[dtype]}
    num_experts = getattr(config, "num_experts", None)
    if isinstance(num_experts, int):
        extra["num_experts"] = num_experts
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "rope_theta" in rope:
        extra["rope_theta"] = rope["rope_theta"]
    return extra


def export_default(out_dir: str | os.PathLike, dtype: str | torch.dtype = "float32") -> None:
    """Write the embedded default as a standard HF checkpoint directory.

    config.json, model.safetensors (per-expert tensor names, the original Qwen3-MoE layout),
    generation_config.json and the tokenizer files (tokenizer.json, tokenizer_config.json, ...): loadable with
    AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained, and by other engines as-is.
    """
    dt = parse_dtype(dtype)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    model = build_default_model(dt)
    model.save_pretrained(str(out), safe_serialization=True)

    config_path = out / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    for key, value in _legacy_config_keys(model.config, dt).items():
        saved.setdefault(key, value)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # The shipped tokenizer files, byte for byte. tokenizer.save_pretrained in transformers 5 would write
    # tokenizer_class "TokenizersBackend" and a list-valued extra_special_tokens, which transformers 4.x (and
    # engines pinned to it) cannot read; PreTrainedTokenizerFast + additional_special_tokens load in both.
    for name in TOKENIZER_FILES:
        shutil.copyfile(EMBEDDED_DIR / name, out / name)

    # safetensors writes through a private temp file (mode 0600); give the checkpoint ordinary permissions.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES):
        if (out / name).is_file():
            os.chmod(out / name, 0o666 & ~umask)
