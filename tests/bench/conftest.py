"""Fixtures for the bench harness tests: a tiny shared-data folder, a tiny byte-level BPE tokenizer, and an
in-process fake qllm.v1.Router whose latencies are scripted, so measured figures can be checked."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import grpc
import pytest

from qllm.v1 import common_pb2, router_pb2, router_pb2_grpc

WORDS = ("the model serves latency sensitive traffic while best effort jobs wait in a queue for their turn "
         "café naïve 中文 数据 emoji 🙂 résumé scheduling preemption layer boundary kv cache token").split()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A shared/data look-alike: Azure-style and Mooncake-style traces and a ShareGPT-style prompt file."""
    root = tmp_path_factory.mktemp("shared_data")
    (root / "traces").mkdir()
    (root / "prompts").mkdir()
    rng = random.Random(7)
    t = 0.0
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for _ in range(300):
        t += rng.expovariate(5.0)
        whole = int(t)
        frac = f"{t - whole:.7f}"[2:]
        hh, mm, ss = 18 + whole // 3600, (whole // 60) % 60, whole % 60
        lines.append(f"2023-11-16 {hh:02d}:{mm:02d}:{ss:02d}.{frac},{rng.randint(50, 4000)},{rng.randint(1, 700)}")
    (root / "traces" / "azure_llm_2023_conv.csv").write_text("\n".join(lines) + "\n")
    (root / "traces" / "azure_llm_2023_code.csv").write_text("\n".join(lines) + "\n")
    with open(root / "traces" / "mooncake_conversation_trace.jsonl", "w") as f:
        ms = 0
        for _ in range(300):
            ms += int(rng.expovariate(3.0) * 1000)
            f.write(json.dumps({"timestamp": ms, "input_length": rng.randint(500, 20000),
                                "output_length": rng.randint(1, 1200), "hash_ids": [1, 2]}) + "\n")
    with open(root / "prompts" / "sharegpt_v3_first_turn_pairs.jsonl", "w") as f:
        for i in range(60):
            n = rng.choice([3, 8, 20, 60, 200])
            f.write(json.dumps({"id": f"p{i}_0", "prompt": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data, tmp_path_factory):
    """A byte-level BPE trained on the fixture prompts (what the embedded tokenizer is like, only smaller)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bench.tokens import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [json.loads(line)["prompt"] for line in
             open(tiny_data / "prompts" / "sharegpt_v3_first_turn_pairs.jsonl")]
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer.from_file(path)


@dataclass
class Script:
    """Scripted behaviour of the fake router, per class: time to first token, then one message per
    `tokens_per_message` tokens every `tpot_s * tokens_per_message`, on an absolute schedule (no drift)."""

    ttft_s: dict = field(default_factory=lambda: {common_pb2.PRIORITY_LATENCY_SENSITIVE: 0.08,
                                                  common_pb2.PRIORITY_BEST_EFFORT: 0.15})
    tpot_s: dict = field(default_factory=lambda: {common_pb2.PRIORITY_LATENCY_SENSITIVE: 0.01,
                                                  common_pb2.PRIORITY_BEST_EFFORT: 0.02})
    tokens_per_message: int = 1
    seen: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)


class FakeRouter(router_pb2_grpc.RouterServicer):
    def __init__(self, script: Script):
        self.script = script

    async def Generate(self, request, context):
        s = self.script
        s.seen.append(request)
        if "FAIL" in request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: scripted failure")
        start = time.perf_counter()
        ttft, tpot = s.ttft_s[request.priority], s.tpot_s[request.priority]
        sent = 0
        try:
            while sent < request.max_tokens:
                n = min(s.tokens_per_message, request.max_tokens - sent)
                due = start + ttft + (sent + n - 1) * tpot
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                sent += n
                last = sent == request.max_tokens
                yield router_pb2.GenerateResponse(
                    text="x" * n, token_ids=list(range(sent - n, sent)), finished=last,
                    finish_reason="length" if last else "", request_id=request.request_id,
                    prompt_tokens=7 if last else 0, completion_tokens=sent if last else 0)
        except asyncio.CancelledError:
            s.cancelled.append(request.request_id)
            raise


@pytest.fixture
async def fake_router():
    """(address, script) of a running fake Router; the script can be changed before requests are sent."""
    script = Script()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(FakeRouter(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        await server.stop(0)
