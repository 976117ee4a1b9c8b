"""A typed asyncio client of a qllm deployment (the public qllm.v1.Router service).

    async with Client("127.0.0.1:50051", api_key=KEY) as client:
        async for chunk in client.generate("Tell me about experts.", max_tokens=64, priority="LS", stop=["\\n\\n"]):
            print(chunk.text, end="", flush=True)
        reply = await client.complete(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32)

- Streaming: `generate()` (and `chat()`) yield a `Chunk` per message; leaving the loop early (break, an
  exception, the task cancelled, `aclose()`) cancels the RPC, and the router cancels the request on its
  worker, which frees its KV. `complete()` collects a whole answer.
- Deadline: `timeout_s` per call (or the client's default) is the gRPC deadline; the router uses what is left
  of it for admission (a BE request that would wait longer is refused at once with RESOURCE_EXHAUSTED).
- API key: sent as `authorization: Bearer <key>` (qllm/security.py); TLS and mutual TLS with qllm/tls.py's
  credentials (`tls=True`, `ca_cert`, `client_cert` + `client_key`).
- Pacing: with `max_requests_per_s` (and `burst`) the client waits for a slot before starting a call, with
  asyncio-throttle's Throttler, instead of collecting RESOURCE_EXHAUSTED from the router's per-tenant token
  bucket; `pace_to_tenant_limit()` takes both from the router (GetModelInfo). Waiting is what a client that
  must not exceed its rate wants; the router itself refuses at once rather than queue (qllm/security.py).
- Errors: a failed call raises `QLLMError` with the gRPC status `code`, the `message` and, for bad input,
  the `field` the router named.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Mapping, Sequence

import grpc
from asyncio_throttle import Throttler

from qllm import tls
from qllm.contract import PRIORITY_LABELS, Priority
from qllm.v1 import common_pb2, router_pb2, router_pb2_grpc

# Paced calls start this much under the tenant's rate: the router's bucket sees arrival times, which jitter
# against the client's send times.
DEFAULT_PACING_HEADROOM = 0.05


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int                        # 1 = the model's most likely token
    token: str
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed message: the new text and tokens; the last one has finished=True and the counts."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str               # on the last chunk: "length", "stop", "cancelled", "error"
    request_id: str
    logprobs: tuple[TokenLogprob, ...] = ()   # one per token id, when asked
    stop_string: str | None = None   # the stop string the request ended at (not part of the text)
    stop_token_id: int | None = None  # or the stop token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    request_id: str
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_string: str | None = None
    stop_token_id: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


class QLLMError(Exception):
    """A call the router refused or failed: `code` (grpc.StatusCode), `message`, and `field` when the message
    names one (`top_logprobs: must be at most 20` -> "top_logprobs")."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        head, sep, _ = message.partition(": ")
        self.field = head if sep and head.isidentifier() else None

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> "QLLMError":
        return cls(exc.code(), exc.details() or "")


Message = Mapping[str, str] | tuple[str, str] | common_pb2.ChatMessage


def chat_message(message: Message) -> common_pb2.ChatMessage:
    if isinstance(message, common_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        return common_pb2.ChatMessage(role=message[0], content=message[1])
    return common_pb2.ChatMessage(role=message["role"], content=message["content"])


def _logprobs(entries) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(e.token_id, e.logprob, e.rank, e.token,
                              tuple(TopLogprob(t.token_id, t.logprob, t.token) for t in e.top_logprobs))
                 for e in entries)


