"""API keys, principals and their quotas: who is calling, and how much they may use.

A request's `Authorization: Bearer KEY` (what the openai SDK and tritonclient send; gRPC
calls carry the same as `authorization` metadata) becomes a `Principal` before admission:
a name (the job's owner, a bounded metrics label) and its limits. Keys come from settings:
plain keys (`--api-key`, each its own principal, unlimited) and a key file of named keys
stored as sha256 hashes, each with its own limits. With no key configured every caller is
the one `ANONYMOUS` principal, as before authentication existed.

Quotas are enforced before anything is queued: requests per second as a token bucket per
principal (in process, or one atomic Lua script in Redis so that API replicas share it),
and samples in flight, acquired on admission and released when the job finishes.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from service.errors import Forbidden, QueueUnavailable, RateLimited, Unauthorized

PRIORITIES = (-10, 10)  # fewstep's priority range (higher runs first)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a metrics label, a key name
SHA256 = re.compile(r"^[0-9a-f]{64}$")
LIMIT_FIELDS = ("requests_per_second", "burst", "max_samples_in_flight", "priorities")


class KeyFileError(ValueError):
    """The API key file is unreadable or malformed; the message names the entry and field."""


@dataclass(frozen=True)
class Limits:
    """What one principal may use; 0 means unlimited."""

    requests_per_second: float = 0.0
    burst: int = 0  # bucket size; 0: one second's worth (at least 1)
    max_samples_in_flight: int = 0
    priorities: tuple[int, int] = PRIORITIES  # the allowed range, both ends included

    @property
    def bucket(self) -> int:
        return self.burst or max(1, math.ceil(self.requests_per_second))


@dataclass(frozen=True)
class Principal:
    """The caller a request belongs to: its jobs are its own, its limits apply."""

    name: str
    limits: Limits = field(default_factory=Limits)

    def check_priority(self, priority: int) -> None:
        """Raise Forbidden (403) unless this principal may use `priority`."""
        low, high = self.limits.priorities
        if not low <= priority <= high:
            raise Forbidden(
                f"priority {priority} is not allowed for API key {self.name!r}; "
                f"send a priority in {low}..{high}",
                param="priority",
            )


ANONYMOUS = Principal("anonymous")


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as the key file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class KeyStore:
    """The keys a service accepts; `authenticate` maps an Authorization header to a principal."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        """entries: (hex sha256 of the key, its principal)."""
        names = [p.name for _, p in entries]
        if len(set(names)) != len(names):
            raise KeyFileError(f"principal names must be unique, got {sorted(names)}")
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise KeyFileError("the same key is configured twice; give each key once")
        self._entries = [_Entry(bytes.fromhex(d), p) for d, p in entries]

    @classmethod
    def from_settings(cls, keys: list[str], key_file: Path | None) -> KeyStore:
        """Plain keys (each principal named key-<first 8 hex of its hash>, unlimited) and
        the named keys of `key_file`. Raises KeyFileError."""
        entries = [(hash_key(k), Principal(f"key-{hash_key(k)[:8]}")) for k in keys]
        if key_file is not None:
            entries += load_key_file(key_file)
        return cls(entries)

    @property
    def open(self) -> bool:
        """No key configured: every caller is ANONYMOUS."""
        return not self._entries

    @property
    def principals(self) -> list[Principal]:
        return [e.principal for e in self._entries]

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer KEY` value (HTTP header or gRPC
        metadata). Raises Unauthorized (401) when a key is needed and this is not one."""
        if self.open:
            return ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "this server needs an API key: send the header 'Authorization: Bearer "
                "YOUR_KEY' (the openai SDK's api_key, or gRPC metadata 'authorization')"
            )
        digest = hashlib.sha256(token.encode(errors="replace")).digest()
        found = None
        for entry in self._entries:  # every entry, so the time taken says nothing
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise Unauthorized("the API key is not valid; check it, or ask for a new one")
        return found


def _limits(where: str, data: dict) -> Limits:
    rps = data.get("requests_per_second", 0)
    if isinstance(rps, bool) or not isinstance(rps, (int, float)) or not 0 <= rps < 1e6:
        raise KeyFileError(f"{where}: requests_per_second must be a number >= 0, got {rps!r}")
    counts = {}
    for name in ("burst", "max_samples_in_flight"):
        value = data.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KeyFileError(f"{where}: {name} must be an integer >= 0, got {value!r}")
        counts[name] = value
    if counts["burst"] and not rps:
        raise KeyFileError(f"{where}: burst needs requests_per_second (the refill rate)")
    prio = data.get("priorities", list(PRIORITIES))
    low, high = PRIORITIES
    if (
        not isinstance(prio, list)
        or len(prio) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in prio)
        or not low <= prio[0] <= prio[1] <= high
    ):
        raise KeyFileError(
            f"{where}: priorities must be [lowest, highest] within {low}..{high}, got {prio!r}"
        )
    return Limits(float(rps), counts["burst"], counts["max_samples_in_flight"], tuple(prio))


