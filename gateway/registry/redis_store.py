"""Redis target store for production (ARCHITECTURE §5), on redis-py's asyncio client.

Layout under a prefix (default ``unlearn:``), all values text:

- ``<p>target:<id>``   one JSON record per target
- ``<p>ids``           set of all target ids
- ``<p>version``       the set version; ``<p>last_at_us`` the time of the last write (µs since the epoch)
- ``<p>audit``         append-only stream, one entry per changed target (fields version, at, actor, action,
                       target_id, before, after; before/after are target JSON or ""). Entry ids are
                       ``<version>-<n>``, so the stream is ordered by version and an entry can be addressed
                       directly; an import adds one entry with an empty target_id marking the import itself.
- ``<p>history:<id>``  list of the audit entry ids about one target (the index behind ``history``)
- channel ``<p>targets:version``  the new version, published inside the write's transaction
- ``<p>policy_status`` hash target id -> ``PolicyStatus`` JSON (outside the versioned set; dropped with its target)
- ``<p>lease:<name>``  a lease: the owner's id, with the lease's expiry as the key's TTL (Redis's clock)

Every write is optimistic: WATCH the version key, read what the write depends on, then MULTI/EXEC the records,
the audit entries, the new version and the PUBLISH. Every write changes the version key, so a concurrent write
anywhere aborts the EXEC and the write is re-planned from fresh data — which is what keeps concurrent patches
of one target from losing updates. Write times come from the Redis server's clock (one clock for all replicas)
and never go backwards, so ``as_of`` can cut the log by time without splitting a write.

Redis Sentinel: build the client with ``redis.asyncio.sentinel.Sentinel([...]).master_for("mymaster",
decode_responses=True)`` and pass it to ``RedisTargetStore(client)``; nothing else changes. The keys share no
hash tag, so Redis Cluster is not supported (a transaction must stay on one node).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError

from gateway.registry.changes import (
    Change,
    apply_update,
    audit_entry,
    from_us,
    plan_import,
    replay,
    to_us,
    validate_batch,
)
from gateway.registry.status import PolicyStatus
from gateway.registry.store import ImportMode, StoreUnavailable, TargetExists, TargetNotFound
from gateway.registry.targets import Action, AuditEntry, Target

_CHUNK = 1_000  # keys per MGET / SADD / XRANGE page: large enough for speed, small enough to not stall Redis

# Appends audit entries ``<version>-<seq>`` and indexes each under its target's history list. A script, because
# a 100,000-target import would otherwise queue 200,000 commands (XADD + RPUSH each), and the client's per-command
# cost dominates the import time. It runs inside the write's MULTI, so it is applied with the rest or not at all.
_APPEND_AUDIT = """
local version, at, actor, action = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local seq = tonumber(ARGV[5])
for i = 2, #KEYS do
  local arg = 6 + (i - 2) * 3
  local entry_id = version .. '-' .. seq
  redis.call('XADD', KEYS[1], entry_id, 'version', version, 'at', at, 'actor', actor, 'action', action,
             'target_id', ARGV[arg], 'before', ARGV[arg + 1], 'after', ARGV[arg + 2])
  redis.call('RPUSH', KEYS[i], entry_id)
  seq = seq + 1
