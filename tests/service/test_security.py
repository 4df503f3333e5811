"""API keys, principals and quotas: authentication, the key file's strict parsing, token
buckets in process and in the real Redis (shared by two limiter instances, as by two API
replicas), samples in flight."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
import redis.asyncio as aioredis

from service.errors import Forbidden, QueueUnavailable, RateLimited, Unauthorized
from service.security import (
    ANONYMOUS,
    KeyFileError,
    KeyStore,
    Limits,
    MemoryInFlight,
    MemoryRateLimiter,
    Principal,
    RedisInFlight,
    RedisRateLimiter,
    hash_key,
    keys_command,
    load_key_file,
)

from .conftest import serve
from .redisutil import REDIS_URL, delete_prefix, free_port, new_prefix, require_redis

ALICE_KEY, BOB_KEY = "fs-alice-secret-0001", "fs-bob-secret-0002"


def key_file(tmp_path, entries, suffix=".yaml"):
    path = tmp_path / f"keys{suffix}"
    path.write_text(json.dumps({"keys": entries}))  # JSON is YAML too
    return path


# -- authentication ----------------------------------------------------------------------------


def test_no_key_configured_means_anonymous():
    store = KeyStore.from_settings([], None)
    assert store.open and store.authenticate(None) is ANONYMOUS
    assert store.authenticate("Bearer anything") is ANONYMOUS


def test_plain_keys_are_each_their_own_principal():
    store = KeyStore.from_settings([ALICE_KEY, BOB_KEY], None)
    alice, bob = store.authenticate(f"Bearer {ALICE_KEY}"), store.authenticate(f"bearer {BOB_KEY}")
    assert alice.name == f"key-{hash_key(ALICE_KEY)[:8]}" and alice != bob
    assert ALICE_KEY not in alice.name and alice.limits == Limits()


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (None, "Authorization: Bearer"),
        ("", "Authorization: Bearer"),
        (ALICE_KEY, "Authorization: Bearer"),  # no scheme
        (f"Basic {ALICE_KEY}", "Authorization: Bearer"),
        ("Bearer ", "Authorization: Bearer"),
        ("Bearer fs-wrong-key", "not valid"),
        (f"Bearer {ALICE_KEY}x", "not valid"),
        ("Bearer \udcff\u00b2", "not valid"),
    ],
)
def test_missing_or_wrong_keys_are_401(header, needle):
    store = KeyStore.from_settings([ALICE_KEY], None)
    with pytest.raises(Unauthorized, match=needle) as info:
        store.authenticate(header)
    assert info.value.status == 401 and info.value.headers()["WWW-Authenticate"] == "Bearer"
    assert ALICE_KEY not in info.value.message


def test_key_file_names_keys_and_gives_them_limits(tmp_path):
    path = key_file(
        tmp_path,
        [
            {
                "name": "alice",
                "sha256": hash_key(ALICE_KEY),
                "requests_per_second": 2.5,
                "burst": 5,
                "max_samples_in_flight": 8,
                "priorities": [-10, 0],
            },
            {"name": "bob", "sha256": hash_key(BOB_KEY)},
        ],
    )
    store = KeyStore.from_settings(["fs-plain-key-0003"], path)
    alice = store.authenticate(f"Bearer {ALICE_KEY}")
    assert alice == Principal("alice", Limits(2.5, 5, 8, (-10, 0)))
    assert store.authenticate(f"Bearer {BOB_KEY}").limits == Limits()
    assert len(store.principals) == 3
    alice.check_priority(0)
    with pytest.raises(Forbidden, match=r"-10\.\.0") as info:
        alice.check_priority(1)
    assert info.value.status == 403


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"name": "a", "sha256": ALICE_KEY}, "64 lower-case hex"),  # the key, not its hash
        ({"name": "a", "sha256": hash_key("x").upper()}, "64 lower-case hex"),
        ({"name": "a b", "sha256": hash_key("x")}, "name must be"),
        ({"name": "anonymous", "sha256": hash_key("x")}, "not 'anonymous'"),
        ({"name": "a", "sha256": hash_key("x"), "rps": 1}, "unknown field"),
        ({"name": "a", "sha256": hash_key("x"), "requests_per_second": -1}, ">= 0"),
        ({"name": "a", "sha256": hash_key("x"), "requests_per_second": True}, ">= 0"),
        ({"name": "a", "sha256": hash_key("x"), "burst": 3}, "needs requests_per_second"),
        ({"name": "a", "sha256": hash_key("x"), "max_samples_in_flight": 1.5}, "integer"),
        ({"name": "a", "sha256": hash_key("x"), "priorities": [0, 11]}, "priorities"),
        ({"name": "a", "sha256": hash_key("x"), "priorities": [5, 0]}, "priorities"),
        ("alice", "must be a mapping"),
    ],
)
def test_key_file_entries_are_checked_strictly(tmp_path, entry, needle):
    with pytest.raises(KeyFileError, match=needle) as info:
        load_key_file(key_file(tmp_path, [entry]))
    assert "keys[0]" in str(info.value)


def test_key_file_shape_and_duplicates(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just a list\n")
    with pytest.raises(KeyFileError, match="one key 'keys'"):
        load_key_file(bad)
    bad.write_text("keys: [\n")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(bad)
    twice = key_file(
        tmp_path,
        [{"name": "a", "sha256": hash_key("k1")}, {"name": "a", "sha256": hash_key("k2")}],
    )
    with pytest.raises(KeyFileError, match="unique"):
        KeyStore.from_settings([], twice)
    same = key_file(tmp_path, [{"name": "a", "sha256": hash_key(ALICE_KEY)}])
    with pytest.raises(KeyFileError, match="twice"):
        KeyStore.from_settings([ALICE_KEY], same)


def test_keys_command_hashes_and_makes_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(ALICE_KEY + "\n"))
    assert keys_command(["hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(ALICE_KEY)
    assert keys_command(["new", "carol"]) == 0
    out = capsys.readouterr()
    key = out.err.split(": ")[-1].strip()
    path = tmp_path / "keys.yaml"
    path.write_text(out.out)
    store = KeyStore.from_settings([], path)
    assert store.authenticate(f"Bearer {key}").name == "carol" and key not in out.out
    assert keys_command(["new", "no way"]) == 2


# -- quotas ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_memory_bucket_bursts_then_refills_at_its_rate():
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    p = Principal("p", Limits(requests_per_second=2, burst=3))

    async def scenario():
        burst = [(await limiter.acquire(p)).allowed for _ in range(4)]
        denied = await limiter.acquire(p)
        clock.now += 0.25
        early = await limiter.acquire(p)
        clock.now += 0.25
        on_time = await limiter.acquire(p)
        clock.now += 100
        full = await limiter.acquire(p)
        return burst, denied, early, on_time, full

    burst, denied, early, on_time, full = asyncio.run(scenario())
    assert burst == [True, True, True, False]
    assert denied.retry_after == pytest.approx(0.5) and denied.remaining == 0
    assert denied.reset == pytest.approx(1.5) and denied.limit == 3
    assert not early.allowed and early.retry_after == pytest.approx(0.25)
    assert on_time.allowed
    assert full.allowed and full.remaining == 2  # capped at the burst
    with pytest.raises(RateLimited) as info:
        denied.check(p)
    assert info.value.headers()["x-ratelimit-limit-requests"] == "3"
    assert info.value.headers()["Retry-After"] == "1"


def test_unlimited_principals_are_never_counted():
    limiter, inflight = MemoryRateLimiter(), MemoryInFlight()

    async def scenario():
        a = [await limiter.acquire(ANONYMOUS) for _ in range(1000)]
        b = [await inflight.acquire(ANONYMOUS, f"job{i}", 64) for i in range(100)]
        return a + b

    assert all(d.allowed for d in asyncio.run(scenario()))


def connect():
    return aioredis.Redis.from_url(REDIS_URL, decode_responses=True)


def test_redis_two_replicas_share_one_bucket(prefix):
    p = Principal("shared", Limits(requests_per_second=0.01, burst=4))

    async def scenario():
        a, b = connect(), connect()
        first, second = RedisRateLimiter(a, prefix), RedisRateLimiter(b, prefix)
        out = []
        for _ in range(4):
            out.append(await first.acquire(p))
            out.append(await second.acquire(p))
        other = await first.acquire(Principal("other", p.limits))
        await a.aclose()
        await b.aclose()
        return out, other

    decisions, other = asyncio.run(scenario())
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 4
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    assert decisions[-1].retry_after == pytest.approx(100, rel=0.05)  # 1 token at 0.01/s
    assert other.allowed  # a bucket per principal


def test_redis_bucket_refills_at_the_configured_rate(prefix):
    rate = 4.0
    p = Principal("refill", Limits(requests_per_second=rate, burst=10))

    async def scenario():
        client = connect()
        limiter = RedisRateLimiter(client, prefix)
        while (await limiter.acquire(p)).allowed:  # empty the bucket
            pass
        outer = time.monotonic()
        await limiter.acquire(p)  # denied: the bucket holds less than one token now
        inner = time.monotonic()
        await asyncio.sleep(0.6)
        inner = time.monotonic() - inner
        got = 0
        while (await limiter.acquire(p)).allowed:
            got += 1
        outer = time.monotonic() - outer
        await client.aclose()
        return got, inner, outer

    got, inner, outer = asyncio.run(scenario())
    # tokens accrued over the sleep: at least rate x inner, at most 1 + rate x outer
    assert int(rate * inner) <= got <= int(rate * outer) + 1


def test_redis_retry_after_is_accurate(prefix):
    p = Principal("retry", Limits(requests_per_second=1, burst=1))

    async def scenario():
        client = connect()
        limiter = RedisRateLimiter(client, prefix)
        assert (await limiter.acquire(p)).allowed
        denied = await limiter.acquire(p)
        await asyncio.sleep(denied.retry_after * 0.4)
        early = await limiter.acquire(p)
        await asyncio.sleep(early.retry_after + 0.05)
        later = await limiter.acquire(p)
        await client.aclose()
        return denied, early, later

    denied, early, later = asyncio.run(scenario())
    assert 0.9 < denied.retry_after <= 1.0 and denied.reset == pytest.approx(denied.retry_after)
    assert not early.allowed and early.retry_after < denied.retry_after * 0.7
    assert later.allowed


@pytest.fixture(params=["memory", "redis"])
def inflight(request):
    if request.param == "memory":
        yield lambda client: MemoryInFlight()
        return
    require_redis()
    value = new_prefix()
    yield lambda client: RedisInFlight(client, value, ttl=0.5)
    delete_prefix(value)


def test_samples_in_flight_are_bounded_and_released(inflight):
    p = Principal("busy", Limits(max_samples_in_flight=8))

    async def scenario():
        client = connect()
        counter = inflight(client)
        a = await counter.acquire(p, "job_a", 5)
        again = await counter.acquire(p, "job_a", 5)  # a retried admission counts once
        b = await counter.acquire(p, "job_b", 4)
        c = await counter.acquire(p, "job_c", 3)
        await counter.release(p, "job_a")
        await counter.release(p, "job_a")  # twice: no effect
        b2 = await counter.acquire(p, "job_b", 4)
        await client.aclose()
        return a, again, b, c, b2

    a, again, b, c, b2 = asyncio.run(scenario())
    assert a.allowed and again.allowed and a.remaining == 3
    assert not b.allowed and b.remaining == 3 and b.retry_after > 0
    assert c.allowed and c.remaining == 0
    assert b2.allowed and b2.remaining == 1
    with pytest.raises(RateLimited) as info:
        b.check(p, "samples")
    assert info.value.headers()["x-ratelimit-limit-samples"] == "8"


def test_redis_in_flight_entries_expire_when_a_replica_dies(prefix):
    p = Principal("orphan", Limits(max_samples_in_flight=4))

    async def scenario():
        client = connect()
        dead = RedisInFlight(client, prefix, ttl=0.3)  # acquires, then never releases
        live = RedisInFlight(client, prefix, ttl=30)
        assert (await dead.acquire(p, "job_lost", 4)).allowed
        blocked = await live.acquire(p, "job_new", 1)
        await asyncio.sleep(0.4)
        freed = await live.acquire(p, "job_new", 1)
        ttl = await client.pttl(f"{prefix}inflight:orphan")
        await client.aclose()
        return blocked, freed, ttl

    blocked, freed, ttl = asyncio.run(scenario())
    assert not blocked.allowed and freed.allowed and freed.remaining == 3
    assert 0 < ttl <= 30_001  # the key itself expires with its last entry (ms, rounded up)


def test_redis_quota_store_away_is_a_503_not_a_hang():
    p = Principal("p", Limits(requests_per_second=1, max_samples_in_flight=1))

    async def scenario():
        client = aioredis.Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", decode_responses=True, socket_timeout=0.5
        )
        begin = time.monotonic()
        with pytest.raises(QueueUnavailable) as first:
            await RedisRateLimiter(client).acquire(p)
        with pytest.raises(QueueUnavailable):
            await RedisInFlight(client).acquire(p, "job_x", 1)
        await client.aclose()
        return first.value, time.monotonic() - begin

    err, took = asyncio.run(scenario())
    assert err.status == 503 and err.retry_after and took < 3


def test_the_in_flight_ttl_is_a_setting(prefix):
    with serve(queue=REDIS_URL, redis_prefix=prefix, inflight_ttl_s=7) as server:
        in_flight = server.app.state.fewstep.in_flight
        assert isinstance(in_flight, RedisInFlight) and in_flight.ttl == 7
