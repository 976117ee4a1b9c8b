"""Beam search with patience (worker/beam.py) against transformers' generate(num_beams=k, early_stopping=True),
inside the engine's continuous batch: beside greedy requests, parked at layer boundaries, preempted for KV."""

import random

import pytest
import torch

from worker import beam as beam_mod
from worker.engine import AsyncEngine, EngineConfig, RequestRejected
from worker.engine_core import EngineCore
from worker.request import FinishReason, Priority, Request, SamplingParams

LS, BE = Priority.LATENCY_SENSITIVE, Priority.BEST_EFFORT
BS = 16
WORDS = ["the", "model", "serves", "tokens", "fast", "while", "batch", "jobs", "wait", "expert", "layer", "beam"]
PENALTIES = [1.0, 0.5, 2.0, 0.0]


def prompts(tokenizer, n, seed=0):
    rng = random.Random(seed)
    return [tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))) for _ in range(n)]


def beam_request(rid, ids, k, n, eos=frozenset(), patience=1.0, length_penalty=1.0, priority=BE, arrival=0.0):
    sp = SamplingParams(max_tokens=n, num_beams=k, patience=patience, length_penalty=length_penalty,
                        ignore_eos=not eos)
    req = Request(rid, list(ids), sp, priority, frozenset(eos), arrival_time=arrival)
    req.beam = beam_mod.BeamSearch(k, patience, length_penalty, n, len(ids), BS, frozenset(eos))
    return req


def greedy(rid, ids, n, priority=BE, arrival=0.0):
    return Request(rid, list(ids), SamplingParams(max_tokens=n, ignore_eos=True), priority, arrival_time=arrival)


def offline_core(runner, policy="fcfs", budget=64, **config):
    return EngineCore(runner, EngineConfig(policy=policy, max_num_batched_tokens=budget, block_size=BS,
                                           kv_budget_tokens=runner.cache.num_blocks * BS, **config))


def run_offline(runner, reqs, policy="fcfs", budget=64, **config):
    """Through EngineCore.step() on this thread; every block is free again at the end."""
    core = offline_core(runner, policy, budget, **config)
    core.run_to_completion(reqs)
    assert core.allocator.num_free_blocks == core.allocator.num_blocks
    return core


@pytest.fixture(scope="module")
def hf_beams(reference_model):
    """transformers' own beam search on the embedded default (stock attention)."""
    model = reference_model

    def _generate(ids, k, n, eos, length_penalty):
        kwargs = dict(eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0]) if eos else {}
        out = model.generate(torch.tensor([ids]), num_beams=k, early_stopping=True, do_sample=False,
                             max_new_tokens=n, length_penalty=length_penalty, **kwargs)
        return out[0, len(ids):].tolist()
    return _generate


def pick_eos(runner, ps, k, n):
    """A per-prompt EOS id that the beams meet mid-search (the random-weight model rarely emits id 0): a token
    of the runner-up hypothesis of an ignore-EOS search, so finished candidates pile up at varied depths."""
    reqs = [beam_request(f"probe{i}", ids, k, n) for i, ids in enumerate(ps)]
    run_offline(runner, reqs)
    eos = []
    for i, r in enumerate(reqs):
        hyps = r.beam.ranked()
        toks = hyps[1 if len(hyps) > 1 else 0].tokens
        eos.append(frozenset({toks[min(len(toks) - 1, 2 + i % 5)]}))
    return eos