end
return seq
"""

# Take a lease if it is free or already ours (and push its expiry out); one script, so check and set are atomic.
_ACQUIRE_LEASE = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# A status is written only while its target exists, so a trainer finishing after a delete leaves nothing behind.
_PUT_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _parse_all(bodies: list[str]) -> list[Target]:
    return [Target.model_validate_json(body) for body in bodies]


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisTargetStore:
    """``TargetStore`` on Redis. Connections are opened on first use, so construction never fails on a down
    server; every Redis error surfaces as ``StoreUnavailable``."""

    def __init__(self, client: Redis, *, prefix: str = "unlearn:", where: str | None = None,
                 owns_client: bool = True, max_attempts: int = 200):
        self._redis = client
        self._owns_client = owns_client
        self._max_attempts = max_attempts
        self.prefix = prefix
        self.channel = f"{prefix}targets:version"
        self._k_version = f"{prefix}version"
        self._k_last_at = f"{prefix}last_at_us"
        self._k_ids = f"{prefix}ids"
        self._k_audit = f"{prefix}audit"
        self._k_status = f"{prefix}policy_status"
        self._append_audit = client.register_script(_APPEND_AUDIT)
        self._acquire_lease = client.register_script(_ACQUIRE_LEASE)
        self._release_lease = client.register_script(_RELEASE_LEASE)
        self._put_status = client.register_script(_PUT_STATUS)
        kwargs = client.connection_pool.connection_kwargs
        self._where = where or f"redis at {kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "unlearn:", connect_timeout_s: float = 2.0,
                 socket_timeout_s: float = 60.0) -> RedisTargetStore:
        """``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS. Connection failures are retried
        twice with a short backoff, so an outage is reported in about a second rather than hanging a request."""
        client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s, health_check_interval=30,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        return cls(client, prefix=prefix, where=redact(url))

    def _target_key(self, target_id: str) -> str:
        return f"{self.prefix}target:{target_id}"

    def _history_key(self, target_id: str) -> str:
        return f"{self.prefix}history:{target_id}"

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except WatchError:
            raise
        except (RedisError, OSError) as exc:  # OSError includes ConnectionError and TimeoutError
            raise StoreUnavailable(f"target store unavailable ({self._where}): {type(exc).__name__}: {exc}") \
                from exc

    # -- the write path ----------------------------------------------------------------------------------------

    async def _commit(self, actor: str, action: Action, plan: Callable[[Pipeline], Awaitable[list[Change]]],
                      *, marker: bool = False) -> int:
        """Plan under WATCH, then apply atomically; re-plan when another write got in first."""
        for attempt in range(self._max_attempts):
            async with self._errors(), self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self._k_version)
                version = int(await pipe.get(self._k_version) or 0)
                last_at_us = int(await pipe.get(self._k_last_at) or 0)
                seconds, micros = await pipe.time()
                changes = await plan(pipe)
                new_version, at_us = version + 1, max(seconds * 1_000_000 + micros, last_at_us)
                pipe.multi()
                await self._queue(pipe, new_version, at_us, actor, action, changes, marker)
                try:
                    await pipe.execute()
                    return new_version
                except WatchError as exc:
                    if "occurred while watching" in str(exc):  # the connection broke mid-transaction
                        raise StoreUnavailable(
                            f"lost the connection to {self._where} during a write; it may or may not have "
                            f"been applied: check the version and the history") from exc
            # Another write won; back off a little (with jitter) so many contenders do not retry in lockstep.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))
        raise StoreUnavailable(f"gave up after {self._max_attempts} attempts: too many concurrent writes")

    async def _queue(self, pipe: Pipeline, version: int, at_us: int, actor: str, action: Action,
                     changes: list[Change], marker: bool) -> None:
        at = from_us(at_us).isoformat()
        written = [c for c in changes if c.after is not None]
        removed = [c.target_id for c in changes if c.after is None]
        for start in range(0, len(written), _CHUNK):
            chunk = written[start:start + _CHUNK]
            pipe.mset({self._target_key(c.target_id): c.after for c in chunk})
            pipe.sadd(self._k_ids, *(c.target_id for c in chunk))
        for start in range(0, len(removed), _CHUNK):
            chunk = removed[start:start + _CHUNK]
            pipe.delete(*(self._target_key(tid) for tid in chunk))
            pipe.srem(self._k_ids, *chunk)
            pipe.hdel(self._k_status, *chunk)
        if marker:
            pipe.xadd(self._k_audit, {"version": version, "at": at, "actor": actor, "action": action,
                                      "target_id": "", "before": "", "after": ""}, id=f"{version}-0")
        first = 1 if marker else 0
        for start in range(0, len(changes), _CHUNK):
            chunk = changes[start:start + _CHUNK]
            keys = [self._k_audit, *(self._history_key(c.target_id) for c in chunk)]
            args: list[str | int] = [version, at, actor, action, first + start]
            for c in chunk:
                args += [c.target_id, c.before or "", c.after or ""]
            await self._append_audit(keys=keys, args=args, client=pipe)  # queued, not run: MULTI is open
        pipe.set(self._k_version, version)
        pipe.set(self._k_last_at, at_us)
        pipe.publish(self.channel, version)

    async def create(self, target: Target, actor: str) -> int:
        body = target.model_dump_json()

        async def plan(pipe: Pipeline) -> list[Change]:
            if await pipe.exists(self._target_key(target.id)):
                raise TargetExists(target.id)
            return [Change(target.id, None, body)]

        return await self._commit(actor, "create", plan)

    async def replace(self, target: Target, actor: str) -> int:
        body = target.model_dump_json()

        async def plan(pipe: Pipeline) -> list[Change]:
            before = await pipe.get(self._target_key(target.id))
            if before is None:
                raise TargetNotFound(target.id)
            return [Change(target.id, before, body)]

        return await self._commit(actor, "replace", plan)

    async def update(self, target_id: str, fn: Callable[[Target], Target], actor: str,
                     action: Literal["patch", "replace"] = "patch") -> int:
        """``fn`` runs once per attempt: again whenever another write committed in between, so keep it pure."""

        async def plan(pipe: Pipeline) -> list[Change]:
            before = await pipe.get(self._target_key(target_id))
            if before is None:
                raise TargetNotFound(target_id)
            after = apply_update(Target.model_validate_json(before), fn)
            return [Change(target_id, before, after.model_dump_json())]

        return await self._commit(actor, action, plan)

    async def delete(self, target_id: str, actor: str) -> int:
        async def plan(pipe: Pipeline) -> list[Change]:
            before = await pipe.get(self._target_key(target_id))
            if before is None:
                raise TargetNotFound(target_id)
            return [Change(target_id, before, None)]

        return await self._commit(actor, "delete", plan)

    async def import_targets(self, targets: Sequence[Target | Mapping[str, Any]], actor: str,
                             mode: ImportMode = "upsert") -> int:
        """One MULTI/EXEC for the whole batch: Redis applies it as one step, or not at all when the WATCH fails.
        Validation and JSON encoding run in a thread, off the event loop."""
        records = await asyncio.to_thread(lambda: [(t.id, t.model_dump_json()) for t in validate_batch(targets)])

        async def plan(pipe: Pipeline) -> list[Change]:
            ids = sorted(await pipe.smembers(self._k_ids)) if mode == "replace" else [tid for tid, _ in records]
            current: dict[str, str] = {}
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start:start + _CHUNK]
                bodies = await pipe.mget([self._target_key(tid) for tid in chunk])
                current.update((tid, body) for tid, body in zip(chunk, bodies, strict=True) if body is not None)
            return plan_import(records, current, mode)

        return await self._commit(actor, "import", plan, marker=True)

    # -- reads -------------------------------------------------------------------------------------------------

    async def version(self) -> int:
        async with self._errors():
            return int(await self._redis.get(self._k_version) or 0)

    async def get(self, target_id: str) -> Target | None:
        async with self._errors():
            body = await self._redis.get(self._target_key(target_id))
        return Target.model_validate_json(body) if body is not None else None

    async def list_targets(self) -> list[Target]:
        return (await self.snapshot())[1]

    async def snapshot(self) -> tuple[int, list[Target]]:
        """Read version, ids and records, then the version again: every write changes the version in the same
        transaction as the records, so equal versions mean no write landed in between."""
        for _ in range(self._max_attempts):
            async with self._errors():
                first = int(await self._redis.get(self._k_version) or 0)
                ids = sorted(await self._redis.smembers(self._k_ids))
                bodies: list[str | None] = []
                async with self._redis.pipeline(transaction=False) as pipe:
                    for start in range(0, len(ids), _CHUNK):
                        pipe.mget([self._target_key(tid) for tid in ids[start:start + _CHUNK]])
                    pipe.get(self._k_version)
                    *pages, last = await pipe.execute()
                for page in pages:
                    bodies.extend(page)
            if first == int(last or 0) and None not in bodies:
                return first, await asyncio.to_thread(_parse_all, bodies)
            await asyncio.sleep(random.uniform(0, 0.01))
        raise StoreUnavailable("could not read a consistent snapshot: writes keep landing")

    async def history(self, target_id: str) -> list[AuditEntry]:
        async with self._errors():
            entry_ids = await self._redis.lrange(self._history_key(target_id), 0, -1)
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry_id in entry_ids:
                    pipe.xrange(self._k_audit, entry_id, entry_id)
                found = await pipe.execute()
        return [self._entry(fields) for entries in found for _, fields in entries]

    @staticmethod
    def _entry(fields: dict[str, str]) -> AuditEntry:
        return audit_entry(int(fields["version"]), to_us(datetime.fromisoformat(fields["at"])), fields["actor"],
                           fields["action"], fields["target_id"] or None,  # type: ignore[arg-type]
                           fields["before"] or None, fields["after"] or None)

    async def as_of(self, when: datetime) -> tuple[int, list[Target]]:
        """Replay the audit stream up to ``when`` (entries are in version order and their times never decrease)."""
        until = to_us(when)
        version = 0
        applied: list[tuple[str | None, str | None]] = []
        start, done = "-", False
        async with self._errors():
            while not done:
                page = await self._redis.xrange(self._k_audit, start, "+", count=_CHUNK)
                done = len(page) < _CHUNK
                for entry_id, fields in page:
                    if to_us(datetime.fromisoformat(fields["at"])) > until:
                        done = True
                        break
                    version = int(fields["version"])
                    applied.append((fields["target_id"] or None, fields["after"] or None))
                    start = f"({entry_id}"
        return version, await asyncio.to_thread(replay, applied)

    async def watch(self) -> AsyncIterator[int]:
        """Subscribe, wait for the confirmation, then yield the current version, so nothing published after the
        subscription is missed. On a lost connection, resubscribe with backoff and yield the version again if it
        moved while away."""
        last = -1
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                confirmation = await pubsub.get_message(timeout=5.0)
                if confirmation is None or confirmation.get("type") != "subscribe":
                    raise StoreUnavailable(f"{self._where} did not confirm the subscription")
                current = await self.version()
                backoff = 0.1
                if current > last:
                    last = current
                    yield current
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    try:
                        published = int(message["data"])
                    except (TypeError, ValueError):
                        continue  # not ours: the channel is a plain name anyone could publish on
                    if published > last:
                        last = published
                        yield published
            except (RedisError, OSError, StoreUnavailable):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def ping(self) -> bool:
        try:
            async with self._errors():
                return bool(await self._redis.ping())
        except StoreUnavailable:
            return False

    # -- leases and policy statuses ----------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        async with self._errors():
            return bool(await self._acquire_lease(keys=[f"{self.prefix}lease:{name}"],
                                                  args=[owner, max(1, round(ttl_s * 1000))]))

    async def release_lease(self, name: str, owner: str) -> None:
        async with self._errors():
            await self._release_lease(keys=[f"{self.prefix}lease:{name}"], args=[owner])

    async def put_status(self, target_id: str, status: PolicyStatus) -> None:
        async with self._errors():
            await self._put_status(keys=[self._target_key(target_id), self._k_status],
                                   args=[target_id, status.model_dump_json()])

    async def get_statuses(self, target_ids: Sequence[str]) -> dict[str, PolicyStatus]:
        ids = list(target_ids)
        if not ids:
            return {}
        async with self._errors():
            bodies = await self._redis.hmget(self._k_status, ids)
        return {tid: PolicyStatus.model_validate_json(body) for tid, body in zip(ids, bodies, strict=True)
                if body is not None}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
