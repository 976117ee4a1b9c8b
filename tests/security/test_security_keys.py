"""qllm.security: key file, authentication, priority classes, rate limits."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from qllm import security
from qllm.security import AuthError, KeyFileError, RateLimiter, Tenant, hash_key, load_key_file, open_access

CHAT_KEY = "qllm_chat-secret"
BATCH_KEY = "qllm_batch-secret"
OLD_KEY = "qllm_old-secret"


def key_file_data() -> dict:
    return {
        "version": 1,
        "tenants": {
            "chat": {"priorities": ["LS", "BE"], "rate_limit": {"requests_per_s": 2, "burst": 3}},
            "batch": {"priorities": ["BE"], "rate_limit": {"requests_per_s": 0.5}},
            "ops": {},
            "frozen": {"enabled": False},
        },
        "keys": [
            {"id": "chat-1", "tenant": "chat", "sha256": hash_key(CHAT_KEY)},
            {"id": "batch-1", "tenant": "batch", "sha256": hash_key(BATCH_KEY).upper()},
            {"id": "old", "tenant": "ops", "sha256": hash_key(OLD_KEY), "expires": "2020-01-01T00:00:00Z"},
            {"id": "frozen-1", "tenant": "frozen", "sha256": hash_key("qllm_frozen")},
        ],
    }


@pytest.fixture
def ring(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(key_file_data()))
    return load_key_file(path)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("user-agent", "grpc-python"), ("authorization", f"Bearer {key}")]


def test_hash_key_is_sha256_hex_and_generated_keys_differ():
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    a, b = security.generate_key(), security.generate_key()
    assert a != b and a.startswith("qllm_") and len(a) > 40
    with pytest.raises(ValueError):
        hash_key("")


def test_authenticate_maps_keys_to_tenants(ring):
    chat = ring.authenticate(bearer(CHAT_KEY))
    assert chat.name == "chat" and chat.priorities == {"LS", "BE"}
    assert chat.rate_limit == security.RateLimit(2.0, 3.0)
    batch = ring.authenticate(bearer(BATCH_KEY))  # the file's upper-case hex is accepted
    assert batch.name == "batch" and batch.rate_limit.burst == 1.0  # burst defaults to max(1, rate)
    # gRPC metadata keys are lower case, but be lenient; the scheme is case-insensitive; bytes values work.
    assert ring.authenticate([("Authorization", f"bearer  {CHAT_KEY} ")]).name == "chat"
    assert ring.authenticate((("authorization", f"Bearer {CHAT_KEY}".encode()),)).name == "chat"


@pytest.mark.parametrize("metadata, needle", [
    (None, "missing"),
    ([], "missing"),
    ([("x-api-key", CHAT_KEY)], "missing"),
    ([("authorization", CHAT_KEY)], "Bearer"),
    ([("authorization", "Basic dXNlcjpwdw==")], "Bearer"),
    ([("authorization", "Bearer ")], "Bearer"),
    ([("authorization", "Bearer nope")], "unknown API key"),
    ([("authorization", f"Bearer {hash_key(CHAT_KEY)}")], "unknown API key"),  # the hash is not the key
    (bearer(CHAT_KEY) + bearer(CHAT_KEY), "more than one"),
    (bearer(OLD_KEY), "expired"),
])
def test_unauthenticated(ring, metadata, needle):
    with pytest.raises(AuthError) as err:
        ring.authenticate(metadata)
    assert err.value.code == "UNAUTHENTICATED"
    assert err.value.message.startswith("authorization: ") and needle in err.value.message
    assert CHAT_KEY not in str(err.value)  # never echo a secret


def test_disabled_tenant_is_permission_denied(ring):
    with pytest.raises(AuthError) as err:
        ring.authenticate(bearer("qllm_frozen"))
    assert err.value.code == "PERMISSION_DENIED" and "frozen" in err.value.message


def test_expiry_uses_the_ring_clock(ring):
    ring.clock = lambda: datetime(2019, 12, 31, 23, 59, tzinfo=timezone.utc)
    assert ring.authenticate(bearer(OLD_KEY)).name == "ops"
    ring.clock = lambda: datetime(2020, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(AuthError):
        ring.authenticate(bearer(OLD_KEY))


def test_keys_are_compared_in_constant_time(ring, monkeypatch):
    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    ring.authenticate(bearer(CHAT_KEY))  # the first key matches; every other one is still compared
    assert len(calls) == len(ring.keys)
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, not the raw key


def test_check_priority(ring):
    batch = ring.authenticate(bearer(BATCH_KEY))
    batch.check_priority("BE")
    with pytest.raises(AuthError) as err:
        batch.check_priority("LS")
    assert err.value.code == "PERMISSION_DENIED"
    assert err.value.message.startswith("priority: ") and "'batch'" in err.value.message and "BE" in err.value.message
    with pytest.raises(AuthError) as err:
        batch.check_priority("XX")
    assert err.value.code == "PERMISSION_DENIED" and err.value.message.startswith("priority: ")
    chat = ring.authenticate(bearer(CHAT_KEY))
    chat.check_priority("LS")
    chat.check_priority("BE")
    assert not Tenant("none", frozenset()).may_use("BE")


def test_open_access_lets_everyone_in_without_limits():
    ring = open_access()
    for md in (None, [], bearer("anything")):
        tenant = ring.authenticate(md)
        assert tenant is security.ANONYMOUS
    tenant.check_priority("LS")
    tenant.check_priority("BE")
    limiter = RateLimiter()
    assert all(limiter.try_acquire(tenant) for _ in range(10_000))


def test_toml_key_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f"""
[tenants.chat]
priorities = ["LS"]
rate_limit = {{ requests_per_s = 10, burst = 20 }}

