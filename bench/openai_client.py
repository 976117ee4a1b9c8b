"""Peer mode: the same workload against an OpenAI-compatible server (vLLM, SGLang) through streaming
completions, so one harness measures qllm and a peer.

POST /v1/completions with stream=true, max_tokens, ignore_eos=true, temperature=0 and, per class, vLLM's
integer `priority` (lower is served first; vLLM accepts it only with `--scheduling-policy priority`, so it
can be left out). HTTP/1.1 over asyncio streams: stdlib only. One connection per request (vLLM's benchmark
does the same through aiohttp's pool); closing it is how a cancelled request is aborted on the server.

Tokens: each streamed chunk counts its `token_ids` at its arrival time where the server sends them (the request
asks with vLLM's `return_token_ids`; others ignore the field), else one token per chunk with text (one chunk
per token is what vLLM and SGLang send); the final usage chunk (stream_options.include_usage) corrects the
total. Counting ids matters where a token has no text of its own: vLLM streams a special token such as
<|endoftext|> (which a greedy random-weight model can repeat, ignore_eos being on) or an incomplete UTF-8
byte sequence as a chunk with empty text, which the text rule would miss (a whole request of them had no
TTFT at all).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from urllib.parse import urlsplit

from bench.client import Clock, add_tokens, reconcile_count
from bench.stats import RequestRecord
from bench.workload import BE, LS, RequestSpec

DEFAULT_PRIORITIES = {LS: 0, BE: 1}


def parse_priorities(text: str | None) -> dict[str, int] | None:
    """"LS=0,BE=1" -> {"LS": 0, "BE": 1}; "none" or "" -> None (the field is not sent)."""
    if text is None:
        return dict(DEFAULT_PRIORITIES)
    if text.strip().lower() in ("", "none", "off"):
        return None
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip().upper()
        if key not in (LS, BE) or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--openai-priority {text!r}: expected e.g. LS=0,BE=1 or none")
        out[key] = int(value)
    missing = {LS, BE} - out.keys()
    if missing:
        raise ValueError(f"--openai-priority {text!r}: no value for {', '.join(sorted(missing))}")
    return out


def chunk_tokens(choice: dict) -> int:
    """Output tokens in one streamed choice: its token_ids where the server sends them, else 1 per text."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    return 1 if choice.get("text") else 0


class HTTPError(Exception):
    pass


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise HTTPError("connection closed before a response")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HTTPError(f"bad status line {status_line!r}")
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yields the response body as it arrives: chunked, Content-Length or until close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readline()  # CRLF after the chunk
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(65536, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


class OpenAISender:
    def __init__(self, url: str, model: str, *, priorities: dict[str, int] | None = None,
                 temperature: float = 0.0, ignore_eos: bool = True, api_key: str | None = None,
                 path: str = "/v1/completions"):
        split = urlsplit(url if "://" in url else f"http://{url}")
        if split.scheme not in ("http", "https"):
            raise ValueError(f"--openai-url {url!r}: only http:// and https:// are supported")
        self.scheme = split.scheme
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or (443 if split.scheme == "https" else 80)
        base = split.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.path = base + path
        self.model = model
        self.priorities = priorities
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.api_key = api_key
        self.label = f"{url} ({model})"

    def body(self, spec: RequestSpec) -> dict:
        body = {"model": self.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "stream": True,
                "temperature": self.temperature, "ignore_eos": self.ignore_eos,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if self.priorities is not None:
            body["priority"] = self.priorities[spec.cls]
        return body

    async def send(self, spec: RequestSpec, rec: RequestRecord, now: Clock) -> None:
        payload = json.dumps(self.body(spec)).encode()
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                "Accept: text/event-stream", f"Content-Length: {len(payload)}", "Connection: close"]
        if self.api_key:
            head.append(f"Authorization: Bearer {self.api_key}")
        ctx = ssl.create_default_context() if self.scheme == "https" else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx, limit=1 << 24)
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
            status, headers = await _read_headers(reader)
            if status != 200:
                body = b"".join([c async for c in _body_chunks(reader, headers)])
                rec.error = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
                rec.finished_s = now()
                return
            server_count, done, buf = None, False, b""
            async for data in _body_chunks(reader, headers):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    event = line[5:].strip()
                    if event == b"[DONE]":
                        done = True
                        continue
                    msg = json.loads(event)
                    if "error" in msg and not msg.get("choices"):
                        rec.error = f"server error: {json.dumps(msg['error'])[:300]}"
                        continue
                    for choice in msg.get("choices") or []:
                        add_tokens(rec, chunk_tokens(choice), now())
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
                    usage = msg.get("usage")
                    if usage:
                        server_count = usage.get("completion_tokens")
                        rec.server_prompt_tokens = usage.get("prompt_tokens")
            rec.finished_s = now()
            reconcile_count(rec, server_count)
            if not rec.error and not done and not rec.finish_reason:
                rec.error = "stream ended without [DONE]"
        finally:
            writer.close()  # on cancel too: the server sees the disconnect and aborts the request

    async def close(self) -> None:
        pass
