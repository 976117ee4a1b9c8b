"""Agent-program prefix reuse on the real engine: a turn that takes over its program's pinned KV and computes
only the new suffix gives the same greedy tokens as a full recompute (and as transformers' generate())."""

import asyncio
import random

import grpc

from qllm import serving
from qllm.v1 import worker_pb2, worker_pb2_grpc
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.engine_core import EngineCore
from worker.model_loader import load_model
from worker.request import Priority, Request, SamplingParams

BE = Priority.BEST_EFFORT


def words(rng, n):
    vocab = ["the", "tool", "returned", "files", "error", "agent", "calls", "search", "result", "ok", "line"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def offline_core(runner, budget):
    # A provisional pin outlives the reference generate() calls between turns, however loaded the machine.
    return EngineCore(runner, EngineConfig(max_num_batched_tokens=budget, block_size=runner.block_size,
                                           kv_budget_tokens=runner.cache.num_blocks * runner.block_size,
                                           provisional_pin_s=600.0))


def test_program_turns_reuse_their_pin_and_match_a_full_recompute(loaded, make_runner, reference_tokens):
    """Three programs, four turns each, interleaved with unrelated requests in a chunked-prefill batch; each
    turn's prompt = the previous prompt + its output + a tool result. Pinned runs and recompute runs agree
    token for token, and the pinned run computes only suffixes."""
    tok = loaded.tokenizer
    rng = random.Random(7)
    runner = make_runner(num_blocks=512, block_size=16)
    core = offline_core(runner, 96)
    sched = core.scheduler
    contexts = {p: tok.encode(words(rng, rng.randint(20, 120))) for p in ("a", "b", "c")}
    previous: dict[str, int] = {}
    for k in range(4):
        reqs = {p: Request(f"{p}{k}", ctx, SamplingParams(max_tokens=6, ignore_eos=True), BE,
                           program_id=p, last_turn=(k == 3), arrival_time=float(k))
                for p, ctx in contexts.items()}
        other = Request(f"other{k}", tok.encode(words(rng, 40)), SamplingParams(max_tokens=5, ignore_eos=True))
        for r in [*reqs.values(), other]:
            sched.add_request(r)
        core.run_to_completion()
        for p, r in reqs.items():
            assert r.output_token_ids == reference_tokens(r.prompt_token_ids, 6), (p, k)
            # Everything of the previous turn but its last output token had KV, and the prompt extends it.
            assert r.num_cached_tokens == (previous[p] + 6 - 1 if k else 0), (p, k)
            previous[p] = len(r.prompt_token_ids)
            contexts[p] = r.prompt_token_ids + r.output_token_ids + tok.encode(" " + words(rng, rng.randint(5, 30)))
    assert sched.pins.reused_tokens > 0 and len(sched.pins) == 0
    assert sched.allocator.num_free_blocks == sched.allocator.num_blocks


def test_a_diverging_prompt_reuses_only_the_common_prefix(loaded, make_runner, reference_tokens):
    tok = loaded.tokenizer
    runner = make_runner()
    core = offline_core(runner, 512)
    sched = core.scheduler
    prompt = tok.encode(words(random.Random(1), 100))
    first = Request("t0", prompt, SamplingParams(max_tokens=4, ignore_eos=True), program_id="p")
    sched.add_request(first)
    core.run_to_completion()
    edited = prompt[:37] + tok.encode(" agent search result line")   # the program rewrote its context
    second = Request("t1", edited, SamplingParams(max_tokens=8, ignore_eos=True), program_id="p")
    sched.add_request(second)
    core.run_to_completion()
    assert second.num_cached_tokens == 37
    assert second.output_token_ids == reference_tokens(edited, 8)


async def test_worker_pin_rpcs_over_grpc(loaded):
    """Serve a non-final turn, see the pin in Describe/ListPins, SetPin it, reuse it with the next turn
    (cached_prompt_tokens on the wire), and ReleasePins; bad input names the field."""
    service, engine = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=4096,
                                                                                 provisional_pin_s=30.0))
    server, port = await serving.start(service, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            async def turn(rid, prompt, last=False):
                async def commands():
                    yield worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
                        request_id=rid, prompt=prompt, priority=2, program_id="prog", last_turn=last,
                        sampling=worker_pb2.SamplingParams(max_tokens=5, top_p=1.0, ignore_eos=True)))
                return [e.tokens async for e in stub.Serve(commands())]

            prompt = "the agent calls the search tool " * 8
            first = await turn("t0", prompt)
            assert first[-1].finished and first[-1].cached_prompt_tokens == 0
            info = await stub.Describe(worker_pb2.DescribeRequest())
            assert info.num_pins == 1 and info.kv_pinned_tokens == first[-1].prompt_tokens + 4
            pins = (await stub.ListPins(worker_pb2.ListWorkerPinsRequest())).pins
            assert [p.program_id for p in pins] == ["prog"] and 0 < pins[0].expires_in_s <= 30
            held = await stub.SetPin(worker_pb2.SetPinRequest(program_id="prog", ttl_s=60, keep_score=0.8))
            assert held.held and held.tokens == info.kv_pinned_tokens
            assert not (await stub.SetPin(worker_pb2.SetPinRequest(program_id="nobody", ttl_s=5))).held

            text = "".join(t.text for t in first)
            second = await turn("t1", prompt + text + " tool says ok", last=False)
            assert second[-1].cached_prompt_tokens > first[-1].prompt_tokens - 2
            released = await stub.ReleasePins(worker_pb2.ReleasePinsRequest(program_ids=["prog", "nobody"]))
            assert released.released == 1 and released.tokens > 0
            info = await stub.Describe(worker_pb2.DescribeRequest())
            assert info.num_pins == 0 and info.kv_free_tokens == info.kv_capacity_tokens

            for bad, field in [(worker_pb2.SetPinRequest(ttl_s=1), "program_id"),
                               (worker_pb2.SetPinRequest(program_id="x", ttl_s=float("nan")), "ttl_s")]:
                try:
                    await stub.SetPin(bad)
                    raise AssertionError("accepted")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT and field in exc.details()
    finally:
        await serving.stop(service, server)
        await asyncio.sleep(0)
