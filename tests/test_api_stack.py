"""The serving API end to end through router and worker, driven by qllm.client: stop strings and stop tokens
(also for a request parked at layer boundaries under the qllm policy), logprobs, chat and token-id input,
GetModelInfo, field validation, and the client's cancel, deadline, API key, TLS and pacing."""

import asyncio
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from qllm import serving
from qllm.client import Client, QLLMError
from qllm.contract import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from qllm.security import hash_key
from qllm.v1 import common_pb2, router_pb2, router_pb2_grpc
from router import server as router_server
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

GEN_CERTS = Path(__file__).resolve().parents[1] / "deploy" / "tls" / "gen-certs.sh"
PAIRED_KEY, BATCH_KEY = "qllm-test-paced-key", "qllm-test-batch-key"
PROMPT = "Tell me about mixture of experts and how the router picks them."


def make_certs(out: Path) -> Path | None:
    if shutil.which("openssl") is None:
        return None
    subprocess.run(["bash", str(GEN_CERTS), str(out)], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "DAYS": "2"})
    return out


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory):
    """One qllm-policy worker behind two routers: an open plaintext one, and one with API keys (a paced tenant
    at 4 requests/s, burst 2; a BE-only tenant) behind TLS."""
    tmp = tmp_path_factory.mktemp("api")
    servers = []
    worker_service, engine = worker_server.build_service(
        load_model(None), EngineConfig(policy="qllm", kv_budget_tokens=8192, max_num_batched_tokens=64))
    w, wport = await serving.start(worker_service, "127.0.0.1", 0)
    servers.append((worker_service, w))
    r_service, _ = await router_server.build(router_server.default_args(
        workers=f"127.0.0.1:{wport}", predictor="", kvmanager=""))
    r, rport = await serving.start(r_service, "127.0.0.1", 0)
    servers.append((r_service, r))
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({
        "tenants": {"paced": {"priorities": ["LS", "BE"], "rate_limit": {"requests_per_s": 4, "burst": 2}},
                    "batch": {"priorities": ["BE"]}},
        "keys": [{"id": "p", "tenant": "paced", "sha256": hash_key(PAIRED_KEY)},
                 {"id": "b", "tenant": "batch", "sha256": hash_key(BATCH_KEY)}]}))
    certs = make_certs(tmp / "pki")
    secure_args = router_server.default_args(workers=f"127.0.0.1:{wport}", predictor="", kvmanager="",
                                             api_keys=str(keys))
    if certs is not None:
        secure_args.tls_cert, secure_args.tls_key = str(certs / "server.crt"), str(certs / "server.key")
    s_service, _ = await router_server.build(secure_args)
    s, sport = await serving.start(s_service, "127.0.0.1", 0, credentials=serving.credentials_from(secure_args))
    servers.append((s_service, s))
    client = Client(f"127.0.0.1:{rport}")
    yield {"client": client, "engine": engine, "rport": rport, "sport": sport, "certs": certs,
           "tokenizer": engine.tokenizer}
    await client.close()
    for service, server in reversed(servers):
        await serving.stop(service, server)


async def chunks(client, **options):
    return [c async for c in client.generate(**options)]


async def kv_settles(engine, timeout_s=10.0):
    """Waits until the engine holds no request and all KV is free again."""
    alloc = engine.core.allocator
    for _ in range(int(timeout_s / 0.02)):
        if alloc.free_tokens == alloc.capacity_tokens and not engine.core.has_unfinished_requests():
            return True
        await asyncio.sleep(0.02)
    return False


# Seeded sampling: the random-weight default repeats itself under greedy decoding, and a stop string must
# first occur where the test puts it.
SAMPLED = dict(temperature=1.0, seed=11, ignore_eos=True)


async def reference(stack, n=24, prompt=PROMPT):
    """The output without stop conditions: (token ids, text)."""
    got = await chunks(stack["client"], prompt=prompt, max_tokens=n, **SAMPLED)
    ids = [t for c in got for t in c.token_ids]
    return ids, "".join(c.text for c in got)


