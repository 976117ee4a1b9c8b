"""The agent program driver against a fake qllm.v1.Router: what it sends (program_id, last_turn, tool_name,
prompts that extend the previous turn's prompt and output), what it records (JCT, cached prompt tokens), the
figures and the report's agent section. Time is a fake clock advanced only by the tool-gap sleeps, so JCT is
checked exactly, with no timed assertion."""

import asyncio
import json

import grpc
import pytest

import bench.cli as bench_cli
from bench import report
from bench.agent.driver import AgentSender, ProgramRecord, run_program, run_programs
from bench.agent.programs import ProgramSpec, TurnSpec
from bench.agent.summary import markdown, plot_pinned, ratios, summarize_programs
from bench.workload import data_dir
from qllm.cli import build_parser
from qllm.v1 import router_pb2, router_pb2_grpc


class EchoRouter(router_pb2_grpc.RouterServicer):
    """Answers each turn with `max_tokens` tokens of text "<k>" where k counts requests; cached_prompt_tokens =
    the characters the prompt shares with the program's previous prompt + output (what a pin would hold)."""

    def __init__(self):
        self.seen = []
        self.held: dict[str, str] = {}

    async def Generate(self, request, context):
        self.seen.append(request)
        if "FAIL" in request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: scripted failure")
        held = self.held.get(request.program_id, "")
        cached = len(held) if request.prompt.startswith(held) and held else 0
        word = f"<{len(self.seen)}>"
        for i in range(request.max_tokens):
            last = i == request.max_tokens - 1
            yield router_pb2.GenerateResponse(
                text=word, token_ids=[i], finished=last, finish_reason="length" if last else "",
                request_id=request.request_id, prompt_tokens=len(request.prompt) if last else 0,
                completion_tokens=request.max_tokens if last else 0, cached_prompt_tokens=cached if last else 0)
        if request.program_id and not request.last_turn:
            self.held[request.program_id] = request.prompt + word * request.max_tokens


@pytest.fixture
async def echo_router():
    servicer = EchoRouter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def _program(index=0, gaps=(1.5, 4.0), texts=("SYSTEM: fix the bug", "\n$ grep: found", "\n$ sed: done"),
             tools=("bash:grep", "bash:sed")):
    turns = []
    for k, text in enumerate(texts):
        last = k == len(texts) - 1
        turns.append(TurnSpec(k, text, len(text.split()), 2 + k, "" if last else tools[k],
                              0.0 if last else gaps[k], 0.0 if last else gaps[k] + 1))
    return ProgramSpec(index, f"prog-{index}", 0.0, "test/session", turns)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    async def sleep(self, s):
        self.t += s
        await asyncio.sleep(0)


async def test_turns_extend_each_other_and_carry_program_fields(echo_router):
    address, servicer = echo_router
    program = _program()
    clock = FakeClock()
    sender = AgentSender(address)
    rec = ProgramRecord(0, program.program_id, 0.0, program.source, len(program.turns))
    try:
        await run_program(sender, program, rec, clock, sleep=clock.sleep)
    finally:
        await sender.close()
    seen = servicer.seen
    assert [r.program_id for r in seen] == ["prog-0"] * 3
    assert [r.last_turn for r in seen] == [False, False, True]
    assert [r.tool_name for r in seen] == ["bash:grep", "bash:sed", ""]
    assert [r.max_tokens for r in seen] == [2, 3, 4]
    assert all(r.ignore_eos and r.temperature == 0.0 and r.priority == 2 for r in seen)  # BE, greedy
    # prompt k+1 = prompt k + the text generated in turn k + the tool's result
    assert seen[0].prompt == "SYSTEM: fix the bug"
    assert seen[1].prompt == seen[0].prompt + "<1><1>" + "\n$ grep: found"
    assert seen[2].prompt == seen[1].prompt + "<2><2><2>" + "\n$ sed: done"
    # records: every turn completed, cached tokens as the server said, JCT = first sent -> last finished,
    # which on this clock is exactly the two tool gaps
    assert rec.completed and rec.ended == ""
    assert [t.cached_prompt_tokens for t in rec.turns] == [0, len(seen[0].prompt) + 6, len(seen[1].prompt) + 9]
    assert [t.server_prompt_tokens for t in rec.turns] == [len(r.prompt) for r in seen]
    assert [t.output_tokens for t in rec.turns] == [2, 3, 4]
    assert [(t.turn_index, t.tool_name, t.last_turn) for t in rec.turns] == [
        (0, "bash:grep", False), (1, "bash:sed", False), (2, "", True)]
    assert rec.jct_s == pytest.approx(5.5)
    assert rec.turns[1].sent_s - rec.turns[0].finished_s == pytest.approx(1.5)


