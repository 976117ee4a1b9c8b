"""API keys, tenants, the priority classes each tenant may use, and per-tenant request-rate limits.

Pure code: no gRPC server here. The router calls it from its handler:

    tenant = keyring.authenticate(context.invocation_metadata())   # AuthError UNAUTHENTICATED / PERMISSION_DENIED
    if not limiter.try_acquire(tenant): abort RESOURCE_EXHAUSTED     # at once, never queued
    tenant.check_priority("LS" | "BE")                               # AuthError PERMISSION_DENIED ("priority: ...")

`AuthError.code` is the name of a `grpc.StatusCode` member, so `grpc.StatusCode[err.code]` maps it.

Clients send `authorization: Bearer <key>` as request metadata. The key file maps the SHA-256 of each key
(never the key itself) to a tenant; JSON, or TOML when the file name ends in `.toml`:

    {
      "tenants": {
        "chat":  {"priorities": ["LS", "BE"], "rate_limit": {"requests_per_s": 50, "burst": 100}},
        "batch": {"priorities": ["BE"],       "rate_limit": {"requests_per_s": 5}},
        "ops":   {"priorities": ["LS", "BE"]}
      },
      "keys": [
        {"id": "chat-2026-01", "tenant": "chat",  "sha256": "<64 hex digits: hash_key(key)>"},
        {"id": "batch-1",      "tenant": "batch", "sha256": "...", "expires": "2027-01-01T00:00:00Z"}
      ]
    }

A tenant without `rate_limit` is not limited; `burst` defaults to max(1, requests_per_s). A tenant with
`"enabled": false` is refused with PERMISSION_DENIED (its keys stay known, so the answer says why); an
expired key is UNAUTHENTICATED. `generate_key()` makes a new key and `hash_key(key)` its file entry.

The rate limit is a token bucket per tenant rather than asyncio-throttle's Throttler: the Throttler only
offers `acquire()`, which sleeps until a slot frees, and the router must answer RESOURCE_EXHAUSTED at once
beyond the limit instead of queueing the request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from qllm.contract import PRIORITY_LABELS

KEY_PREFIX = "qllm_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class AuthError(Exception):
    """A refused request. `code` is "UNAUTHENTICATED", "PERMISSION_DENIED" or "RESOURCE_EXHAUSTED"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class KeyFileError(ValueError):
    """The key file is malformed; the message starts with the path of the offending field."""


def hash_key(key: str) -> str:
    """The key file entry (`sha256`) for an API key: lowercase hex SHA-256 of its UTF-8 bytes."""
    if not key:
        raise ValueError("key: empty")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key (256 bits, URL-safe), to hand to a client; store only `hash_key()` of it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class RateLimit:
    requests_per_s: float
    burst: float


@dataclass(frozen=True)
class Tenant:
    name: str
    priorities: frozenset[str] = frozenset(PRIORITY_LABELS)
    rate_limit: RateLimit | None = None
    enabled: bool = True

    def may_use(self, priority_label: str) -> bool:
        return priority_label in self.priorities

    def check_priority(self, priority_label: str) -> None:
        """Raises AuthError PERMISSION_DENIED, naming the field `priority`, when the tenant may not use it."""
        if priority_label not in PRIORITY_LABELS:
            raise AuthError("PERMISSION_DENIED", f"priority: unknown class {priority_label!r} (LS or BE)")
        if priority_label not in self.priorities:
            allowed = ", ".join(p for p in PRIORITY_LABELS if p in self.priorities) or "none"
            raise AuthError("PERMISSION_DENIED",
                            f"priority: tenant {self.name!r} may not use {priority_label} (allowed: {allowed})")


ANONYMOUS = Tenant("anonymous")


@dataclass(frozen=True)
class _Key:
    id: str
    tenant: str
    digest: bytes  # raw 32-byte SHA-256
    expires: datetime | None = None