def stop_across_tokens(tokenizer, ids):
    """A stop string that starts inside one token's text and ends inside the next one's (found at k + 1):
    (stop string, index of the token that completes it, text before it)."""
    for k in range(1, len(ids) - 2):
        before = tokenizer.decode(ids[:k], skip_special_tokens=True)
        upto = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        after = tokenizer.decode(ids[:k + 2], skip_special_tokens=True)
        if len(upto) - len(before) >= 2 and len(after) - len(upto) >= 2 and "\ufffd" not in after:
            stop = upto[-1] + after[len(upto):len(upto) + 1]
            if stop not in after[:len(upto)]:   # its first occurrence is the one across the boundary
                return stop, k + 1, upto[:-1]
    raise AssertionError("no token pair with multi-character texts in the reference output")


# --- stop strings and stop tokens ----------------------------------------------------------------------------
async def test_stop_string_across_tokens_and_messages_is_cut_and_named(stack):
    ids, text = await reference(stack)
    stop, completes_at, before = stop_across_tokens(stack["tokenizer"], ids)
    got = await chunks(stack["client"], prompt=PROMPT, max_tokens=24, stop=[stop, "never-seen"], **SAMPLED)
    assert all(len(c.token_ids) == 1 for c in got)   # one token per message: the match spans two messages
    last = got[-1]
    assert last.finished and last.finish_reason == "stop" and last.stop_string == stop
    assert last.stop_token_id is None
    assert "".join(c.text for c in got) == before == text[:text.index(stop)]
    # Tokens up to the one that completes the match are sent; nothing after it.
    assert [t for c in got for t in c.token_ids] == ids[:completes_at + 1]
    assert not any(c.finished for c in got[:-1])
    assert await kv_settles(stack["engine"])


async def test_stop_token_ends_the_request_even_with_ignore_eos(stack):
    ids, _ = await reference(stack)
    target = ids[5]
    first = ids.index(target)
    got = await chunks(stack["client"], prompt=PROMPT, max_tokens=24, stop_token_ids=[target], **SAMPLED)
    assert [t for c in got for t in c.token_ids] == ids[:first + 1]
    assert got[-1].finish_reason == "stop" and got[-1].stop_token_id == target and got[-1].stop_string is None


async def test_stop_tokens_end_beam_hypotheses(stack):
    plain = await stack["client"].complete(PROMPT, max_tokens=8, ignore_eos=True, num_beams=2)
    target = plain.token_ids[2]
    stopped = await stack["client"].complete(PROMPT, max_tokens=8, ignore_eos=True, num_beams=2,
                                             stop_token_ids=[target])
    assert stopped.finish_reason == "stop" and stopped.stop_token_id == target
    assert stopped.token_ids[-1] == target and len(stopped.token_ids) <= 8


async def test_beam_search_returns_the_best_hypothesis_logprobs(stack):
    plain = await stack["client"].complete(PROMPT, max_tokens=6, ignore_eos=True, num_beams=3)
    got = await chunks(stack["client"], prompt=PROMPT, max_tokens=6, ignore_eos=True, num_beams=3, logprobs=True,
                       top_logprobs=2)
    assert len(got) == 1 and got[0].token_ids == plain.token_ids   # asking for logprobs changes nothing else
    assert [lp.token_id for lp in got[0].logprobs] == list(got[0].token_ids)
    assert all(len(lp.top) == 2 and lp.rank >= 1 and lp.logprob <= lp.top[0].logprob for lp in got[0].logprobs)


