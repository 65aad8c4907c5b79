"""The target store contract (ARCHITECTURE §5): one interface, a Redis and an embedded SQLite implementation.

Why a version: every gateway worker keeps the whole target set in memory and must know whether what it holds is
current. The store therefore keeps one *set version* that starts at 0 and grows by exactly 1 per successful write
(an import of many targets is one write). A worker compares versions instead of contents, learns of new ones
through ``watch()``, and reads ``snapshot()`` — version and targets from one consistent state, never half a
write. Every write also appends to an audit log (before/after, actor, time), from which ``history`` and ``as_of``
are served.

The exceptions subclass ``GatewayError`` so the admin API can return them as they are (409, 404, 503, 422).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from gateway.errors import GatewayError
from gateway.registry.status import PolicyStatus
from gateway.registry.targets import AuditEntry, Target

ImportMode = Literal["upsert", "replace"]
"""``upsert``: add or overwrite the given targets, keep the others. ``replace``: the import becomes the whole set."""


class StoreError(GatewayError):
    """Base of the store's errors."""


class TargetExists(StoreError):
    status = 409
    type = "conflict"

    def __init__(self, target_id: str):
        super().__init__(f"target {target_id!r} already exists", param="id", code="target_exists")
        self.target_id = target_id


class TargetNotFound(StoreError):
    status = 404
    type = "not_found"

    def __init__(self, target_id: str):
        super().__init__(f"target {target_id!r} not found", param="id", code="target_not_found")
        self.target_id = target_id


class StoreUnavailable(StoreError):
    """The backing store cannot be reached or refused the operation; nothing was written."""

    status = 503
    type = "store_unavailable"

    def __init__(self, message: str):
        super().__init__(message, code="store_unavailable")


@dataclass(frozen=True)
class ImportLineError:
    """One problem in an import: ``line`` is the 1-based position of the item, ``field`` its dotted path."""

    line: int
    field: str
    message: str


class ImportRejected(StoreError):
    """An import with at least one bad item; nothing was written."""

    status = 422
    type = "invalid_request_error"

    def __init__(self, errors: Sequence[ImportLineError]):
        self.errors = list(errors)
        shown = "; ".join(f"line {e.line}" + (f" {e.field}" if e.field else "") + f": {e.message}"
                          for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"import rejected, nothing written: {len(self.errors)} error(s): {shown}{more}",
                         code="import_rejected")


@runtime_checkable
class TargetStore(Protocol):
    """What the admin API and the hot-reload loop need from a store. All writes return the new set version.

    ``actor`` is the id of the admin key that made the change (never the key itself).
    """

    async def version(self) -> int:
        """The current set version: 0 for an empty new store, +1 per successful write."""
        ...

    async def get(self, target_id: str) -> Target | None: ...

    async def list_targets(self) -> list[Target]:
        """All targets, sorted by id."""
        ...

    async def snapshot(self) -> tuple[int, list[Target]]:
        """Version and all targets (sorted by id) read from one consistent state."""
        ...

    async def create(self, target: Target, actor: str) -> int:
        """Add a target; ``TargetExists`` if its id is taken."""
        ...

    async def replace(self, target: Target, actor: str) -> int:
        """Overwrite an existing target; ``TargetNotFound`` if absent."""
        ...

    async def update(self, target_id: str, fn: Callable[[Target], Target], actor: str,
                     action: Literal["patch", "replace"] = "patch") -> int:
        """Read-modify-write one target atomically; ``fn`` may run more than once, so it must be pure.

        ``TargetNotFound`` if absent; ``ValueError`` if ``fn`` changes the id.
        """
        ...

    async def delete(self, target_id: str, actor: str) -> int:
        """Remove a target; ``TargetNotFound`` if absent. Its history stays."""
        ...

    async def import_targets(self, targets: Sequence[Target | Mapping[str, Any]], actor: str,
                             mode: ImportMode = "upsert") -> int:
        """Write many targets as one write, all or nothing.

        Mappings are validated here; any invalid item or duplicate id raises ``ImportRejected`` with one
        ``ImportLineError`` per problem and writes nothing.
        """
        ...

    async def history(self, target_id: str) -> list[AuditEntry]:
        """Every audit entry about one target, oldest first (imports included)."""
        ...

    async def as_of(self, when: datetime) -> tuple[int, list[Target]]:
        """Version and targets as they were at ``when`` (timezone-aware), rebuilt from the audit log."""
        ...

    def watch(self) -> AsyncIterator[int]:
        """Yield the current version once subscribed, then each newer version as it is published.

        Versions only grow; one may be skipped if several writes land together, and a consumer should still
        resync periodically because a notification can be lost (e.g. across a reconnect).
        """
        ...

    async def ping(self) -> bool:
        """True if the backing store answers; never raises."""
        ...

    # -- beside the target set: leases and policy statuses (no version bump, no audit) ---------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the named lease for ``ttl_s`` seconds, or extend it when ``owner`` holds it already; False while
        another owner holds an unexpired one. Leases let one worker process among all replicas do a piece of
        background work (train one target's ULD assistant); an owner that dies simply stops renewing."""
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (else do nothing)."""
        ...

    async def put_status(self, target_id: str, status: PolicyStatus) -> None:
        """Record a target's policy status. Never touches the target record or the set version; deleting the
        target deletes its status."""
        ...

    async def get_statuses(self, target_ids: Sequence[str]) -> dict[str, PolicyStatus]:
        """The recorded statuses of the given targets (those without one are absent)."""
        ...

    async def aclose(self) -> None: ...


def open_store(url: str, embedded_path: Path, *, prefix: str = "unlearn:") -> TargetStore:
    """Pick the store for ``UNLEARN_STORE_URL``: empty -> embedded SQLite at ``embedded_path``; ``redis://`` or
    ``rediss://`` (credentials in the URL) -> Redis. Opens no connection: the first operation does, so a gateway
    can start while Redis is down and report not-ready instead of crashing."""
    if not url:
        from gateway.registry.sqlite_store import SQLiteTargetStore

        return SQLiteTargetStore(embedded_path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from gateway.registry.redis_store import RedisTargetStore

        return RedisTargetStore.from_url(url, prefix=prefix)
    raise ValueError("store URL must be empty (embedded store) or start with redis:// or rediss://")