@pytest.mark.parametrize("k", [2, 4])
def test_patience_one_matches_transformers_beam_search(loaded, make_runner, hf_beams, k):
    """20 prompts, with EOS and without, four length penalties; all beam requests batched together with greedy
    requests and chunked prefills (budget 32)."""
    runner = make_runner()
    n = 10
    ps = prompts(loaded.tokenizer, 20, seed=k)
    eos = pick_eos(runner, ps, k, n)
    eos = [e if i % 4 else frozenset() for i, e in enumerate(eos)]  # every 4th: no EOS (ignore_eos)
    reqs = [beam_request(f"b{i}", ids, k, n, eos[i], length_penalty=PENALTIES[i % 4], arrival=float(i))
            for i, ids in enumerate(ps)]
    others = [greedy(f"g{i}", ids, 12, arrival=i + 0.5) for i, ids in enumerate(ps[:6])]
    run_offline(runner, reqs + others, budget=32)
    stops = 0
    for i, (r, ids) in enumerate(zip(reqs, ps)):
        expected = hf_beams(ids, k, n, eos[i], PENALTIES[i % 4])
        assert r.output_token_ids == expected, (i, eos[i], PENALTIES[i % 4])
        stops += r.finish_reason is FinishReason.STOP
    assert stops >= 5  # the EOS path (finished candidates, early stop) is exercised, not only max_tokens
    runner2 = make_runner()
    for g, ids in zip(others, ps):  # greedy neighbours are unaffected by the beams beside them
        alone = greedy("alone", ids, 12)
        run_offline(runner2, [alone])
        assert g.output_token_ids == alone.output_token_ids


def test_beam_batched_with_greedy_equals_alone(loaded, make_runner):
    runner = make_runner()
    ps = prompts(loaded.tokenizer, 4, seed=11)
    eos = frozenset({5})
    alone = []
    for i, ids in enumerate(ps):
        r = beam_request(f"a{i}", ids, 4, 12, eos, patience=2.0)
        run_offline(runner, [r])
        alone.append((r.output_token_ids, [h.score for h in r.beam.ranked()]))
    mixed = [beam_request(f"m{i}", ids, 4, 12, eos, patience=2.0, arrival=float(i)) for i, ids in enumerate(ps)]
    mixed += [greedy(f"g{i}", ids * 3, 20, arrival=i + 0.5) for i, ids in enumerate(ps)]
    run_offline(runner, mixed, budget=24)
    for r, (tokens, scores) in zip(mixed, alone):
        assert r.output_token_ids == tokens
        assert [h.score for h in r.beam.ranked()] == pytest.approx(scores, abs=1e-4)


def test_patience_searches_deeper_and_never_scores_worse(loaded, make_runner):
    runner = make_runner()
    k, n = 2, 12
    ps = prompts(loaded.tokenizer, 12, seed=21)
    eos = pick_eos(runner, ps, k, n)
    best = {}
    steps = {}
    for patience in (1.0, 2.0, 4.0):
        reqs = [beam_request(f"p{patience}-{i}", ids, k, n, eos[i], patience=patience) for i, ids in enumerate(ps)]
        run_offline(runner, reqs)
        best[patience] = [r.beam.best().score for r in reqs]
        steps[patience] = [len(r.beam.finished) for r in reqs]
        for r in reqs:
            assert len(r.beam.finished) >= r.beam.target or r.finish_reason is FinishReason.LENGTH or \
                max(len(h.tokens) for h in r.beam.finished) == n
    for p in (2.0, 4.0):
        assert all(b >= a - 1e-6 for a, b in zip(best[1.0], best[p])), p
        assert sum(steps[p]) > sum(steps[1.0])  # it did search past patience 1's stopping point
    assert any(b > a + 1e-6 for a, b in zip(best[1.0], best[4.0]))  # and sometimes found better


