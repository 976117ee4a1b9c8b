"""Requests whose bytes do not decode get INVALID_ARGUMENT with a message that says why, on every service.

grpc.aio calls a method's request deserializer before the servicer; when protobuf raises DecodeError there
(bytes that are no message of that type, or invalid UTF-8 in a proto3 `string` field) grpc answers
`UNKNOWN "Unexpected <class 'DecodeError'>..."`. `DecodeGuard`, a server interceptor, wraps each method's
deserializer so that a failure becomes a marker value instead, and the method answers INVALID_ARGUMENT
naming the field when one string field is at fault (`prompt: invalid UTF-8 at byte 4`), else the message
type. The servicer itself never sees such a request.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """What a guarded deserializer returns for bytes that are not a valid request."""

    message: str


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def find_bad_utf8(desc: _descriptor.Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first `string` field of `desc` (nested messages included) whose bytes in `data` are
    not UTF-8, with the offset of the bad byte; None when there is none or the bytes are not well-formed."""
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            elif wire_type == 2:
                size, i = _varint(data, i)
                chunk, i = data[i:i + size], i + size
                field = desc.fields_by_number.get(number)
                if field is None:
                    continue
                path = f"{prefix}{field.name}"
                if field.type == _descriptor.FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        return f"{path}: invalid UTF-8 at byte {exc.start}"
                elif field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                    found = find_bad_utf8(field.message_type, chunk, path + ".")
                    if found:
                        return found
            else:
                return None
    except ValueError:
        return None
    return None


def describe(message_type: Any, data: bytes, error: Exception) -> str:
    """The INVALID_ARGUMENT message for bytes that failed to decode as `message_type`."""
    desc = getattr(message_type, "DESCRIPTOR", None)
    if desc is not None:
        bad = find_bad_utf8(desc, data)
        if bad:
            return f"{bad} (string fields must be UTF-8)"
        return f"request: {len(data)} bytes are not a valid {desc.full_name} message ({error})"
    return f"request: {len(data)} bytes could not be decoded ({error})"


def guard_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)  # FromString is a classmethod of the message type

    def guarded(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Undecodable(describe(message_type, data, exc))

    return guarded


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with its deserializer guarded and its behaviour answering INVALID_ARGUMENT to markers."""
    deserializer = guard_deserializer(handler.request_deserializer)
    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream

        async def stream_stream(requests, context):
            result = inner(_checked(requests, context), context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                await _maybe_await(result)

        return handler._replace(request_deserializer=deserializer, stream_stream=stream_stream)
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            return await _maybe_await(inner_su(_checked(requests, context), context))

        return handler._replace(request_deserializer=deserializer, stream_unary=stream_unary)
    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            result = inner_us(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                await _maybe_await(result)

        return handler._replace(request_deserializer=deserializer, unary_stream=unary_stream)
    inner_uu = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await _maybe_await(inner_uu(request, context))

    return handler._replace(request_deserializer=deserializer, unary_unary=unary_unary)


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        return _guard(handler) if handler is not None else None


__all__ = ["DecodeGuard", "Undecodable", "describe", "find_bad_utf8", "guard_deserializer"]
