"""Requests with bad or edge field values sent through the router: the status each gets, and whether the
fleet still serves afterwards. What a request should get is for the caller to state (tests/test_robustness.py);
nothing here decides it."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
from grpc_health.v1 import health_pb2

from qllm.testing.fleet import LS, Fleet, LoopThread, StreamRecord, run_stream
from qllm.v1 import router_pb2
from router.validation import Limits

# Where the values drawn below cross a limit (the router's defaults; the embedded model's context is the same).
MAX_PROMPT_BYTES = Limits().max_prompt_bytes
MAX_CONTEXT = Limits().max_context
MAX_BEAMS = Limits().max_beams


def base_request(**fields) -> dict:
    """A valid, cheap request (2 tokens), with `fields` replacing its own."""
    return {"prompt": "hello", "max_tokens": 2, "priority": 0, "ignore_eos": True, "request_id": "",
            "program_id": "", "last_turn": False, "num_beams": 0, **fields}


def request_strategy():
    """A valid, cheap request (max_tokens 1-3), then none, one or a few of its fields replaced by a value
    drawn from that field's bad and edge values (some of which are valid)."""
    from hypothesis import strategies as st

    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    edge = st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 1e-40, 3e38, 1.0000001])
    valid = st.fixed_dictionaries({
        "prompt": st.one_of(st.text(min_size=1, max_size=40).filter(str.strip),
                            st.sampled_from(["hello", "<|endoftext|>", "\x00", "\ufeff", "🙂" * 5, "a\u0301" * 3,
                                             "\u202eright to left", "tab\tnew\nline"])),
        "max_tokens": st.integers(1, 3),
        "priority": st.sampled_from([0, 1, 2]),
        "ignore_eos": st.booleans(),
        "request_id": st.one_of(st.just(""), st.text(max_size=12)),
        "program_id": st.one_of(st.just(""), st.text(min_size=1, max_size=8)),
        "last_turn": st.just(False),
        "num_beams": st.sampled_from([0, 0, 1, 2]),
    }, optional={
        "temperature": st.one_of(st.just(0.0), st.floats(0.125, 2.0, width=32)),
        "top_p": st.floats(0.0625, 1.0, width=32),
        "patience": st.floats(0.5, 2.0, width=32),
        "seed": st.integers(0, 2**64 - 1),
        "length_penalty": st.floats(-2.0, 2.0, width=32),
    })
    bad = {
        "prompt": st.one_of(st.just(""), st.text(alphabet=" \t\n\r\u3000\u00a0\u2028\u205f", min_size=1, max_size=8),
                            st.integers(1, 4096).map(lambda k: "x" * (MAX_PROMPT_BYTES + k)),  # over the byte limit
                            # "hello " is two tokens: both over the model context, past the KV budget too
                            st.integers(2100, 2600).map(lambda k: "hello " * k),
                            st.integers(4100, 4200).map(lambda k: "hello " * k)),
        "max_tokens": st.one_of(st.just(0), st.integers(2049, MAX_CONTEXT + 8), st.integers(MAX_CONTEXT, 2**32 - 1)),
        "temperature": st.one_of(edge, f32),
        "top_p": st.one_of(edge, f32),
        "priority": st.one_of(st.integers(3, 2**31 - 1), st.integers(-2**31, -1)),
        "num_beams": st.one_of(st.integers(2, MAX_BEAMS), st.integers(MAX_BEAMS + 1, 2**32 - 1)),
        "patience": st.one_of(edge, f32),
        "last_turn": st.just(True),  # with program_id cleared below
        "request_id": st.integers(257, 1000).map(lambda k: "r" * k),
        "length_penalty": st.one_of(edge, f32),
    }

    @st.composite
    def requests(draw):
        fields = draw(valid)
        for name in draw(st.lists(st.sampled_from(sorted(bad)), max_size=3, unique=True)):
            fields[name] = draw(bad[name])
            if name == "last_turn":
                fields["program_id"] = ""
        return fields

    return requests()


async def send_request(fleet: Fleet, fields: dict, timeout: float = 20.0) -> tuple[str, str]:
    """The status name and details of one Generate call; for a stream that ended without a status: OK when it
    finished properly, FINISHED_<REASON> when it finished with another reason, LOST when it just stopped."""
    last = None
    tokens = 0
    try:
        async for m in fleet.router.Generate(router_pb2.GenerateRequest(**fields), timeout=timeout):
            last = m
            tokens += len(m.token_ids)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    if last is None or not last.finished:
        return "LOST", f"stream ended without a finished message after {tokens} tokens"
    if last.finish_reason not in ("length", "stop") or not 0 < tokens <= fields["max_tokens"]:
        return f"FINISHED_{last.finish_reason.upper()}", f"finish_reason {last.finish_reason!r}, {tokens} tokens"
    return "OK", ""