async def test_a_failed_turn_ends_the_program(echo_router):
    address, servicer = echo_router
    program = _program(texts=("start", "\nFAIL here", "\nnever sent"))
    clock = FakeClock()
    sender = AgentSender(address)
    rec = ProgramRecord(0, program.program_id, 0.0, program.source, 3)
    try:
        await run_program(sender, program, rec, clock, sleep=clock.sleep)
    finally:
        await sender.close()
    assert len(servicer.seen) == 2 and len(rec.turns) == 2
    assert not rec.completed and rec.jct_s is None
    assert rec.ended.startswith("turn 1: INVALID_ARGUMENT")


async def test_context_window_caps_outputs_and_stops_overflow(echo_router, tiny_tokenizer):
    address, servicer = echo_router
    long_text = "the model serves " * 40
    window = len(tiny_tokenizer.encode(long_text)) + 2
    program = _program(texts=(long_text, "\n" + long_text))
    clock = FakeClock()
    sender = AgentSender(address)
    rec = ProgramRecord(0, program.program_id, 0.0, program.source, 2)
    try:
        await run_program(sender, program, rec, clock, tokenizer=tiny_tokenizer, context_tokens=window,
                          sleep=clock.sleep)
    finally:
        await sender.close()
    assert servicer.seen[0].max_tokens == 2  # prompt + output fit the window
    assert rec.turns[0].prompt_tokens == window - 2
    assert len(servicer.seen) == 1 and rec.ended == "context overflow at turn 1"


async def test_run_programs_open_loop_and_figures(echo_router):
    address, servicer = echo_router
    programs = [_program(i, gaps=(0.01, 0.01)) for i in range(3)]
    for i, p in enumerate(programs):
        p.arrival_s = 0.02 * i
    sender = AgentSender(address, request_id_prefix="t")
    try:
        recs = await run_programs(sender, programs, duration_s=0.1, drain_cap_s=30, progress=False)
    finally:
        await sender.close()
    assert all(r.completed for r in recs)
    assert sorted({r.program_id for r in servicer.seen}) == ["prog-0", "prog-1", "prog-2"]
    assert len({r.request_id for r in servicer.seen}) == 9
    samples = [{"t_s": 0.0, "pinned_tokens": 0, "pins": 0, "used_tokens": 0, "capacity_tokens": 100},
               {"t_s": 0.5, "pinned_tokens": 40, "pins": 2, "used_tokens": 50, "capacity_tokens": 100}]
    s = summarize_programs(recs, samples)
    jcts = sorted(r.jct_s for r in recs)
    assert s["jct_ms"]["mean"] == pytest.approx(1000 * sum(jcts) / 3)
    assert s["jct_ms"]["p50"] == pytest.approx(1000 * jcts[1])
    assert s["programs"] == {"count": 3, "completed": 3, "incomplete": 0, "ended": {}}
    prompt = sum(t.server_prompt_tokens for r in recs for t in r.turns)
    cached = sum(t.cached_prompt_tokens for r in recs for t in r.turns)
    assert 0 < cached < prompt and s["prefix_hit_share"] == pytest.approx(cached / prompt)
    assert s["pinned_kv"]["max_tokens"] == 40 and s["pinned_kv"]["mean_tokens"] == 20


def _run_doc(policy, mean_ms, p99_ms):
    return {"policy": policy, "classes": {}, "total_output_tok_s": 1.0,
            "jct_ms": {"p50": mean_ms, "p90": p99_ms, "p99": p99_ms, "mean": mean_ms},
            "programs": {"count": 2, "completed": 2, "incomplete": 0, "ended": {}}, "prefix_hit_share": 0.5,
            "programs_per_s": 0.1, "pinned_kv": {"samples": [{"t_s": 0.0, "pinned_tokens": 10, "capacity_tokens": 99}],
                                                 "max_tokens": 10, "mean_tokens": 10.0}}