[[keys]]
id = "chat-1"
tenant = "chat"
sha256 = "{hash_key(CHAT_KEY)}"
expires = 2099-01-01T00:00:00Z
""")
    ring = load_key_file(path)
    tenant = ring.authenticate(bearer(CHAT_KEY))
    assert tenant.priorities == {"LS"} and tenant.rate_limit == security.RateLimit(10.0, 20.0)


def _mutate(fn):
    data = key_file_data()
    fn(data)
    return data


@pytest.mark.parametrize("data, where", [
    ([], "(top level)"),
    (_mutate(lambda d: d.pop("tenants")), "tenants"),
    (_mutate(lambda d: d.update(version=2)), "version"),
    (_mutate(lambda d: d.update(extra=1)), "extra"),
    (_mutate(lambda d: d["tenants"]["chat"].update(priorities=["LS", "XX"])), "tenants.chat.priorities[1]"),
    (_mutate(lambda d: d["tenants"]["chat"].update(priorities="LS")), "tenants.chat.priorities"),
    (_mutate(lambda d: d["tenants"]["chat"].update(rate_limt={})), "tenants.chat.rate_limt"),
    (_mutate(lambda d: d["tenants"]["chat"]["rate_limit"].update(requests_per_s=0)),
     "tenants.chat.rate_limit.requests_per_s"),
    (_mutate(lambda d: d["tenants"]["chat"]["rate_limit"].update(requests_per_s=True)),
     "tenants.chat.rate_limit.requests_per_s"),
    (_mutate(lambda d: d["tenants"]["chat"]["rate_limit"].update(burst=0.5)), "tenants.chat.rate_limit.burst"),
    (_mutate(lambda d: d["tenants"]["chat"].update(enabled="yes")), "tenants.chat.enabled"),
    (_mutate(lambda d: d["tenants"].update({"bad name": {}})), "tenants.bad name"),
    (_mutate(lambda d: d["keys"][0].update(tenant="nobody")), "keys[0].tenant"),
    (_mutate(lambda d: d["keys"][0].update(sha256=CHAT_KEY)), "keys[0].sha256"),
    (_mutate(lambda d: d["keys"][1].update(sha256=hash_key(CHAT_KEY))), "keys[1].sha256"),
    (_mutate(lambda d: d["keys"][1].update(id="chat-1")), "keys[1].id"),
    (_mutate(lambda d: d["keys"][0].update(key=CHAT_KEY)), "keys[0].key"),
    (_mutate(lambda d: d["keys"][0].update(expires="soon")), "keys[0].expires"),
    (_mutate(lambda d: d.update(keys={})), "keys"),
])
def test_bad_key_files_name_the_field(data, where):
    with pytest.raises(KeyFileError) as err:
        security.parse_key_file(data)
    assert str(err.value).startswith(where + ":"), str(err.value)


def test_unreadable_or_malformed_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="api-keys: cannot read"):
        load_key_file(tmp_path / "absent.json")
    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        load_key_file(bad)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_limiter_token_bucket(ring):
    clock = FakeClock()
    limiter = RateLimiter(clock)
    chat = ring.authenticate(bearer(CHAT_KEY))  # 2/s, burst 3
    assert [limiter.try_acquire(chat) for _ in range(4)] == [True, True, True, False]  # burst, then refused
    assert limiter.retry_after_s(chat) == pytest.approx(0.5)
    clock.now += 0.25
    assert not limiter.try_acquire(chat)  # half a token
    clock.now += 0.25
    assert limiter.try_acquire(chat) and not limiter.try_acquire(chat)
    clock.now += 100  # refills up to the burst, not beyond
    assert sum(limiter.try_acquire(chat) for _ in range(10)) == 3
    # Buckets are per tenant.
    batch = ring.authenticate(bearer(BATCH_KEY))
    assert limiter.try_acquire(batch) and not limiter.try_acquire(batch)


def test_rate_limiter_never_waits_and_unlimited_tenants_pass():
    limiter = RateLimiter(FakeClock())  # the clock never moves: a waiting limiter would hang here
    limited = Tenant("t", rate_limit=security.RateLimit(1.0, 5.0))
    assert sum(limiter.try_acquire(limited) for _ in range(1000)) == 5
    with pytest.raises(AuthError) as err:
        limiter.check(limited)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "'t'" in err.value.message and "retry after 1.00 s" in err.value.message
    assert all(limiter.try_acquire(Tenant("free")) for _ in range(1000))
    assert limiter.retry_after_s(Tenant("free")) == 0.0


def test_rate_limiter_follows_a_lowered_limit():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    assert limiter.try_acquire(Tenant("t", rate_limit=security.RateLimit(100.0, 100.0)))
    lowered = Tenant("t", rate_limit=security.RateLimit(1.0, 2.0))  # e.g. after a key-file reload
    assert [limiter.try_acquire(lowered) for _ in range(3)] == [True, True, False]


def test_error_codes_are_grpc_status_names():
    grpc = pytest.importorskip("grpc")
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"):
        assert grpc.StatusCode[code].name == code
