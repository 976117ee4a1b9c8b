"""Client-chosen ids are labels; the ids inside qllm are the router's (pure; no gRPC).

A client names its request (`request_id`) and its agent program (`program_id`) as it likes, and two
tenants may pick the same names. Inside the system (the router's queues and worker streams, the worker's
engine and pins, the kvmanager's ledger) a request is known by an id unique to this router and a program
by a key of its tenant, so one tenant's names can never reach another's request or pinned KV:

    request: "<tenant>/<nonce>/<client id>"   nonce: this router's random prefix + a counter
    program: "<tenant>/<program id>"

Tenant names never contain "/" (qllm/security.py), so neither can be forged by a client's choice of name.
The router's logs and its responses keep the client's own id.
"""

from __future__ import annotations

import itertools
import secrets

SEP = "/"


class RequestIds:
    """Mints the internal request ids of one router. The random prefix keeps ids of routers that share
    workers apart; the counter makes them unique within this router."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix if prefix is not None else secrets.token_hex(4)
        self._counter = itertools.count()

    def new(self, tenant: str, client_id: str) -> str:
        return f"{tenant}{SEP}{self.prefix}{next(self._counter):x}{SEP}{client_id}"


def client_id_of(internal_id: str) -> str:
    """The id the client sent (or the router made for it) inside an internal request id."""
    parts = internal_id.split(SEP, 2)
    return parts[2] if len(parts) == 3 else internal_id


def program_key(tenant: str, program_id: str) -> str:
    """The program's key inside qllm: the same program_id of two tenants names two programs."""
    return f"{tenant}{SEP}{program_id}" if program_id else ""