def test_schema_ratios_markdown_plot(tmp_path):
    runs = [_run_doc("no-pin", 60_000.0, 90_000.0), _run_doc("fixed-ttl", 40_000.0, 70_000.0),
            _run_doc("ttl", 20_000.0, 35_000.0), _run_doc("pin-forever", 19_000.0, 30_000.0)]
    doc = {"scenario": "agent", "params": {"duration_s": 1}, "runs": runs}
    report.validate(doc)
    rows = {r["ratio"]: r for r in ratios(runs)}
    assert rows["no-pin / ttl"]["jct_mean"] == pytest.approx(3.0)
    assert rows["ttl / pin-forever"]["jct_p99"] == pytest.approx(35 / 30)
    assert rows["fixed-ttl / ttl"]["jct_mean"] == pytest.approx(2.0)
    md = markdown(doc)
    assert "| no-pin / ttl | 3.00 |" in md and "| ttl | 2 | 2 | 20.0 | 35.0 | 20.0 |" in md
    assert plot_pinned(tmp_path / "p.png", doc) and (tmp_path / "p.png").stat().st_size > 0
    broken = json.loads(json.dumps(doc))
    del broken["runs"][1]["jct_ms"]
    with pytest.raises(report.SchemaError, match=r"runs\[1\].jct_ms"):
        report.validate(broken)
    broken = json.loads(json.dumps(doc))
    del broken["runs"][0]["jct_ms"]["p99"]
    with pytest.raises(report.SchemaError, match=r"jct_ms.p99: missing"):
        report.validate(broken)


async def test_cli_agent_scenario_against_a_router(fake_router, tmp_path):
    """`qllm bench --scenario agent --target`: the real trace's programs through a router; agent.json carries
    jct_ms per run and the programs file one line per program."""
    if not (data_dir() / "agent" / "lmcache_agent_trace_calls.jsonl").is_file():
        pytest.skip("shared/data/agent not here")
    address, script = fake_router
    script.tpot_s = {k: 0.001 for k in script.tpot_s}
    script.ttft_s = {k: 0.005 for k in script.ttft_s}
    out = tmp_path / "out"
    argv = ["bench", "--scenario", "agent", "--target", address, "--out", str(out), "--duration", "2",
            "--agent-rate", "2", "--agent-max-turns", "3", "--agent-gap-scale", "0.001", "--agent-output-tokens",
            "2:4", "--warmup", "1", "--no-progress", "--drain-cap", "20"]
    parser, module = build_parser(argv)
    assert module is bench_cli
    rc = await bench_cli.run(parser.parse_args(argv))
    assert rc == 0
    doc = json.loads((out / "agent.json").read_text())
    assert doc["scenario"] == "agent" and [r["policy"] for r in doc["runs"]] == ["target"]
    run = doc["runs"][0]
    n = doc["params"]["workload"]["classes"]["BE"]["programs"]
    assert run["programs"]["count"] == n and run["programs"]["completed"] == n > 0
    assert set(run["jct_ms"]) >= {"p50", "p99", "mean"} and run["jct_ms"]["mean"] > 0
    assert run["classes"]["BE"]["count"] == doc["params"]["workload"]["classes"]["BE"]["count"]
    turns = [r for r in script.seen if r.program_id]
    assert len(turns) == run["classes"]["BE"]["count"]
    assert all(r.last_turn == (r.tool_name == "") for r in turns)
    assert sum(r.last_turn for r in turns) == n
    lines = (out / "agent.programs.jsonl").read_text().splitlines()
    assert len(lines) == n and all(json.loads(x)["completed"] for x in lines)
    assert "Agent programs" in (out / "agent.md").read_text()


def test_jct_ratios_over_rounds():
    from bench.agent.summary import finish_document

    runs = []
    for round_no, no_pin_mean in ((1, 60_000.0), (2, 30_000.0), (3, 40_000.0)):
        runs += [{**_run_doc("no-pin", no_pin_mean, 90_000.0), "round": round_no},
                 {**_run_doc("ttl", 20_000.0, 30_000.0), "round": round_no}]
    doc = {"scenario": "agent", "params": {"duration_s": 1}, "runs": runs,
           "rounds": [{"round": n, "order": []} for n in (1, 2, 3)]}
    finish_document(doc)
    report.validate(doc)
    assert [r["jct_ratios"][0]["jct_mean"] for r in doc["rounds"]] == [3.0, 1.5, 2.0]
    (row,) = doc["jct_ratios"]
    assert row["ratio"] == "no-pin / ttl" and row["jct_mean"] == {"median": 2.0, "min": 1.5, "max": 3.0, "n": 3}
    md = markdown(doc)
    assert "| no-pin / ttl | 2.00 (1.50-3.00) | 2.00 (1.50-3.00) | 3.00 (3.00-3.00) |" in md
    assert "| ttl (round 2) | 2 |" in md
