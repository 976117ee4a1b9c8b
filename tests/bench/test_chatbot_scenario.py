"""The `chatbot` scenario (BE only, held-out ShareGPT prompts with their real response lengths) and the BE-order
bench policies. No model: a tiny shared-data folder, the fixture tokenizer, the fake router."""

import json
import random
import shutil

import pytest

import bench.cli as bench_cli
from bench import policies, report, runner
from bench.scenarios import SCENARIOS
from bench.stats import RequestRecord, summarize
from bench.workload import BE, ChatbotConfig, build_chatbot_workload, held_out_prompts, response_tokens
from predictor.data import data_dir as predictor_data_dir
from predictor.data import load_sharegpt, load_split, normalise, split
from qllm.cli import build_parser
from qllm.up import StackConfig

WORDS = "please explain how a scheduler orders short and long jobs in a queue of chat requests today".split()


@pytest.fixture(scope="module")
def chat_data(tiny_data, tmp_path_factory):
    """tiny_data's traces + a ShareGPT-like file with real-looking response lengths, some long prompts and
    duplicate prompts (the split dedupes them)."""
    root = tmp_path_factory.mktemp("chat_data")
    shutil.copytree(tiny_data / "traces", root / "traces")
    (root / "prompts").mkdir()
    rng = random.Random(3)
    with open(root / "prompts" / "sharegpt_v3_first_turn_pairs.jsonl", "w") as f:
        for i in range(200):
            n = rng.choice([2, 5, 12, 40, 150, 400])
            prompt = f"q{i} " + " ".join(rng.choice(WORDS) for _ in range(n))
            words = rng.randint(1, 700)
            f.write(json.dumps({"id": f"c{i}_0", "prompt": prompt, "response_words": words}) + "\n")
            if i % 25 == 0:  # a duplicate (different case and spacing): one example with the median length
                f.write(json.dumps({"id": f"c{i}_1", "prompt": "  " + prompt.upper(), "response_words": 3}) + "\n")
    return root


def _cfg(root, **kw):
    base = dict(duration_s=60.0, rate=2.0, seed=0, max_prompt_tokens=64, context_tokens=4096, data_root=str(root))
    base.update(kw)
    return ChatbotConfig(**base)


def _source(req, test):
    """The held-out example a request's prompt came from (whole, or cut from its head)."""
    whole = [e for e in test if e.prompt == req.prompt]
    if whole:
        return whole[0]
    cut = [e for e in test if e.prompt.startswith(req.prompt)]
    assert len(cut) == 1 and req.prompt_tokens < req.trace_input_tokens, req.prompt[:60]
    return cut[0]


def test_deterministic_for_a_seed(chat_data, tiny_tokenizer):
    a = build_chatbot_workload(_cfg(chat_data), tiny_tokenizer)
    b = build_chatbot_workload(_cfg(chat_data), tiny_tokenizer)
    assert [r.to_dict(with_prompt=True) for r in a.requests] == [r.to_dict(with_prompt=True) for r in b.requests]
    assert a.info == b.info
    c = build_chatbot_workload(_cfg(chat_data, seed=1), tiny_tokenizer)
    assert [r.prompt for r in c.requests] != [r.prompt for r in a.requests]
    assert len(a.requests) > 50 and {r.cls for r in a.requests} == {BE}
    assert [r.index for r in a.requests] == list(range(len(a.requests)))
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a.requests, a.requests[1:]))
    assert a.info["classes"][BE]["realized_rate"] == pytest.approx(2.0, rel=0.35)
    # more requests than held-out prompts: every prompt is used before any repeats
    pool = len(held_out_prompts(str(chat_data)))
    assert a.info["classes"][BE]["distinct_prompts"] == pool < len(a.requests)
    assert len({r.prompt for r in a.requests[:pool]}) == pool


def test_only_held_out_prompts_each_once(chat_data, tiny_tokenizer):
    full = split(load_sharegpt(chat_data))
    train_keys = {e.key for e in full.train} | {e.key for e in full.val}
    test = held_out_prompts(str(chat_data))
    assert list(test) == full.test and len(test) == int(0.15 * len(full.test + full.val + full.train))
    w = build_chatbot_workload(_cfg(chat_data, rate=1.0, duration_s=20.0), tiny_tokenizer)
    assert 5 < len(w.requests) <= len(test)  # no more requests than prompts: no prompt twice
    sources = [_source(r, test) for r in w.requests]
    assert len({e.key for e in sources}) == len(w.requests)
    assert not {e.key for e in sources} & train_keys
    assert not {normalise(r.prompt) for r in w.requests} & train_keys


def test_real_response_lengths_order_kept(chat_data, tiny_tokenizer):
    test = held_out_prompts(str(chat_data))
    for scale in (1.0, 0.3):
        cfg = _cfg(chat_data, output_scale=scale, output_range=(8, 512))
        w = build_chatbot_workload(cfg, tiny_tokenizer)
        for r in w.requests:
            e = _source(r, test)
            assert r.response_words == e.words
            assert r.max_tokens == min(512, max(8, round(e.words * 1.3 * scale)))
        by_words = sorted(w.requests, key=lambda r: r.response_words)
        assert all(x.max_tokens <= y.max_tokens for x, y in zip(by_words, by_words[1:]))
        assert len({r.max_tokens for r in w.requests}) > 10  # not squashed flat
    assert response_tokens(100, _cfg(chat_data)) == 130


