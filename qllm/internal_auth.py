"""Authentication between qllm's own services: a shared internal token in call metadata.

The router's public API has its tenants' API keys (qllm/security.py). The internal RPCs (Worker/*,
KVManager/*, the Predictor's methods other than RankLengths) are called only by qllm's services, so they
take one shared secret instead, sent by every internal client as `x-qllm-internal-token` metadata:

    token = InternalToken.from_file("/run/credentials/.../internal-token")   # --internal-token-file
    service.internal_token = token                                          # the server checks it
    channel = tls.open_channel(target, creds, interceptors=client_interceptors(token))

A call without the token, or with a wrong one, to an internal method is UNAUTHENTICATED. Health checking
and reflection stay open (probes, grpcurl `list`). Mutual TLS (--tls-client-ca) authenticates the peer as
well, and both may be used together.

Rotation without downtime: the token file holds one token per line. Every token in the file is accepted;
the first is the one this service presents. To rotate, (1) add the new token as a second line everywhere,
(2) move it to the first line everywhere, (3) remove the old line. Services re-read the file when it
changes (a stat per call, as qllm/tls.py does for certificates), so no restart is needed.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Callable, Sequence

import grpc

METADATA_KEY = "x-qllm-internal-token"


class InternalTokenError(ValueError):
    """The token file is unusable; the message starts with the flag's name."""


def generate_token() -> str:
    """A new random internal token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def write_token_file(path: str | os.PathLike, token: str | None = None) -> str:
    """Writes a token file readable by its owner only and returns the token."""
    token = token or generate_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _parse(text: str, where: str) -> tuple[str, ...]:
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise InternalTokenError(f"--internal-token-file: {where} holds no token")
    for token in tokens:
        if len(token) < 16 or not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
            raise InternalTokenError(f"--internal-token-file: {where}: a token is 16 or more printable ASCII "
                                     "characters without spaces")
    return tokens


class InternalToken:
    """The accepted internal tokens (the first is presented), from a literal or from a file re-read on change."""

    def __init__(self, tokens: Sequence[str] | str, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._tokens = _parse("\n".join([tokens] if isinstance(tokens, str) else tokens), str(path or "token"))
        self._signature = self._stat()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "InternalToken":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InternalTokenError(f"--internal-token-file: cannot read {path}: {exc}") from exc
        return cls(text, path)

    def _stat(self):
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        if self.path is None:
            return
        signature = self._stat()
        if signature == self._signature or signature is None:
            return
        try:
            self._tokens = _parse(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError, InternalTokenError):
            return  # mid-rotation or broken: keep the tokens in use
        self._signature = signature

    @property
    def current(self) -> str:
        """The token this service presents."""
        self._refresh()
        return self._tokens[0]

    def accepts(self, presented: str | bytes | None) -> bool:
        if not presented:
            return False
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "replace")
        self._refresh()
        ok = False
        for token in self._tokens:  # every token compared in constant time, whatever matched before
            ok |= hmac.compare_digest(token.encode(), presented)
        return ok


def from_args(args) -> InternalToken | None:
    """The token a service's --internal-token-file names; None when unset (internal RPCs open)."""
    path = getattr(args, "internal_token_file", None)
    return InternalToken.from_file(path) if path else None


# --- client side: every call a service makes carries the token -----------------------------------------------

def _with_token(details: grpc.aio.ClientCallDetails, token: InternalToken) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[METADATA_KEY] = token.current
    return details._replace(metadata=metadata)


class _AddToken:
    def __init__(self, token: InternalToken):
        self.token = token


# One class per call shape: grpc.aio files each channel interceptor under the first shape it implements only.
class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def client_interceptors(token: InternalToken | None) -> list:
    """Interceptors for a grpc.aio channel to another qllm service ([] without a token)."""
    if token is None:
        return []
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


# --- server side ---------------------------------------------------------------------------------------------

def _token_of(metadata) -> str | bytes | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without running it."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as the streaming handler it replaces

    behavior = refuse_stream if handler.response_streaming else refuse
    kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
            (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
    return handler._replace(**{kind: behavior})


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to internal methods that do not carry an accepted internal token."""

    def __init__(self, token: InternalToken, is_internal: Callable[[str], bool]):
        self.token = token
        self.is_internal = is_internal

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not self.is_internal(details.method):
            return handler
        presented = _token_of(details.invocation_metadata)
        if self.token.accepts(presented):
            return handler
        why = "missing" if presented is None else "wrong"
        return _refusal(handler, f"{METADATA_KEY}: {why} internal token; {details.method} is internal to qllm")


__all__ = ["METADATA_KEY", "InternalAuthInterceptor", "InternalToken", "InternalTokenError", "client_interceptors",
           "from_args", "generate_token", "write_token_file"]
