import pytest

from bench.tokens import EMBEDDED_TOKENIZER, WordTokenizer, load_tokenizer
from bench.workload import (BE, LS, ClassSpec, WorkloadConfig, build_workload, data_dir, load_trace,
                            scale_length)


def _cfg(root, seed=0, duration=20.0, context=4096, ls_rate=2.0, be_rate=1.0, **kw):
    return WorkloadConfig(
        [ClassSpec(LS, "azure-conv", ls_rate, (32, 128), (16, 64)),
         ClassSpec(BE, "mooncake-conv", be_rate, (512, 2048), (128, 512))],
        duration_s=duration, seed=seed, context_tokens=context, data_root=str(root), **kw)


def test_deterministic_for_a_seed(tiny_data, tiny_tokenizer):
    a = build_workload(_cfg(tiny_data, seed=3), tiny_tokenizer)
    b = build_workload(_cfg(tiny_data, seed=3), tiny_tokenizer)
    c = build_workload(_cfg(tiny_data, seed=4), tiny_tokenizer)
    assert [r.to_dict(with_prompt=True) for r in a.requests] == [r.to_dict(with_prompt=True) for r in b.requests]
    assert a.info == b.info
    assert [r.to_dict(with_prompt=True) for r in a.requests] != [r.to_dict(with_prompt=True) for r in c.requests]


def test_lengths_arrivals_and_token_counts(tiny_data, tiny_tokenizer):
    w = build_workload(_cfg(tiny_data), tiny_tokenizer)
    assert w.requests == sorted(w.requests, key=lambda r: r.arrival_s)
    assert [r.index for r in w.requests] == list(range(len(w.requests)))
    for r in w.requests:
        assert 0 <= r.arrival_s < 20.0
        lo_p, hi_p, lo_o, hi_o = (32, 128, 16, 64) if r.cls == LS else (512, 2048, 128, 512)
        assert lo_o <= r.max_tokens <= hi_o
        # the prompt is cut or extended to the target; only a split multi-byte character may move the count
        assert r.prompt_tokens == len(tiny_tokenizer.encode(r.prompt))
        assert lo_p - 2 <= r.prompt_tokens <= hi_p
        assert r.prompt_tokens + r.max_tokens <= 4096
    for cls, rate in ((LS, 2.0), (BE, 1.0)):
        info = w.info["classes"][cls]
        assert info["count"] == len(w.of_class(cls)) > 0
        assert 0.3 * rate < info["realized_rate"] < 3 * rate  # the trace's burstiness, around the target mean


def test_respects_context_limit(tiny_data, tiny_tokenizer):
    cfg = WorkloadConfig([ClassSpec(BE, "mooncake-conv", 2.0, (300, 900), (200, 700))], duration_s=15.0,
                         context_tokens=1000, data_root=str(tiny_data))
    w = build_workload(cfg, tiny_tokenizer)
    assert w.requests
    assert all(r.prompt_tokens + r.max_tokens <= 1000 for r in w.requests)
    assert any(r.max_tokens > 100 for r in w.requests)
    with pytest.raises(ValueError, match="exceeds the context"):
        build_workload(WorkloadConfig([ClassSpec(BE, "mooncake-conv", 1.0, (900, 900), (200, 200))], 5.0,
                                      context_tokens=1000, data_root=str(tiny_data)), tiny_tokenizer)


def test_rate_and_time_scale(tiny_data, tiny_tokenizer):
    slow = build_workload(_cfg(tiny_data, ls_rate=1.0, be_rate=0.0, duration=60), tiny_tokenizer)
    fast = build_workload(_cfg(tiny_data, ls_rate=4.0, be_rate=0.0, duration=60), tiny_tokenizer)
    assert not slow.of_class(BE) and BE not in slow.info["classes"]
    assert len(fast.requests) > 2.5 * len(slow.requests)
    trace = load_trace("azure-conv", str(tiny_data))
    scaled = build_workload(_cfg(tiny_data, duration=10, time_scale=0.5), tiny_tokenizer)
    assert scaled.info["classes"][LS]["time_multiplier"] == 0.5
    # half-time replay of a ~5 req/s trace: ~10 req/s
    assert 5 < scaled.info["classes"][LS]["realized_rate"] < 20
    assert trace.mean_rate == pytest.approx(5, rel=0.3)


def test_scale_length_clips():
    assert scale_length(1000, 0.1, 32, 128) == 100
    assert scale_length(10, 0.1, 32, 128) == 32
    assert scale_length(10_000, 0.1, 32, 128) == 128


def test_unknown_trace_is_a_clear_error(tiny_data, tiny_tokenizer):
    cfg = WorkloadConfig([ClassSpec(LS, "nope", 1.0, (32, 64), (16, 32))], 5.0, data_root=str(tiny_data))
    with pytest.raises(ValueError, match="known: azure-code"):
        build_workload(cfg, tiny_tokenizer)


def test_word_tokenizer_fallback(tiny_data):
    w = build_workload(_cfg(tiny_data, duration=5), WordTokenizer())
    assert w.info["tokenizer"] == "approx-words"
    assert all(len(r.prompt.split()) == r.prompt_tokens for r in w.requests)


@pytest.mark.skipif(not (data_dir() / "traces" / "azure_llm_2023_conv.csv").is_file(),
                    reason="shared data not present")
def test_real_traces_default_mix():
    """The default mixed workload on the real traces: lengths in range, fits the embedded model's context."""
    tok = load_tokenizer()
    if not EMBEDDED_TOKENIZER.is_file():
        pytest.skip("embedded tokenizer not built yet")
    w = build_workload(WorkloadConfig(
        [ClassSpec(LS, "azure-conv", 1.0, (32, 128), (16, 64)),
         ClassSpec(BE, "mooncake-conv", 2.0, (512, 2048), (128, 512))], duration_s=20.0, seed=0), tok)
    assert w.of_class(LS) and w.of_class(BE)
    assert all(r.prompt_tokens + r.max_tokens <= 4096 for r in w.requests)
    assert all(r.prompt_tokens == len(tok.encode(r.prompt)) for r in w.requests[:20])