def test_respects_prompt_cut_and_context(chat_data, tiny_tokenizer):
    w = build_chatbot_workload(_cfg(chat_data, max_prompt_tokens=48, context_tokens=300, output_range=(8, 1024)),
                               tiny_tokenizer)
    cut = [r for r in w.requests if r.trace_input_tokens > r.prompt_tokens]
    assert cut and w.info["classes"][BE]["prompts_cut"] == len(cut)
    for r in w.requests:
        assert len(tiny_tokenizer.encode(r.prompt)) == r.prompt_tokens <= 48
        assert 8 <= r.max_tokens and r.prompt_tokens + r.max_tokens <= 300
    assert any(r.prompt_tokens + r.max_tokens == 300 for r in w.requests)  # the context cap did bite
    with pytest.raises(ValueError, match="context"):
        build_chatbot_workload(_cfg(chat_data, max_prompt_tokens=4000, output_range=(200, 300)), tiny_tokenizer)


def test_real_split_matches_the_rankers(tmp_path):
    """On the real shared data: the chatbot's pool is exactly predictor/data.py's test split (all sources
    loaded), and a workload uses only those prompts."""
    try:
        root = predictor_data_dir()
    except FileNotFoundError:
        pytest.skip("shared/data not here")
    if not (root / "prompts" / "sharegpt_v3_first_turn_pairs.jsonl").is_file():
        pytest.skip("shared/data not here")
    full = load_split(root)
    pool = held_out_prompts(str(root))
    assert [(e.prompt, e.words) for e in pool] == [(e.prompt, e.words) for e in full.test]
    train_keys = {e.key for e in full.train} | {e.key for e in full.val}
    from bench.tokens import load_tokenizer

    w = build_chatbot_workload(ChatbotConfig(duration_s=60, rate=1.0, data_root=str(root)), load_tokenizer())
    test_keys = {e.key for e in pool}
    for r in w.requests:
        if r.prompt_tokens == r.trace_input_tokens:
            assert normalise(r.prompt) in test_keys
        assert normalise(r.prompt) not in train_keys
        assert r.prompt_tokens + r.max_tokens <= 4096 and 8 <= r.max_tokens <= 1024


def test_be_order_policies_map_to_router_flags():
    base = StackConfig(port_offset=3, router_args=["--y"])
    for name in ("arrival", "ltr", "speculative", "oracle"):
        cfg = policies.apply(name, base)
        assert cfg.policy == "fcfs" and cfg.router_args == ["--y", "--be-order", name] and cfg.port_offset == 3
        assert policies.describe(name)["router_args"] == ["--be-order", name]
    assert policies.apply("fcfs", base).router_args == ["--y", "--queue-mode", "fifo"]
    assert policies.apply("qllm", base).policy == "qllm" and policies.apply("priority", base).policy == "priority"
    cfg = policies.apply("qllm+ltr", base)
    assert cfg.policy == "qllm" and cfg.router_args == ["--y", "--be-order", "ltr"]
    with pytest.raises(policies.UnknownPolicy, match="--be-order twice"):
        policies.parse_list("arrival+ltr")
    with pytest.raises(policies.UnknownPolicy, match="fifo"):
        policies.parse_list("fcfs+oracle")
    assert policies.parse_list("arrival,ltr,speculative,oracle") == ["arrival", "ltr", "speculative", "oracle"]
    assert policies.BE_ORDERS == ("arrival", "ltr", "speculative", "oracle")


def _be_records(n, wait_s, tokens=10, tpot=0.01):
    out = []
    for i in range(n):
        sent = 0.1 * i
        times = [sent + wait_s * (i + 1) + k * tpot for k in range(tokens)]
        out.append(RequestRecord(i, BE, sent, 10, tokens, sent_s=sent, first_token_s=times[0], token_times_s=times,
                                 finished_s=times[-1], finish_reason="length"))
    return out


def test_comparisons_against_arrival(tmp_path):
    recs = {"arrival": _be_records(6, 0.3), "ltr": _be_records(6, 0.1)}
    runs = [{"policy": p, **summarize(r, {}, classes=(BE,))} for p, r in recs.items()]
    doc = {"scenario": "chatbot", "params": {"duration_s": 1, "slo": {}, "floor": None}, "runs": runs,
           "comparisons": report.comparisons(runs, None)}
    rows = {r["policy"]: r for r in doc["comparisons"]["rows"]}
    assert doc["comparisons"]["baseline"] == "arrival"
    mean = lambda rs: sum(r.e2e_s for r in rs) / len(rs)  # noqa: E731
    assert rows["ltr"]["e2e_mean_vs_baseline"] == pytest.approx(mean(recs["ltr"]) / mean(recs["arrival"]))
    assert rows["ltr"]["be_e2e_mean_vs_baseline"] == pytest.approx(rows["ltr"]["e2e_mean_vs_baseline"])
    assert rows["arrival"]["be_e2e_p99_vs_baseline"] == pytest.approx(1.0)
    assert rows["ltr"]["ls_ttft_p50_vs_baseline"] is None
    md = report.markdown(doc)
    assert "BE E2E mean / base" in md and "| ltr | BE | 6 |" in md
    report.write(tmp_path, "chatbot", doc, recs, save_requests=False)