def load_key_file(path: Path) -> list[tuple[str, Principal]]:
    """(hex sha256, principal) of each key in a YAML or JSON key file:

        keys:
          - name: alice                 # letters, digits, _ . - (a metrics label)
            sha256: 9f86d0...           # `fewstep keys hash` prints it
            requests_per_second: 5      # optional; 0 or absent: unlimited
            burst: 10                   # optional; default one second's worth
            max_samples_in_flight: 32   # optional; 0 or absent: unlimited
            priorities: [-10, 0]        # optional; allowed range, default [-10, 10]

    Raises KeyFileError naming the entry and field that is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise KeyFileError(f"API key file {path}: cannot read it: {err}") from None
    if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], list):
        raise KeyFileError(f"API key file {path}: must be a mapping with one key 'keys', a list")
    out = []
    for i, item in enumerate(data["keys"]):
        where = f"API key file {path}, keys[{i}]"
        if not isinstance(item, dict):
            raise KeyFileError(f"{where}: must be a mapping with name and sha256")
        unknown = sorted(set(item) - {"name", "sha256", *LIMIT_FIELDS})
        if unknown:
            raise KeyFileError(
                f"{where}: unknown field(s) {unknown}; the fields are name, sha256, "
                f"{', '.join(LIMIT_FIELDS)}"
            )
        name, digest = item.get("name"), item.get("sha256")
        if not isinstance(name, str) or not NAME.match(name) or name == ANONYMOUS.name:
            raise KeyFileError(
                f"{where}: name must be 1-64 letters, digits, '_', '.' or '-' (not "
                f"'anonymous'), got {name!r}"
            )
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise KeyFileError(
                f"{where} ({name}): sha256 must be 64 lower-case hex digits (the hash, never "
                "the key itself: `fewstep keys hash` prints it)"
            )
        out.append((digest, Principal(name, _limits(f"{where} ({name})", item))))
    return out


# -- quotas ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The answer of a quota: allowed or not, and the numbers behind x-ratelimit-*."""

    allowed: bool
    retry_after: float  # seconds until the same request would be allowed (0 if allowed)
    limit: int
    remaining: int
    reset: float  # seconds until the quota is back in full

    def check(self, principal: Principal, resource: str = "requests") -> None:
        """Raise RateLimited (429, Retry-After, x-ratelimit-<resource>-*) if not allowed."""
        if self.allowed:
            return
        what = (
            f"{self.limit} requests per second"
            if resource == "requests"
            else f"{self.limit} samples in flight"
        )
        raise RateLimited(
            f"API key {principal.name!r} is over its quota of {what}; retry after the "
            "Retry-After interval",
            retry_after=self.retry_after,
            resource=resource,
            limit=self.limit,
            remaining=self.remaining,
            reset=self.reset,
        )


UNLIMITED = Decision(True, 0.0, 0, 0, 0.0)


class RateLimiter(Protocol):
    """Requests per second per principal (a token bucket of `limits.bucket` tokens)."""

    async def acquire(self, principal: Principal, cost: int = 1) -> Decision: ...


class InFlight(Protocol):
    """Samples in flight per principal: acquired on admission, released when the job ends."""

    async def acquire(self, principal: Principal, job_id: str, samples: int) -> Decision: ...

    async def release(self, principal: Principal, job_id: str) -> None: ...


def _check_cost(limits: Limits, cost: int) -> None:
    if not 1 <= cost <= limits.bucket:
        raise ValueError(f"cost must be in 1..{limits.bucket} (the bucket), got {cost}")