async def test_parked_requests_still_stop_at_their_stop_string(stack):
    """BE requests with stop strings run under the qllm policy while the core parks steps at random layer
    boundaries and LS requests arrive (real layer preemptions): each ends at its stop string, and the engine
    frees everything."""
    engine = stack["engine"]
    prompts = [f"{PROMPT} Request {i}." for i in range(4)]
    refs = [await reference(stack, 20, p) for p in prompts]
    stops = [stop_across_tokens(stack["tokenizer"], ids) for ids, _ in refs]
    rng = random.Random(7)
    before = engine.core.num_layer_preemptions
    engine.core.scheduler.should_park = lambda plan: rng.random() < 0.3
    try:
        be = [asyncio.create_task(chunks(stack["client"], prompt=p, max_tokens=20, priority="BE", stop=[s],
                                         **SAMPLED)) for p, (s, _, _) in zip(prompts, stops)]
        ls = [asyncio.create_task(chunks(stack["client"], prompt=f"urgent {i}", max_tokens=4, priority="LS",
                                         ignore_eos=True)) for i in range(4)]
        results = await asyncio.gather(*be, *ls)
    finally:
        del engine.core.scheduler.should_park
    assert engine.core.num_layer_preemptions - before > 5
    for got, (stop, completes_at, text_before), (ids, _) in zip(results, stops, refs):
        assert got[-1].finish_reason == "stop" and got[-1].stop_string == stop
        assert "".join(c.text for c in got) == text_before
        assert [t for c in got for t in c.token_ids] == ids[:completes_at + 1]
    assert all(r[-1].finish_reason == "length" for r in results[len(be):])
    assert await kv_settles(engine)


