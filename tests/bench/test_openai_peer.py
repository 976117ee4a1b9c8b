"""Peer mode against a tiny fake OpenAI-compatible server streaming SSE (chunked), like vLLM's."""

import asyncio
import json
import time

import pytest

from bench.client import replay
from bench.openai_client import OpenAISender, parse_priorities
from bench.workload import BE, LS, RequestSpec

TTFT, TPOT = 0.06, 0.01


class FakeOpenAI:
    def __init__(self, chunked=True, status=200, token_ids=False, empty_text=0):
        self.token_ids = token_ids  # send each chunk's token_ids (vLLM's return_token_ids)
        self.empty_text = empty_text  # the first N tokens stream with empty text (a special token, as vLLM does)
        self.chunked = chunked
        self.status = status
        self.bodies = []
        self.paths = []
        self.disconnects = 0

    async def handle(self, reader, writer):
        start = time.perf_counter()
        line = await reader.readline()
        self.paths.append(line.split()[1].decode())
        length = 0
        while (h := await reader.readline()) not in (b"\r\n", b""):
            if h.lower().startswith(b"content-length:"):
                length = int(h.split(b":")[1])
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        if self.status != 200:
            msg = json.dumps({"error": {"message": "priority not supported"}}).encode()
            writer.write(f"HTTP/1.1 {self.status} Bad Request\r\nContent-Length: {len(msg)}\r\n\r\n".encode() + msg)
            await writer.drain()
            writer.close()
            return
        headers = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        headers += "Transfer-Encoding: chunked\r\n\r\n" if self.chunked else "Connection: close\r\n\r\n"
        writer.write(headers.encode())

        def emit(obj):
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data)

        try:
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(max(0.0, start + TTFT + i * TPOT - time.perf_counter()))
                choice = {"index": 0, "text": "" if i < self.empty_text else f" t{i}",
                          "finish_reason": "length" if i == n - 1 else None}
                if self.token_ids:
                    choice["token_ids"] = [0 if i < self.empty_text else 100 + i]
                emit({"id": "c", "object": "text_completion", "choices": [choice]})
                await writer.drain()
            emit({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}})
            emit("[DONE]")
            if self.chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnects += 1
        finally:
            writer.close()


async def _serve(fake):
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("chunked", [True, False])
async def test_peer_stream_timings_and_priorities(chunked):
    fake = FakeOpenAI(chunked=chunked)
    server, port = await _serve(fake)
    try:
        sender = OpenAISender(f"http://127.0.0.1:{port}/v1", "tiny-moe", priorities=parse_priorities("LS=0,BE=5"))
        specs = [RequestSpec(0, LS, 0.0, "hi there", 2, 6, 0, 0), RequestSpec(1, BE, 0.03, "long one", 2, 9, 0, 0)]
        recs = await replay(sender, specs, duration_s=0.1, drain_cap_s=5, progress=False)
    finally:
        server.close()
        await server.wait_closed()
    assert fake.paths == ["/v1/completions"] * 2
    by_prompt = {b["prompt"]: b for b in fake.bodies}
    assert by_prompt["hi there"]["priority"] == 0 and by_prompt["long one"]["priority"] == 5
    for b in fake.bodies:
        assert b["stream"] is True and b["ignore_eos"] is True and b["model"] == "tiny-moe"
    for spec, r in zip(specs, recs):
        assert r.completed and not r.error, r.error
        assert r.output_tokens == spec.max_tokens and r.server_prompt_tokens == 5
        assert r.finish_reason == "length"
        assert TTFT - 0.002 <= r.ttft_s <= TTFT + 0.03
        assert r.tpot_s == pytest.approx(TPOT, abs=0.004)


@pytest.mark.parametrize("token_ids", [True, False])
async def test_peer_counts_tokens_without_text_by_their_ids(token_ids):
    """vLLM streams <|endoftext|> (skipped special token) as a chunk with empty text and its token_ids: the
    first token is the first chunk, not the first text; a server without token_ids falls back to text."""
    fake = FakeOpenAI(token_ids=token_ids, empty_text=3)
    server, port = await _serve(fake)
    try:
        sender = OpenAISender(f"http://127.0.0.1:{port}/v1", "m")
        (r,) = await replay(sender, [RequestSpec(0, LS, 0.0, "x", 1, 8, 0, 0)], duration_s=0.1, drain_cap_s=5,
                            progress=False)
    finally:
        server.close()
        await server.wait_closed()
    assert fake.bodies[0]["return_token_ids"] is True
    assert r.completed and r.output_tokens == 8  # usage reconciles the count either way
    if token_ids:
        assert TTFT - 0.002 <= r.ttft_s <= TTFT + 0.03
        assert r.tpot_s == pytest.approx(TPOT, abs=0.004)
    else:
        assert r.ttft_s >= TTFT + 3 * TPOT - 0.002  # the text rule sees the first token late


async def test_peer_http_error_and_no_priority():
    fake = FakeOpenAI(status=400)
    server, port = await _serve(fake)
    try:
        sender = OpenAISender(f"http://127.0.0.1:{port}", "m", priorities=parse_priorities("none"))
        (r,) = await replay(sender, [RequestSpec(0, BE, 0.0, "x", 1, 3, 0, 0)], duration_s=0.1, drain_cap_s=2,
                            progress=False)
    finally:
        server.close()
        await server.wait_closed()
    assert "priority" not in fake.bodies[0]
    assert r.error.startswith("HTTP 400") and "priority not supported" in r.error


async def test_peer_cancel_at_drain_cap_disconnects():
    fake = FakeOpenAI()
    server, port = await _serve(fake)
    try:
        sender = OpenAISender(f"http://127.0.0.1:{port}", "m")
        (r,) = await replay(sender, [RequestSpec(0, BE, 0.0, "x", 1, 400, 0, 0)], duration_s=0.05,
                            drain_cap_s=0.2, progress=False)
        for _ in range(50):
            if fake.disconnects:
                break
            await asyncio.sleep(0.02)
    finally:
        server.close()
        await server.wait_closed()
    assert r.cancelled and 0 < r.output_tokens < 400
    assert fake.disconnects == 1


def test_parse_priorities():
    assert parse_priorities(None) == {"LS": 0, "BE": 1}
    assert parse_priorities("ls=-1,be=3") == {"LS": -1, "BE": 3}
    assert parse_priorities("none") is None
    with pytest.raises(ValueError, match="no value for BE"):
        parse_priorities("LS=0")
    with pytest.raises(ValueError):
        parse_priorities("XX=1,BE=2")