class MemoryRateLimiter:
    """Token buckets in this process (one API process, or a limit per replica)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, time)

    async def acquire(self, principal: Principal, cost: int = 1) -> Decision:
        limits = principal.limits
        rate = limits.requests_per_second
        if not rate:
            return UNLIMITED
        _check_cost(limits, cost)
        burst, now = limits.bucket, self.clock()
        tokens, then = self._buckets.get(principal.name, (float(burst), now))
        tokens = min(burst, tokens + max(0.0, now - then) * rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[principal.name] = (tokens, now)
        retry = 0.0 if allowed else (cost - tokens) / rate
        return Decision(allowed, retry, burst, int(tokens), (burst - tokens) / rate)


class MemoryInFlight:
    """Samples in flight per principal, counted in this process."""

    def __init__(self, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        self._jobs: dict[str, dict[str, int]] = {}  # name -> job id -> samples

    async def acquire(self, principal: Principal, job_id: str, samples: int) -> Decision:
        limit = principal.limits.max_samples_in_flight
        if not limit:
            return UNLIMITED
        jobs = self._jobs.setdefault(principal.name, {})
        used = sum(jobs.values())
        if job_id in jobs:
            return Decision(True, 0.0, limit, limit - used, 0.0)
        if used + samples > limit:
            return Decision(False, self.retry_after, limit, limit - used, self.retry_after)
        jobs[job_id] = samples
        return Decision(True, 0.0, limit, limit - used - samples, 0.0)

    async def release(self, principal: Principal, job_id: str) -> None:
        jobs = self._jobs.get(principal.name)
        if jobs is not None:
            jobs.pop(job_id, None)
            if not jobs:
                del self._jobs[principal.name]


def _redis_unavailable(exc: Exception) -> QueueUnavailable:
    return QueueUnavailable(
        f"the quota store (Redis) is unavailable: {exc}; retry after the Retry-After interval",
        retry_after=2,
    )


class _RedisScripts:
    """The quota scripts of service/queue/redis_scripts.py on one Redis connection."""

    def __init__(self, redis, prefix: str) -> None:
        from service.queue.keys import GROUP
        from service.queue.redis_scripts import sources

        self.redis, self.prefix, self.group = redis, prefix, GROUP
        self._scripts = {
            name: redis.register_script(source)
            for name, source in sources().items()
            if name in ("rate_acquire", "inflight_acquire", "inflight_release")
        }

    async def run(self, name: str, *args):
        from service.queue.redis_common import DOWN

        try:
            return await self._scripts[name](args=[self.prefix, self.group, *args])
        except DOWN as exc:
            raise _redis_unavailable(exc) from exc


class RedisRateLimiter:
    """The same token bucket as one atomic script in Redis: every API replica using the
    same Redis and prefix draws from one bucket per principal."""

    def __init__(self, redis, prefix: str = "fewstep:") -> None:
        """redis: a redis.asyncio.Redis with decode_responses=True (the queue's)."""
        self._scripts = _RedisScripts(redis, prefix)

    async def acquire(self, principal: Principal, cost: int = 1) -> Decision:
        limits = principal.limits
        if not limits.requests_per_second:
            return UNLIMITED
        _check_cost(limits, cost)
        allowed, retry, tokens, reset = await self._scripts.run(
            "rate_acquire", principal.name, limits.requests_per_second, limits.bucket, cost
        )
        return Decision(
            bool(int(allowed)), float(retry), limits.bucket, int(float(tokens)), float(reset)
        )


class RedisInFlight:
    """Samples in flight per principal in Redis, shared by API replicas. Each job's entry
    expires after `ttl` seconds, so a replica that dies holding entries frees them."""

    def __init__(
        self, redis, prefix: str = "fewstep:", ttl: float = 3600.0, retry_after: float = 1.0
    ) -> None:
        self._scripts = _RedisScripts(redis, prefix)
        self.ttl, self.retry_after = ttl, retry_after

    async def acquire(self, principal: Principal, job_id: str, samples: int) -> Decision:
        limit = principal.limits.max_samples_in_flight
        if not limit:
            return UNLIMITED
        allowed, used = await self._scripts.run(
            "inflight_acquire", principal.name, job_id, samples, limit, self.ttl
        )
        if int(allowed):
            return Decision(True, 0.0, limit, limit - int(used), 0.0)
        return Decision(False, self.retry_after, limit, limit - int(used), self.retry_after)

    async def release(self, principal: Principal, job_id: str) -> None:
        if principal.limits.max_samples_in_flight:
            await self._scripts.run("inflight_release", principal.name, job_id)


# -- `fewstep keys` -----------------------------------------------------------------------------


def keys_command(argv: list[str]) -> int:
    """`fewstep keys hash` (reads a key on stdin, prints its sha256) and `fewstep keys new
    NAME` (prints a fresh key once, and the key file entry that stores only its hash)."""
    parser = argparse.ArgumentParser(prog="fewstep keys", description=keys_command.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("hash", help="print the sha256 of the key read from stdin")
    new = commands.add_parser("new", help="make a key and print its key file entry")
    new.add_argument("name", help="principal name: letters, digits, _ . -")
    args = parser.parse_args(argv)
    if args.command == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            print("fewstep keys hash: give the key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if not NAME.match(args.name) or args.name == ANONYMOUS.name:
        print(f"fewstep keys new: bad name {args.name!r}: letters, digits, _ . -", file=sys.stderr)
        return 2
    key = "fs-" + secrets.token_urlsafe(32)
    entry = {"name": args.name, "sha256": hash_key(key)}
    print(f"key (shown once; give it to the client): {key}", file=sys.stderr)
    print(yaml.safe_dump({"keys": [entry]}, sort_keys=False).rstrip())
    return 0