# --- logprobs --------------------------------------------------------------------------------------------------
async def test_logprobs_come_with_every_token(stack):
    got = await chunks(stack["client"], prompt=PROMPT, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    for c in got:
        assert [lp.token_id for lp in c.logprobs] == list(c.token_ids)
        for lp in c.logprobs:
            assert len(lp.top) == 3 and lp.rank == 1 and lp.top[0].token_id == lp.token_id   # greedy
            assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.logprob <= 0
            assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
            assert lp.token == stack["tokenizer"].decode([lp.token_id])
    plain = await chunks(stack["client"], prompt=PROMPT, max_tokens=6, ignore_eos=True)
    assert all(not c.logprobs for c in plain)
    assert [c.token_ids for c in plain] == [c.token_ids for c in got]


async def test_sampled_token_logprobs_and_rank(stack):
    got = await chunks(stack["client"], prompt=PROMPT, max_tokens=8, ignore_eos=True, temperature=1.5, seed=3,
                       logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
    entries = [lp for c in got for lp in c.logprobs]
    assert len(entries) == 8
    for lp in entries:
        assert len(lp.top) == MAX_TOP_LOGPROBS
        better = sum(1 for t in lp.top if t.logprob > lp.logprob)
        assert lp.rank == better + 1 or (lp.rank > MAX_TOP_LOGPROBS and better == MAX_TOP_LOGPROBS)


# --- input kinds ---------------------------------------------------------------------------------------------
async def test_chat_messages_use_the_chat_template(stack):
    tok = stack["tokenizer"]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name an expert."}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tok.encode(rendered, add_special_tokens=False)
    chat = await stack["client"].complete(messages=messages, max_tokens=6, ignore_eos=True)
    via_chat = await stack["client"].complete(messages=[("system", "You are terse."), ("user", "Name an expert.")],
                                              max_tokens=6, ignore_eos=True)
    pretokenized = await stack["client"].complete(prompt_token_ids=ids, max_tokens=6, ignore_eos=True)
    assert chat.prompt_tokens == len(ids) == pretokenized.prompt_tokens
    assert chat.token_ids == via_chat.token_ids == pretokenized.token_ids
    chunks_ = [c async for c in stack["client"].chat(messages, max_tokens=3, ignore_eos=True)]
    assert chunks_[-1].finished and chunks_[-1].prompt_tokens == len(ids)


async def test_prompt_token_ids_equal_the_prompt(stack):
    ids = stack["tokenizer"].encode(PROMPT, add_special_tokens=False)
    a = await stack["client"].complete(PROMPT, max_tokens=5, ignore_eos=True)
    b = await stack["client"].complete(prompt_token_ids=ids, max_tokens=5, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.text == b.text and a.prompt_tokens == b.prompt_tokens == len(ids)


# --- model info ------------------------------------------------------------------------------------------------
async def test_get_model_info(stack):
    info = await stack["client"].model_info()
    assert info.model_name and info.max_context == 4096 and info.vocab_size == 8192 and info.has_chat_template
    assert list(info.eos_token_ids) == [0]
    assert len(info.workers) == 1 and info.workers[0].policy == "qllm" and info.workers[0].healthy
    assert info.workers[0].kv_capacity_tokens == 8192 and info.workers[0].num_layers == 8
    assert info.limits.max_top_logprobs == MAX_TOP_LOGPROBS and info.limits.max_stop_strings == MAX_STOP_STRINGS
    assert info.limits.max_prompt_bytes == 1 << 20 and info.limits.tenant_requests_per_s == 0
    assert set(info.limits.tenant_priorities) == {common_pb2.PRIORITY_LATENCY_SENSITIVE,
                                                  common_pb2.PRIORITY_BEST_EFFORT}


# --- validation -------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    (dict(prompt="hi", stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (dict(prompt="hi", stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
    (dict(prompt="hi", stop=[""]), "stop"),
    (dict(prompt="hi", stop_token_ids=[9000]), "stop_token_ids"),
    (dict(prompt="hi", logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1), "top_logprobs"),
    (dict(prompt="hi", top_logprobs=2), "top_logprobs"),
    (dict(prompt="hi", messages=[("user", "hi")]), "messages"),
    (dict(prompt="hi", prompt_token_ids=[5, 6]), "prompt_token_ids"),
    (dict(messages=[("user", "hi")], prompt_token_ids=[5]), "prompt_token_ids"),
    (dict(prompt_token_ids=[5, 8192]), "prompt_token_ids"),
    (dict(prompt_token_ids=[5] * 4000, max_tokens=200), "max_tokens"),
    (dict(messages=[("", "hi")]), "messages"),
    (dict(), "prompt"),
    (dict(prompt="hi", num_beams=2, stop=["x"]), "stop"),
]


@pytest.mark.parametrize("fields,field", BAD_FIELDS)
async def test_bad_new_fields_are_invalid_argument_naming_the_field(stack, fields, field):
    fields.setdefault("max_tokens", 4)
    with pytest.raises(QLLMError) as exc:
        await stack["client"].complete(**fields)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.field == field, exc.value.message


async def test_worker_checks_the_new_fields_too(stack):
    """What reaches a worker from another client than the router is checked again there."""
    from qllm.v1 import worker_pb2, worker_pb2_grpc

    info = await stack["client"].model_info()
    bad = [(dict(prompt="hi", prompt_token_ids=[1]), "prompt_token_ids"),
           (dict(prompt_token_ids=[99999]), "prompt_token_ids"),
           (dict(prompt="hi", sampling=dict(stop=["x"] * 99)), "stop"),
           (dict(prompt="hi", sampling=dict(logprobs=True, top_logprobs=50)), "top_logprobs"),
           (dict(prompt="hi", sampling=dict(num_beams=2, stop=["x"])), "stop")]
    async with grpc.aio.insecure_channel(info.workers[0].address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for i, (fields, field) in enumerate(bad):
            sampling = dict(max_tokens=4, top_p=1.0, **fields.pop("sampling", {}))
            submit = worker_pb2.SubmitRequest(request_id=f"bad-{i}", priority=2,
                                              sampling=worker_pb2.SamplingParams(**sampling), **fields)
            call = stub.Serve(iter([worker_pb2.WorkerCommand(submit=submit)]))
            event = await call.read()
            assert event.WhichOneof("kind") == "rejected", event
            assert event.rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert event.rejected.message.startswith(f"{field}:"), event.rejected.message
            call.cancel()


# --- the client -------------------------------------------------------------------------------------------------
async def test_leaving_the_stream_early_cancels_the_request(stack):
    stream = stack["client"].generate(PROMPT * 4, max_tokens=1000, ignore_eos=True, priority="BE")
    async for chunk in stream:
        assert chunk.token_ids
        break
    await stream.aclose()
    assert await kv_settles(stack["engine"])


async def test_breaking_out_of_the_loop_alone_cancels_the_request(stack):
    """No aclose(): the dropped generator is finalized by the event loop, which closes it and the RPC."""
    async for chunk in stack["client"].generate(PROMPT * 4, max_tokens=1000, ignore_eos=True, priority="BE"):
        break
    assert await kv_settles(stack["engine"])


async def test_errors_name_the_field():
    assert QLLMError(grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs: must be at most 20").field == "top_logprobs"
    assert QLLMError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: tenant 'x' is over").field is None


async def test_deadline_is_a_typed_error(stack):
    with pytest.raises(QLLMError) as exc:
        await stack["client"].complete(PROMPT, max_tokens=2000, ignore_eos=True, timeout_s=0.3)
    assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await kv_settles(stack["engine"])


def secure_client(stack, **options) -> Client:
    if stack["certs"] is None:
        return Client(f"127.0.0.1:{stack['sport']}", **options)
    return Client(f"localhost:{stack['sport']}", ca_cert=stack["certs"] / "ca.crt", **options)


async def test_api_key_over_tls(stack):
    if stack["certs"] is None:
        pytest.skip("openssl CLI not available")
    async with secure_client(stack, api_key=BATCH_KEY) as client:
        reply = await client.complete(PROMPT, max_tokens=3, ignore_eos=True, priority="BE")
        assert reply.finish_reason == "length" and len(reply.token_ids) == 3
        with pytest.raises(QLLMError) as exc:
            await client.complete(PROMPT, max_tokens=3, priority="LS")
        assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED and exc.value.field == "priority"
        info = await client.model_info()
        assert list(info.limits.tenant_priorities) == [common_pb2.PRIORITY_BEST_EFFORT]
    async with secure_client(stack) as anonymous:
        with pytest.raises(QLLMError) as exc:
            await anonymous.complete(PROMPT, max_tokens=3)
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(QLLMError) as exc:
            await anonymous.model_info()
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Plaintext against the TLS port does not get through.
    async with Client(f"127.0.0.1:{stack['sport']}", api_key=BATCH_KEY) as plain:
        with pytest.raises(QLLMError) as exc:
            await plain.complete(PROMPT, max_tokens=3, timeout_s=5)
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE


async def test_pacing_waits_for_a_slot_instead_of_resource_exhausted(stack):
    """The tenant may send 4 requests/s with a burst of 2. Unpaced, 8 calls at once mostly bounce; paced to
    the limit the router reports, every one goes through."""
    async def burst(client):
        return await asyncio.gather(*[client.complete(f"{PROMPT} {i}", max_tokens=1, priority="BE")
                                      for i in range(8)], return_exceptions=True)

    async with secure_client(stack, api_key=PAIRED_KEY) as unpaced:
        results = await burst(unpaced)
    refused = [r for r in results if isinstance(r, QLLMError)]
    assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    await asyncio.sleep(1.0)   # the bucket refills
    async with secure_client(stack, api_key=PAIRED_KEY, pacing_headroom=0.2) as paced:
        info = await paced.pace_to_tenant_limit()
        assert info.limits.tenant_requests_per_s == 4 and info.limits.tenant_burst == 2
        results = await burst(paced)
    assert all(not isinstance(r, Exception) and r.finish_reason == "length" for r in results), results


async def test_grpc_wire_carries_logprobs_and_stop(stack):
    """The raw protos, as grpcurl or another language's client sees them."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack['rport']}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        ids, text = await reference(stack, 12)
        msgs = [m async for m in stub.Generate(router_pb2.GenerateRequest(
            prompt=PROMPT, max_tokens=12, logprobs=True, stop_token_ids=[ids[3]], **SAMPLED))]
        assert msgs[-1].WhichOneof("matched_stop") == "stop_token_id" and msgs[-1].stop_token_id == ids[3]
        assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
        info = await stub.GetModelInfo(router_pb2.GetModelInfoRequest())
        assert info.vocab_size == 8192
