"""Per-key rate limits on the OpenAI routes (``UNLEARN_RATE_LIMIT_RPM``): 429 ``rate_limit_error`` with
``Retry-After``.

The algorithm is GCRA (a token bucket kept as one timestamp per key): a key may send ``rpm`` requests at once, then
one every ``60 / rpm`` seconds; a refused request is told exactly how long to wait. The bucket is keyed by the id
of the API key that authenticated the request (``scope["state"]["key_id"]``, set by ``gateway.auth``), or by the
client address on a gateway without API keys. ``/admin`` (operators) and the public paths are not limited.

With a Redis store the buckets live in Redis (one Lua script per request, Redis's clock), so every replica and
worker process shares one limit per key. With the embedded store they live in the process.

Redis unreachable: the limiter fails OPEN to the per-process limit (``LocalLimiter``) for a few seconds at a time
and logs it. The classifier, not the limiter, is the security boundary: a Redis outage must not turn chat
requests into errors, and a per-process limit still holds each key back meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import PUBLIC_PATHS, is_admin_path
from gateway.errors import RateLimited
from gateway.limits import send_error

log = logging.getLogger(__name__)

WINDOW_S = 60.0
REDIS_TIMEOUT_S = 0.5  # connect / socket timeout; one limiter call is capped at twice this
REDIS_RETRY_S = 5.0  # after a Redis error, the per-process limit is used for this long before Redis is tried again

# KEYS[1]: the key's theoretical arrival time (microseconds, Redis clock). ARGV: interval and capacity in us.
# Returns 0 (admitted, recorded) or the microseconds to wait (refused, nothing recorded).
_GCRA_LUA = """
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - capacity - now
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 0
"""


def gcra(tat: float | None, now: float, interval: float, capacity: float) -> tuple[float | None, float]:
    """One request under GCRA: (the key's new arrival time, 0) if admitted, (None, seconds to wait) if not."""
    new_tat = max(tat if tat is not None else now, now) + interval
    wait = new_tat - capacity - now
    return (None, wait) if wait > 0 else (new_tat, 0.0)


class Limiter(Protocol):
    async def wait_s(self, key: str) -> float:
        """Record one request of ``key``: 0 if admitted, else the seconds until it would be."""

    async def aclose(self) -> None: ...


class LocalLimiter:
    """Buckets in this process (the embedded store, and the fallback while Redis is down)."""

    _PRUNE_AT = 10_000  # keys held before idle ones are dropped (an idle bucket is a full one)

    def __init__(self, rpm: int, clock: Callable[[], float] = time.monotonic):
        self.interval = WINDOW_S / rpm
        self.capacity = WINDOW_S
        self._clock = clock
        self._tats: dict[str, float] = {}

    async def wait_s(self, key: str) -> float:
        now = self._clock()
        if len(self._tats) >= self._PRUNE_AT:
            self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        new_tat, wait = gcra(self._tats.get(key), now, self.interval, self.capacity)
        if new_tat is not None:
            self._tats[key] = new_tat
        return wait

    async def aclose(self) -> None:
        return None


class RedisLimiter:
    """Buckets in Redis, shared by every gateway on it; fails open to a ``LocalLimiter`` while Redis is down."""

    def __init__(self, url: str, rpm: int, prefix: str, clock: Callable[[], float] = time.monotonic):
        from redis.asyncio import Redis
        from redis.exceptions import RedisError

        self._client = Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
        self._script = self._client.register_script(_GCRA_LUA)
        self._errors = (RedisError, OSError, TimeoutError)
        self._prefix = f"{prefix}ratelimit:"
        self._args = (math.ceil(WINDOW_S / rpm * 1e6), math.ceil(WINDOW_S * 1e6))
        self._fallback = LocalLimiter(rpm, clock)
        self._clock = clock
        self._retry_at: float | None = None  # set while Redis is considered down

    async def wait_s(self, key: str) -> float:
        if self._retry_at is not None and self._clock() < self._retry_at:
            return await self._fallback.wait_s(key)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S * 2):  # connect + script, whatever the socket does
                wait_us = await self._script(keys=[self._prefix + key], args=self._args)
        except self._errors as exc:  # fail open to the per-process limit (module doc)
            if self._retry_at is None:
                log.warning("rate limiter: Redis unreachable (%s: %s); per-process limits apply until it answers",
                            type(exc).__name__, exc)
            self._retry_at = self._clock() + REDIS_RETRY_S
            return await self._fallback.wait_s(key)
        if self._retry_at is not None:
            log.info("rate limiter: Redis answers again; limits are shared again")
            self._retry_at = None
        return int(wait_us) / 1e6

    async def aclose(self) -> None:
        await self._client.aclose()


def build_limiter(rpm: int, redis_url: str, prefix: str) -> Limiter | None:
    """The limiter for these settings: None when off, Redis-backed with a Redis store, else in-process."""
    if rpm <= 0:
        return None
    if redis_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLimiter(redis_url, rpm, prefix)
    return LocalLimiter(rpm)


def _client_key(scope: Scope) -> str:
    key_id = scope.get("state", {}).get("key_id")
    if key_id is not None:
        return f"key:{key_id}"
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


class RateLimitMiddleware:
    """Sits inside the auth middleware, so it sees which key a request came with (and rejected ones never count)."""

    def __init__(self, app: ASGIApp, limiter: Limiter, rpm: int):
        self.app = app
        self.limiter = limiter
        self.rpm = rpm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or is_admin_path(path):
            await self.app(scope, receive, send)
            return
        wait = await self.limiter.wait_s(_client_key(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        error = RateLimited(f"Rate limit reached: {self.rpm} requests per minute for this API key. "
                            f"Retry after {retry_after} s.", code="rate_limit_exceeded")
        await send_error(send, error, [(b"retry-after", str(retry_after).encode())])