def _shown(fields: dict) -> dict:
    return {k: (v if not isinstance(v, str) or len(v) < 80 else f"<{len(v)} chars>") for k, v in fields.items()}


def measure_malformed(lt: LoopThread, fleet: Fleet, n: int = 1000, seed: int | None = 0,
                      timeout: float = 20.0) -> dict:
    """Sends n hypothesis-generated requests (request_strategy) through the router, one at a time, and records
    the status each gets; stops early at a DEADLINE_EXCEEDED (a wedged worker would make every later request
    wait out its deadline). Then checks that the fleet still serves and sends a prompt that is not UTF-8."""
    from hypothesis import HealthCheck, Phase, given, settings

    outcomes: list[dict] = []

    class Wedged(Exception):
        pass

    # Generation only: no shrinking, since nothing here fails an example except a wedged worker.
    @settings(max_examples=n, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(request_strategy())
    def probe(fields):
        code, details = lt.run(send_request(fleet, fields, timeout), timeout + 5)
        outcomes.append({"fields": _shown(fields), "code": code, "details": details[:200]})
        if code == "DEADLINE_EXCEEDED":
            raise Wedged(outcomes[-1])

    started = time.monotonic()
    wedged = None
    try:
        probe()
    except Wedged as exc:
        wedged = exc.args[0]
    elapsed = time.monotonic() - started

    healthy, served = lt.run(still_serving(fleet, timeout))
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o["code"]] = by_status.get(o["code"], 0) + 1
    return {"examples": len(outcomes), "by_status": dict(sorted(by_status.items())), "outcomes": outcomes,
            "wedged": wedged, "seconds": round(elapsed, 2), "health_serving_after": healthy,
            "normal_request_after": served, "invalid_utf8_prompt": lt.run(send_invalid_utf8(fleet))}


async def still_serving(fleet: Fleet, timeout: float = 20.0) -> tuple[bool, bool]:
    """Whether the router's health says SERVING, and whether a normal request streams to its end."""
    health = await fleet.health.Check(health_pb2.HealthCheckRequest(service=""))
    rec = await run_stream(fleet.router, StreamRecord("fuzz-after"), timeout=timeout, prompt="a normal request",
                           max_tokens=3, ignore_eos=True, priority=LS)
    return health.status == health_pb2.HealthCheckResponse.SERVING, rec.finished and len(rec.tokens) == 3


async def send_invalid_utf8(fleet: Fleet) -> str:
    """A GenerateRequest whose prompt bytes are not UTF-8 (a client that bypasses protobuf's checks):
    "CODE: details", or OK."""
    raw = router_pb2.GenerateRequest(prompt="PLACEHOLDER", max_tokens=2).SerializeToString()
    raw = raw.replace(b"PLACEHOLDER", b"bad \xff\xfe bytes")  # same length: the length prefix stays right
    call = fleet.channel.unary_stream("/qllm.v1.Router/Generate", request_serializer=lambda b: b,
                                      response_deserializer=router_pb2.GenerateResponse.FromString)
    try:
        async for _ in call(raw, timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


async def measure_bystander(fleet: Fleet, bad_fields: dict, max_tokens: int = 40) -> dict:
    """A normal request streams while a request with `bad_fields` arrives: what each gets."""
    other = StreamRecord("bystander")
    task = asyncio.create_task(run_stream(fleet.router, other, prompt="an innocent request", max_tokens=max_tokens,
                                          ignore_eos=True))
    while not other.tokens and not task.done():
        await asyncio.sleep(0.002)
    fields = {k: v for k, v in bad_fields.items() if k != "request_id"}
    bad = await run_stream(fleet.router, StreamRecord("bad"), timeout=20, **fields)
    await task
    return {"bad": {"code": bad.code or "OK", "finish_reason": bad.finish_reason, "tokens": len(bad.tokens),
                    "details": bad.details},
            "bystander": {"code": other.code or "OK", "finish_reason": other.finish_reason,
                          "tokens": len(other.tokens), "max_tokens": max_tokens}}