@dataclass
class KeyRing:
    """The known keys and tenants. `open` = no key file: everyone is `ANONYMOUS`, all classes, no limit."""

    tenants: dict[str, Tenant] = field(default_factory=dict)
    keys: list[_Key] = field(default_factory=list)
    open: bool = False
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant:
        """The tenant whose key is in `authorization: Bearer <key>`; AuthError otherwise."""
        if self.open:
            return ANONYMOUS
        key = bearer_token(metadata)
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: _Key | None = None
        # Every stored digest is compared, in constant time, whatever matched before.
        for candidate in self.keys:
            if hmac.compare_digest(candidate.digest, digest):
                found = candidate
        if found is None:
            raise AuthError("UNAUTHENTICATED", "authorization: unknown API key")
        if found.expires is not None and self.clock() >= found.expires:
            raise AuthError("UNAUTHENTICATED", f"authorization: API key {found.id!r} expired")
        tenant = self.tenants[found.tenant]
        if not tenant.enabled:
            raise AuthError("PERMISSION_DENIED", f"authorization: tenant {tenant.name!r} is disabled")
        return tenant


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The key of the single `authorization: Bearer <key>` entry; AuthError UNAUTHENTICATED otherwise."""
    values = [v for k, v in (metadata or ()) if isinstance(k, str) and k.lower() == "authorization"]
    if not values:
        raise AuthError("UNAUTHENTICATED", "authorization: missing API key (send 'authorization: Bearer <key>')")
    if len(values) > 1:
        raise AuthError("UNAUTHENTICATED", "authorization: more than one authorization entry")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = str(value).strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("UNAUTHENTICATED", "authorization: expected 'Bearer <key>'")
    return token


def open_access() -> KeyRing:
    """No key file: every request is `ANONYMOUS`, may use LS and BE, and is not rate limited.
    The caller should log a loud warning: anyone who reaches the port may send LS traffic."""
    return KeyRing(open=True)


# --- key file -------------------------------------------------------------------------------------------

def load_key_file(path: str | Path) -> KeyRing:
    """Reads a key file (JSON, or TOML for `*.toml`). KeyFileError names the bad field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"api-keys: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise KeyFileError(f"api-keys: {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") \
            from exc
    return parse_key_file(data)


def parse_key_file(data: Any) -> KeyRing:
    """Builds a KeyRing from the parsed key file; see the module docstring for the format."""
    _expect(data, Mapping, "(top level)", "an object")
    _no_unknown(data, {"version", "tenants", "keys"}, "")
    if data.get("version", 1) != 1:
        raise KeyFileError(f"version: unsupported {data['version']!r} (1)")
    tenants_raw = data.get("tenants")
    _expect(tenants_raw, Mapping, "tenants", "an object of tenant name -> settings")
    tenants = {name: _parse_tenant(name, spec) for name, spec in tenants_raw.items()}
    keys_raw = data.get("keys", [])
    _expect(keys_raw, list, "keys", "a list")
    keys: list[_Key] = []
    seen_ids: set[str] = set()
    seen_digests: set[bytes] = set()
    for i, spec in enumerate(keys_raw):
        where = f"keys[{i}]"
        _expect(spec, Mapping, where, "an object")
        _no_unknown(spec, {"id", "tenant", "sha256", "expires"}, where)
        key_id = spec.get("id", f"#{i}")
        _expect(key_id, str, f"{where}.id", "a string")
        if key_id in seen_ids:
            raise KeyFileError(f"{where}.id: duplicate id {key_id!r}")
        seen_ids.add(key_id)
        tenant = spec.get("tenant")
        _expect(tenant, str, f"{where}.tenant", "a tenant name")
        if tenant not in tenants:
            raise KeyFileError(f"{where}.tenant: unknown tenant {tenant!r}")
        digest_hex = spec.get("sha256")
        _expect(digest_hex, str, f"{where}.sha256", "64 hex digits")
        digest_hex = digest_hex.strip().lower()
        if not _HEX64.match(digest_hex):
            raise KeyFileError(f"{where}.sha256: expected 64 hex digits (hash_key(key)), not the key itself")
        digest = bytes.fromhex(digest_hex)
        if digest in seen_digests:
            raise KeyFileError(f"{where}.sha256: the same key is listed twice")
        seen_digests.add(digest)
        keys.append(_Key(key_id, tenant, digest, _parse_time(spec.get("expires"), f"{where}.expires")))
    return KeyRing(tenants=tenants, keys=keys)


def _parse_tenant(name: Any, spec: Any) -> Tenant:
    where = f"tenants.{name}"
    if not isinstance(name, str) or not _TENANT_NAME.match(name):
        raise KeyFileError(f"{where}: tenant names are 1-63 of A-Z a-z 0-9 _ . -")
    _expect(spec, Mapping, where, "an object")
    _no_unknown(spec, {"priorities", "rate_limit", "enabled"}, where)
    prios = spec.get("priorities", list(PRIORITY_LABELS))
    _expect(prios, list, f"{where}.priorities", 'a list of "LS" and/or "BE"')
    for j, p in enumerate(prios):
        if p not in PRIORITY_LABELS:
            raise KeyFileError(f"{where}.priorities[{j}]: unknown class {p!r} (LS or BE)")
    enabled = spec.get("enabled", True)
    _expect(enabled, bool, f"{where}.enabled", "true or false")
    limit = None
    if spec.get("rate_limit") is not None:
        rl = spec["rate_limit"]
        _expect(rl, Mapping, f"{where}.rate_limit", "an object")
        _no_unknown(rl, {"requests_per_s", "burst"}, f"{where}.rate_limit")
        rate = rl.get("requests_per_s")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise KeyFileError(f"{where}.rate_limit.requests_per_s: expected a number > 0, got {rate!r}")
        burst = rl.get("burst", max(1.0, float(rate)))
        if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not burst >= 1:
            raise KeyFileError(f"{where}.rate_limit.burst: expected a number >= 1, got {burst!r}")
        limit = RateLimit(float(rate), float(burst))
    return Tenant(name=name, priorities=frozenset(prios), rate_limit=limit, enabled=enabled)


def _parse_time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):  # TOML has native datetimes
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise KeyFileError(f"{where}: expected an ISO 8601 time, got {value!r}") from exc
    else:
        raise KeyFileError(f"{where}: expected an ISO 8601 time, got {value!r}")
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _expect(value: Any, kind: Any, where: str, what: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise KeyFileError(f"{where}: expected {what}, got {value!r}")


def _no_unknown(obj: Mapping, known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise KeyFileError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


# --- rate limiting --------------------------------------------------------------------------------------

@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """A token bucket per tenant: `requests_per_s` refill, `burst` capacity, starting full.

    `try_acquire` never waits: it takes a token and answers True, or answers False when the bucket is empty
    (the caller answers RESOURCE_EXHAUSTED). Tenants without a rate limit always pass. Single event loop,
    no locking; `clock` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _refill(self, tenant: Tenant) -> _Bucket | None:
        limit = tenant.rate_limit
        if limit is None:
            return None
        now = self._clock()
        bucket = self._buckets.get(tenant.name)
        if bucket is None:
            bucket = self._buckets[tenant.name] = _Bucket(limit.burst, now)
        else:
            # min(): a changed (reloaded) limit takes effect at once.
            bucket.tokens = min(limit.burst, bucket.tokens + (now - bucket.stamp) * limit.requests_per_s)
            bucket.stamp = now
        return bucket

    def try_acquire(self, tenant: Tenant) -> bool:
        bucket = self._refill(tenant)
        if bucket is None:
            return True
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def retry_after_s(self, tenant: Tenant) -> float:
        """Seconds until `try_acquire` would pass (0 when it would now); for the error message."""
        bucket = self._refill(tenant)
        if bucket is None or bucket.tokens >= 1.0:
            return 0.0
        return (1.0 - bucket.tokens) / tenant.rate_limit.requests_per_s

    def check(self, tenant: Tenant) -> None:
        """try_acquire, raising AuthError RESOURCE_EXHAUSTED when over the limit."""
        if not self.try_acquire(tenant):
            limit = tenant.rate_limit
            raise AuthError("RESOURCE_EXHAUSTED",
                            f"rate limit: tenant {tenant.name!r} is over {limit.requests_per_s:g} requests/s "
                            f"(burst {limit.burst:g}); retry after {self.retry_after_s(tenant):.2f} s")


__all__: Sequence[str] = (
    "ANONYMOUS", "AuthError", "KeyFileError", "KeyRing", "RateLimit", "RateLimiter", "Tenant",
    "bearer_token", "generate_key", "hash_key", "load_key_file", "open_access", "parse_key_file",
)