def test_prompt_kv_is_shared_not_copied(loaded, make_runner):
    runner = make_runner()
    ids = prompts(loaded.tokenizer, 1, seed=5)[0] * 4  # several full prompt blocks and a partial one
    assert len(ids) % BS and len(ids) > 2 * BS
    k, n = 4, 8
    r = beam_request("share", ids, k, n)
    core = offline_core(runner, budget=512)
    core.add_request(r)
    core.step()
    alloc = core.allocator
    used = alloc.num_blocks - alloc.num_free_blocks
    assert used * BS == beam_mod.kv_tokens(len(ids), n, k, BS)
    assert used * BS < beam_mod.kv_tokens_copying_prompt(len(ids), n, k, BS)
    assert used == -(-len(ids) // BS) + k * -(-(len(ids) % BS + n) // BS)
    while core.has_unfinished_requests():
        assert alloc.num_blocks - alloc.num_free_blocks == used  # no growth: the whole layout is reserved
        table = alloc.block_table("share")
        tables = [r.beam.block_table(table, b) for b in range(len(r.beam.beams))]
        for t in tables:  # every beam reads the same full prompt blocks
            assert t[:len(ids) // BS] == tables[0][:len(ids) // BS]
        assert len({tuple(t[len(ids) // BS:]) for t in tables}) == len(tables)
        core.step()


@pytest.mark.parametrize("policy", ["fcfs", "priority", "qllm"])
def test_kv_pressure_preemption_restarts_beams_identically(loaded, make_runner, policy):
    """A beam request that loses its KV (recompute preemption) restarts its search after the prefill and
    ends with the same answer (the search is deterministic)."""
    ps = [(p * 8)[:40] for p in prompts(loaded.tokenizer, 3, seed=31)]
    k, n = 4, 16
    ref = []
    runner = make_runner()
    for i, ids in enumerate(ps):
        r = beam_request(f"ref{i}", ids, k, n)
        run_offline(runner, [r])
        ref.append(r.output_token_ids)
    reqs = [beam_request(f"b{i}", ids, k, n, arrival=float(i)) for i, ids in enumerate(ps)]
    # Greedy requests admitted first, optimistically (no output reserve), then grow into the beams' KV.
    reqs += [greedy(f"g{i}", (ids * 4)[:30], 60, arrival=i - 10.0) for i, ids in enumerate(ps[:2])]
    run_offline(make_runner(num_blocks=20), reqs, policy, budget=256, admission_output_fraction=0.0,
                ls_reserved_kv_tokens=0, ls_reserved_slots=0)
    for r, expected in zip(reqs, ref):
        assert r.output_token_ids == expected, r.request_id
    assert any(r.num_preemptions for r in reqs if r.request_id.startswith("b")), [r.num_preemptions for r in reqs]


def test_layer_boundary_parking_keeps_beams(loaded, make_runner, run_with_random_layer_yields):
    """The real core loop, yields at random layer boundaries: BE beam steps are parked and resumed like any."""
    runner = make_runner()
    ps = prompts(loaded.tokenizer, 6, seed=41)
    ref = []
    for i, ids in enumerate(ps):
        r = beam_request(f"ref{i}", ids, 2 + 2 * (i % 2), 8, frozenset({7}))
        run_offline(runner, [r])
        ref.append(r.output_token_ids)
    reqs = [beam_request(f"b{i}", ids, 2 + 2 * (i % 2), 8, frozenset({7}), arrival=float(i))
            for i, ids in enumerate(ps)]
    reqs += [greedy(f"g{i}", ids, 8, LS, i + 0.5) for i, ids in enumerate(ps[:3])]
    core, done = run_with_random_layer_yields(make_runner(), reqs)
    assert sum(o.finished for o in done) == len(reqs)
    assert core.num_layer_preemptions > 5
    finals = {o.request_id: o for o in done if o.finished}
    for r, expected in zip(reqs, ref):
        assert r.output_token_ids == expected
        out = finals[r.request_id]
        assert out.new_token_ids == expected and out.beams and out.beams[0][0] == expected
    # beams stream nothing before the end: exactly one output per beam request
    assert sum(o.request_id.startswith("b") for o in done) == len(ps)


async def test_engine_streams_best_at_end_and_validates(loaded, make_runner):
    engine = AsyncEngine(make_runner(), loaded.tokenizer, loaded.eos_token_ids, loaded.max_context,
                         EngineConfig(max_num_beams=4))
    engine.start()
    try:
        ids = loaded.tokenizer.encode("the expert layer serves tokens")
        outs = [o async for o in engine.generate("b", ids, SamplingParams(max_tokens=6, num_beams=3))]
        assert len(outs) == 1 and outs[0].finished and len(outs[0].new_token_ids) >= 1
        assert outs[0].beams[0][0] == outs[0].new_token_ids and len(outs[0].beams) >= 3
        scores = [s for _, s in outs[0].beams]
        assert scores == sorted(scores, reverse=True)
        for sp, field in [(SamplingParams(num_beams=5), "num_beams"),
                          (SamplingParams(num_beams=2, patience=0.0), "patience"),
                          (SamplingParams(num_beams=2, patience=-1.0), "patience"),
                          (SamplingParams(num_beams=2, temperature=0.7), "temperature"),
                          (SamplingParams(num_beams=2, length_penalty=float("nan")), "length_penalty")]:
            with pytest.raises(RequestRejected) as exc:
                async for _ in engine.generate("x", ids, sp):
                    pass
            assert exc.value.code == "INVALID_ARGUMENT" and exc.value.message.startswith(field + ":")
        assert engine.core.allocator.free_tokens == engine.core.allocator.capacity_tokens
    finally:
        engine.stop()


def test_wire_and_router_validation():
    from qllm.v1 import router_pb2, worker_pb2
    from qllm.contract import InvalidField
    from router.validation import Limits, validate
    from worker.server import sampling_from_wire

    sp = sampling_from_wire(worker_pb2.SamplingParams(max_tokens=4, top_p=1.0, num_beams=3, patience=2.0,
                                                      length_penalty=0.5))
    assert (sp.num_beams, sp.patience, sp.length_penalty) == (3, 2.0, 0.5)
    assert sampling_from_wire(worker_pb2.SamplingParams(max_tokens=4, top_p=1.0, num_beams=2)).patience == 1.0
    for msg, field in [(dict(num_beams=2, patience=-1.0), "patience"), (dict(num_beams=2, temperature=0.5),
                                                                           "temperature")]:
        # The wire's values as the worker checks them (the request contract, with this worker's beam bound).
        with pytest.raises(RequestRejected) as exc:
            AsyncEngine.check_fields(sampling_from_wire(worker_pb2.SamplingParams(max_tokens=4, top_p=1.0, **msg)),
                                     max_beams=8, vocab_size=None)
        assert exc.value.code == "INVALID_ARGUMENT" and exc.value.message.startswith(field)
    for kwargs, field in [(dict(num_beams=9), "num_beams"), (dict(num_beams=2, patience=0.0), "patience"),
                          (dict(num_beams=2, temperature=0.3), "temperature"),
                          (dict(num_beams=2, length_penalty=float("inf")), "length_penalty")]:
        with pytest.raises(InvalidField) as exc:
            validate(router_pb2.GenerateRequest(prompt="hi", max_tokens=4, **kwargs), Limits())
        assert exc.value.field == field
    validate(router_pb2.GenerateRequest(prompt="hi", max_tokens=4, num_beams=4, patience=2.0), Limits())


def test_finished_target_rounds_half_up():
    assert [beam_mod.finished_target(4, p) for p in (0.1, 0.5, 1.0, 1.5, 2.0)] == [1, 2, 4, 6, 8]
    assert beam_mod.finished_target(2, 1.25) == 3


async def test_worker_service_streams_beam_result(hf_beams):
    """Through the worker's gRPC Serve stream: a beam request gets one message, the best sequence, at the end;
    the same sequence as transformers' beam search."""
    import grpc

    from qllm import serving
    from qllm.v1 import worker_pb2, worker_pb2_grpc
    from worker import server as worker_server
    from worker.model_loader import load_model

    loaded = load_model(None)
    service, engine = worker_server.build_service(loaded, EngineConfig(kv_budget_tokens=4096))
    server, port = await serving.start(service, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            prompt = "the expert layer serves batch tokens"
            sampling = worker_pb2.SamplingParams(max_tokens=8, top_p=1.0, num_beams=3, patience=1.0,
                                                 length_penalty=1.0)

            async def commands():
                yield worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
                    request_id="beam", prompt=prompt, sampling=sampling, priority=2))

            events = [e async for e in stub.Serve(commands())]
        assert len(events) == 1 and events[0].tokens.finished
        ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
        assert list(events[0].tokens.token_ids) == hf_beams(ids, 3, 8, frozenset(loaded.eos_token_ids), 1.0)
        assert events[0].tokens.text
    finally:
        await serving.stop(service, server)