def chunk_from_wire(msg: router_pb2.GenerateResponse) -> Chunk:
    matched = msg.WhichOneof("matched_stop")
    return Chunk(msg.text, tuple(msg.token_ids), msg.finished, msg.finish_reason, msg.request_id,
                 _logprobs(msg.logprobs) if msg.logprobs else (),
                 msg.stop_string if matched == "stop_string" else None,
                 msg.stop_token_id if matched == "stop_token_id" else None,
                 msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


class Client:
    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None, tls_enabled: bool = False,
                 ca_cert: str | os.PathLike | None = None, client_cert: str | os.PathLike | None = None,
                 client_key: str | os.PathLike | None = None, server_name: str | None = None,
                 timeout_s: float | None = None, max_requests_per_s: float | None = None, burst: int = 1,
                 pacing_headroom: float = DEFAULT_PACING_HEADROOM,
                 channel_options: Sequence[tuple[str, object]] = ()):
        """target: the router's HOST:PORT. TLS when tls_enabled or any certificate is given (ca_cert None =
        the system trust store). timeout_s: the default deadline of each call (None = none)."""
        credentials = None
        if tls_enabled or ca_cert or client_cert or client_key:
            credentials = tls.channel_credentials(ca_cert or tls.SYSTEM_ROOTS, client_cert, client_key)
        self.target = target
        self.channel = tls.open_channel(target, credentials, channel_options, server_name)
        self._stub = router_pb2_grpc.RouterStub(self.channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s
        self.pacing_headroom = pacing_headroom
        self.throttler: Throttler | None = None
        if max_requests_per_s:
            self.pace(max_requests_per_s, burst)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    # --- pacing ---------------------------------------------------------------------------------------------
    def pace(self, max_requests_per_s: float, burst: float = 1) -> None:
        """Starts at most `burst` calls in any window of burst / rate seconds (a little under the rate, by
        pacing_headroom): never more than a token bucket of that rate and burst lets through, so the router's
        rate limit is not hit; calls past it wait for a slot."""
        slots = max(1, int(burst))
        rate = max_requests_per_s * (1.0 - self.pacing_headroom)
        self.throttler = Throttler(rate_limit=slots, period=slots / rate)

    async def pace_to_tenant_limit(self) -> router_pb2.ModelInfo:
        """Paces to the rate limit the router enforces on this client's key (none: no pacing)."""
        info = await self.model_info()
        if info.limits.tenant_requests_per_s > 0:
            self.pace(info.limits.tenant_requests_per_s, info.limits.tenant_burst or 1)
        else:
            self.throttler = None
        return info

    async def _wait_for_slot(self) -> None:
        if self.throttler is not None:
            await self.throttler.acquire()

    # --- calls ----------------------------------------------------------------------------------------------
    async def model_info(self, timeout_s: float | None = None) -> router_pb2.ModelInfo:
        """Router/GetModelInfo: the served model, its context and vocabulary, whether it has a chat template,
        the workers and their policies, and the limits the router enforces (this key's rate included)."""
        try:
            return await self._stub.GetModelInfo(router_pb2.GetModelInfoRequest(), metadata=self._metadata,
                                                 timeout=timeout_s if timeout_s is not None else self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise QLLMError.from_rpc(exc) from None

    async def generate(self, prompt: str | None = None, *, messages: Iterable[Message] | None = None,
                       prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                       priority: str | int | None = None, temperature: float = 0.0, top_p: float | None = None,
                       seed: int | None = None, ignore_eos: bool = False, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), logprobs: bool = False, top_logprobs: int = 0,
                       num_beams: int = 0, patience: float | None = None, length_penalty: float | None = None,
                       request_id: str = "", program_id: str = "", last_turn: bool = False, tool_name: str = "",
                       timeout_s: float | None = None) -> AsyncIterator[Chunk]:
        """Streams one request's chunks. Give exactly one of prompt, messages, prompt_token_ids. priority:
        "LS", "BE", a qllm.v1.Priority value, or None (the router's default class)."""
        if priority is None:
            priority = common_pb2.PRIORITY_UNSPECIFIED
        elif not isinstance(priority, int):
            if priority not in PRIORITY_LABELS:
                raise ValueError(f"priority: {priority!r} is not one of 'LS', 'BE', None or a qllm.v1.Priority value")
            priority = Priority.from_label(priority)
        request = router_pb2.GenerateRequest(
            prompt=prompt or "", messages=[chat_message(m) for m in messages or ()],
            prompt_token_ids=prompt_token_ids or (), max_tokens=max_tokens,
            priority=priority, temperature=temperature,
            ignore_eos=ignore_eos, stop=stop, stop_token_ids=stop_token_ids, logprobs=logprobs,
            top_logprobs=top_logprobs, num_beams=num_beams, request_id=request_id, program_id=program_id,
            last_turn=last_turn, tool_name=tool_name)
        for name, value in (("top_p", top_p), ("seed", seed), ("patience", patience),
                            ("length_penalty", length_penalty)):
            if value is not None:
                setattr(request, name, value)
        async with contextlib.aclosing(self.generate_raw(request, timeout_s)) as messages_in:
            async for msg in messages_in:
                yield chunk_from_wire(msg)

    async def generate_raw(self, request: router_pb2.GenerateRequest,
                           timeout_s: float | None = None) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Router/Generate with a ready-made request, yielding the wire messages as they come (the bench's
        path: no conversion per message). Pacing, deadline, key, errors and cancel-on-exit as generate()."""
        await self._wait_for_slot()
        call = self._stub.Generate(request, metadata=self._metadata,
                                   timeout=timeout_s if timeout_s is not None else self.timeout_s)
        try:
            async for msg in call:
                yield msg
        except grpc.aio.AioRpcError as exc:
            raise QLLMError.from_rpc(exc) from None
        finally:
            # Left early (break, exception, cancellation, aclose): the router cancels the request on its worker.
            call.cancel()

    def chat(self, messages: Iterable[Message], **options) -> AsyncIterator[Chunk]:
        """generate() over chat messages ({"role", "content"} mappings or (role, content) pairs), rendered with
        the served model's chat template."""
        return self.generate(messages=messages, **options)

    async def complete(self, prompt: str | None = None, **options) -> Completion:
        """A whole answer: generate() collected."""
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        last: Chunk | None = None
        async for chunk in self.generate(prompt, **options):
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            last = chunk
        if last is None or not last.finished:
            raise QLLMError(grpc.StatusCode.UNKNOWN, "the stream ended without a finished message")
        return Completion("".join(texts), tuple(token_ids), last.finish_reason, last.request_id, tuple(logprobs),
                          last.stop_string, last.stop_token_id, last.prompt_tokens, last.completion_tokens,
                          last.cached_prompt_tokens)


__all__ = ["Chunk", "Client", "Completion", "QLLMError", "TokenLogprob", "TopLogprob", "chat_message"]