def _args(argv):
    parser, module = build_parser(["bench", *argv])
    assert module is bench_cli
    return parser.parse_args(["bench", *argv])


def test_cli_chatbot_defaults():
    chatbot, mixed_scenario = SCENARIOS["chatbot"], SCENARIOS["mixed"]
    args = _args(["--scenario", "chatbot"])
    assert chatbot.be_rate(args) == chatbot.default_be_rate
    assert chatbot.drain_cap(args) == chatbot.default_drain_cap_s
    assert chatbot.policies == "arrival,ltr,speculative,oracle"
    cfg = chatbot.config(_args(["--scenario", "chatbot", "--be-rate", "0.5", "--rate", "2"]), None)
    assert cfg.rate == 1.0 and cfg.max_prompt_tokens == 1024 and cfg.output_range == (8, 1024)
    assert chatbot.config(args, {"rate": 0.5}).rate == 0.5 * chatbot.default_be_rate
    mixed = _args([])
    assert mixed_scenario.be_rate(mixed) == 1.0 and mixed_scenario.drain_cap(mixed) == 30.0


async def test_cli_chatbot_run_against_a_router(fake_router, chat_data, tiny_tokenizer, monkeypatch, tmp_path):
    address, script = fake_router
    monkeypatch.setenv("QLLM_SHARED_DATA", str(chat_data))
    tok = tmp_path / "tok.json"
    tok.write_text(open(tiny_tokenizer.name).read())
    out = tmp_path / "out"
    rc = await bench_cli.run(_args([
        "--scenario", "chatbot", "--target", address, "--tokenizer", str(tok), "--out", str(out),
        "--duration", "1.5", "--drain-cap", "3", "--be-rate", "4", "--chatbot-output-tokens", "2:5",
        "--chatbot-output-scale", "0.01", "--chatbot-prompt-tokens", "32", "--warmup", "1", "--no-progress"]))
    assert rc == 0
    doc = json.loads((out / "chatbot.json").read_text())
    assert doc["scenario"] == "chatbot" and doc["params"]["floor"] is None
    run = doc["runs"][0]
    assert set(run["classes"]) == {BE} and run["classes"][BE]["errors"] == 0
    assert run["classes"][BE]["count"] == doc["params"]["workload"]["classes"][BE]["count"] > 0
    sent = script.seen[1:]  # after the one warm-up request
    test_prompts = [e.prompt for e in held_out_prompts(str(chat_data))]
    assert all(any(p.startswith(s.prompt) for p in test_prompts) for s in sent)
    assert {s.priority for s in sent} == {2} and all(s.ignore_eos for s in sent)  # PRIORITY_BEST_EFFORT
    assert doc["comparisons"]["rows"][0]["e2e_mean_vs_baseline"] == pytest.approx(1.0)


async def test_cli_chatbot_stack_mode_default_policies(fake_router, chat_data, tiny_tokenizer, monkeypatch, tmp_path):
    """Stack mode with Stack replaced by the fake router: the four BE orders by default, one stack each, every
    worker limited to --chatbot-max-num-seqs and every router given its --be-order."""
    address, _ = fake_router
    port = int(address.rsplit(":", 1)[1])
    started = []

    class FakeStack:
        def __init__(self, cfg):
            self.config = cfg

        def start(self, timeout_s):
            started.append(self.config)
            return self

        def stop(self):
            pass

    monkeypatch.setattr(runner, "Stack", FakeStack)
    monkeypatch.setattr(runner, "_port_free", lambda host, port: True)
    monkeypatch.setenv("QLLM_SHARED_DATA", str(chat_data))
    tok = tmp_path / "tok.json"
    tok.write_text(open(tiny_tokenizer.name).read())
    out = tmp_path / "out"
    rc = await bench_cli.run(_args([
        "--scenario", "chatbot", "--port-offset", str(port - 50051), "--tokenizer", str(tok), "--out", str(out),
        "--duration", "1", "--drain-cap", "3", "--be-rate", "3", "--chatbot-output-tokens", "2:4",
        "--chatbot-output-scale", "0.01", "--warmup", "0", "--no-progress"]))
    assert rc == 0
    assert [(c.policy, c.router_args, c.worker_args) for c in started] == [
        ("fcfs", ["--be-order", name], ["--max-num-seqs", "8"]) for name in ("arrival", "ltr", "speculative", "oracle")]
    doc = json.loads((out / "chatbot.json").read_text())
    assert [r["policy"] for r in doc["runs"]] == ["arrival", "ltr", "speculative", "oracle"]
    assert doc["comparisons"]["baseline"] == "arrival"
    assert {r["policy"] for r in doc["comparisons"]["rows"] if r["e2e_mean_vs_baseline"] is not None} == {
        "arrival", "ltr", "speculative", "oracle"}
