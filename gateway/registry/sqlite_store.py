"""Embedded target store: one SQLite file, for the no-server default (ARCHITECTURE §5).

Several gateway worker processes on one host share the file safely: WAL mode lets readers proceed while one
writer commits, ``busy_timeout`` makes a second writer wait instead of failing, and every write starts with
``BEGIN IMMEDIATE`` so the read-modify-write inside it (version, current records, audit) cannot interleave with
another process's. ``synchronous=FULL``: writes are rare admin actions, and an acknowledged erasure request
must survive a power cut. WAL needs shared memory, so the file must not live on a network filesystem.

The sqlite3 module blocks, so every call runs in a worker thread (``asyncio.to_thread``); each of the two
connections (one writer, one reader) is used by one thread at a time. New versions are noticed by polling the
version row (~50 ms), which also sees writes by other processes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.registry.changes import (
    Change,
    apply_update,
    audit_entry,
    now_us,
    plan_import,
    replay,
    to_us,
    validate_batch,
)
from gateway.registry.status import PolicyStatus
from gateway.registry.store import ImportMode, StoreUnavailable, TargetExists, TargetNotFound
from gateway.registry.targets import Action, AuditEntry, Target

T = TypeVar("T")

# The leases and policy_status tables were added later without a version bump: they are additive, and a gateway
# that does not know them simply leaves them alone.
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    last_at_us INTEGER NOT NULL
);
INSERT OR IGNORE INTO state (id, version, last_at_us) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS targets (id TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    at_us INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target_id TEXT,
    before TEXT,
    after TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_target ON audit (target_id, seq);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_us INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS policy_status (target_id TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
"""
_IN_CHUNK = 500  # ids per "WHERE id IN (...)": well under SQLite's bound-parameter limit


class _Connection:
    """One lazily opened sqlite3 connection, used by one thread at a time.

    The asyncio lock queues callers without tying up executor threads; the thread lock guarantees exclusive
    use even when a cancelled caller has already released the asyncio lock while its thread still runs.
    """

    def __init__(self, opener: Callable[[], sqlite3.Connection]):
        self._opener = opener
        self._conn: sqlite3.Connection | None = None
        self._async_lock = asyncio.Lock()
        self._thread_lock = threading.Lock()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._async_lock:
            return await asyncio.to_thread(self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._thread_lock:
            if self._conn is None:
                self._conn = self._opener()
            return fn(self._conn)

    async def close(self) -> None:
        async with self._async_lock:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._thread_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SQLiteTargetStore:
    """``TargetStore`` on a SQLite file. Constructing it does no I/O; the first operation opens the file."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0, poll_interval_s: float = 0.05):
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._poll_interval_s = poll_interval_s
        self._init_lock = threading.Lock()
        self._initialised = False
        self._closed = False
        self._writer = _Connection(lambda: self._open(readonly=False))
        self._reader = _Connection(lambda: self._open(readonly=True))

    # -- connections -------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # ``timeout`` is SQLite's busy_timeout: a second writer waits for the lock instead of failing at once.
        return sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)

    def _open(self, *, readonly: bool) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable("the embedded target store is closed")
        self._initialise()
        conn = self._connect()
        conn.execute("PRAGMA synchronous = FULL")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _initialise(self) -> None:
        """Create the file and schema once per store object; safe when several processes race to do it."""
        with self._init_lock:
            if self._initialised:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                self._switch_to_wal(conn)
                found = conn.execute("PRAGMA user_version").fetchone()[0]
                if found > SCHEMA_VERSION:
                    raise StoreUnavailable(f"{self.path} has schema {found}, newer than this gateway's "
                                           f"({SCHEMA_VERSION}); upgrade the gateway")
                # One script, one transaction; on an error close() below rolls it back.
                conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
            finally:
                conn.close()
            self._initialised = True

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode. Switching needs the database to itself and fails at once, without SQLite's
        busy wait, while another store uses it - two stores opening a new file together race here - so it is
        retried until the busy timeout; once a file is in WAL mode it stays so, so it is only switched when not."""
        deadline = time.monotonic() + self._busy_timeout_s
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(self._poll_interval_s)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._guard(self._reader.run(fn))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._guard(self._writer.run(fn))

    async def _guard(self, call: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            call.close()
            raise StoreUnavailable("the embedded target store is closed")
        try:
            return await call
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(f"embedded target store {self.path} is busy (another process holds the "
                                       f"write lock longer than {self._busy_timeout_s:g} s)") from exc
            raise StoreUnavailable(f"embedded target store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"embedded target store {self.path}: {exc}") from exc

    # -- the write path ----------------------------------------------------------------------------------------

    def _commit(self, conn: sqlite3.Connection, actor: str, action: Action,
                plan: Callable[[sqlite3.Connection], list[Change]], *, marker: bool = False) -> int:
        """Run ``plan`` and apply its changes, the audit rows and the version bump in one IMMEDIATE transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version, last_at_us = conn.execute("SELECT version, last_at_us FROM state WHERE id = 1").fetchone()
            changes = plan(conn)
            new_version, at_us = version + 1, max(now_us(), last_at_us)
            conn.executemany(
                "INSERT INTO targets (id, body) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                [(c.target_id, c.after) for c in changes if c.after is not None])
            removed = [(c.target_id,) for c in changes if c.after is None]
            conn.executemany("DELETE FROM targets WHERE id = ?", removed)
            conn.executemany("DELETE FROM policy_status WHERE target_id = ?", removed)
            rows = [(new_version, at_us, actor, action, None, None, None)] if marker else []
            rows += [(new_version, at_us, actor, action, c.target_id, c.before, c.after) for c in changes]
            conn.executemany("INSERT INTO audit (version, at_us, actor, action, target_id, before, after) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("UPDATE state SET version = ?, last_at_us = ? WHERE id = 1", (new_version, at_us))
            conn.execute("COMMIT")
            return new_version
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _body(conn: sqlite3.Connection, target_id: str) -> str | None:
        row = conn.execute("SELECT body FROM targets WHERE id = ?", (target_id,)).fetchone()
        return row[0] if row else None

    async def create(self, target: Target, actor: str) -> int:
        body = target.model_dump_json()

        def plan(conn: sqlite3.Connection) -> list[Change]:
            if self._body(conn, target.id) is not None:
                raise TargetExists(target.id)
            return [Change(target.id, None, body)]

        return await self._write(lambda conn: self._commit(conn, actor, "create", plan))

    async def replace(self, target: Target, actor: str) -> int:
        body = target.model_dump_json()

        def plan(conn: sqlite3.Connection) -> list[Change]:
            before = self._body(conn, target.id)
            if before is None:
                raise TargetNotFound(target.id)
            return [Change(target.id, before, body)]

        return await self._write(lambda conn: self._commit(conn, actor, "replace", plan))

    async def update(self, target_id: str, fn: Callable[[Target], Target], actor: str,
                     action: Literal["patch", "replace"] = "patch") -> int:
        """The transaction holds the write lock, so ``fn`` runs exactly once (in a worker thread)."""

        def plan(conn: sqlite3.Connection) -> list[Change]:
            before = self._body(conn, target_id)
            if before is None:
                raise TargetNotFound(target_id)
            after = apply_update(Target.model_validate_json(before), fn)
            return [Change(target_id, before, after.model_dump_json())]

        return await self._write(lambda conn: self._commit(conn, actor, action, plan))

    async def delete(self, target_id: str, actor: str) -> int:
        def plan(conn: sqlite3.Connection) -> list[Change]:
            before = self._body(conn, target_id)
            if before is None:
                raise TargetNotFound(target_id)
            return [Change(target_id, before, None)]

        return await self._write(lambda conn: self._commit(conn, actor, "delete", plan))

    async def import_targets(self, targets: Sequence[Target | Mapping[str, Any]], actor: str,
                             mode: ImportMode = "upsert") -> int:
        records = await asyncio.to_thread(lambda: [(t.id, t.model_dump_json()) for t in validate_batch(targets)])

        def plan(conn: sqlite3.Connection) -> list[Change]:
            if mode == "replace":
                current = dict(conn.execute("SELECT id, body FROM targets"))
            else:
                current = {}
                ids = [tid for tid, _ in records]
                for start in range(0, len(ids), _IN_CHUNK):
                    chunk = ids[start:start + _IN_CHUNK]
                    current.update(conn.execute(
                        f"SELECT id, body FROM targets WHERE id IN ({','.join('?' * len(chunk))})", chunk))
            return plan_import(records, current, mode)

        return await self._write(lambda conn: self._commit(conn, actor, "import", plan, marker=True))

    # -- reads -------------------------------------------------------------------------------------------------

    async def version(self) -> int:
        return await self._read(lambda conn: conn.execute("SELECT version FROM state WHERE id = 1").fetchone()[0])

    async def get(self, target_id: str) -> Target | None:
        body = await self._read(lambda conn: self._body(conn, target_id))
        return Target.model_validate_json(body) if body is not None else None

    async def list_targets(self) -> list[Target]:
        return (await self.snapshot())[1]

    async def snapshot(self) -> tuple[int, list[Target]]:
        def read(conn: sqlite3.Connection) -> tuple[int, list[Target]]:
            conn.execute("BEGIN")  # one read transaction: WAL gives it a fixed view of the file
            try:
                version = conn.execute("SELECT version FROM state WHERE id = 1").fetchone()[0]
                bodies = [row[0] for row in conn.execute("SELECT body FROM targets ORDER BY id")]
            finally:
                conn.execute("COMMIT")
            return version, [Target.model_validate_json(body) for body in bodies]

        return await self._read(read)

    async def history(self, target_id: str) -> list[AuditEntry]:
        rows = await self._read(lambda conn: conn.execute(
            "SELECT version, at_us, actor, action, target_id, before, after FROM audit WHERE target_id = ? "
            "ORDER BY seq", (target_id,)).fetchall())
        return [audit_entry(*row) for row in rows]

    async def as_of(self, when: datetime) -> tuple[int, list[Target]]:
        until = to_us(when)

        def read(conn: sqlite3.Connection) -> tuple[int, list[Target]]:
            conn.execute("BEGIN")
            try:
                rows = conn.execute("SELECT version, target_id, after FROM audit WHERE at_us <= ? ORDER BY seq",
                                    (until,)).fetchall()
            finally:
                conn.execute("COMMIT")
            version = rows[-1][0] if rows else 0
            return version, replay((tid, after) for _, tid, after in rows)

        return await self._read(read)

    async def watch(self) -> AsyncIterator[int]:
        last = await self.version()
        yield last
        while not self._closed:
            await asyncio.sleep(self._poll_interval_s)
            try:
                current = await self.version()
            except StoreUnavailable:
                if self._closed:
                    return
                continue  # e.g. the file is briefly locked for a schema change; the next poll retries
            if current > last:
                last = current
                yield current

    async def ping(self) -> bool:
        try:
            await self.version()
        except StoreUnavailable:
            return False
        return True

    # -- leases and policy statuses (single statements: each is atomic on its own) -----------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        def take(conn: sqlite3.Connection) -> bool:
            now = now_us()
            cursor = conn.execute(
                "INSERT INTO leases (name, owner, expires_us) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "owner = excluded.owner, expires_us = excluded.expires_us "
                "WHERE leases.owner = excluded.owner OR leases.expires_us <= ?",
                (name, owner, now + round(ttl_s * 1_000_000), now))
            return cursor.rowcount == 1

        return await self._write(take)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._write(lambda conn: conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner)))

    async def put_status(self, target_id: str, status: PolicyStatus) -> None:
        body = status.model_dump_json()
        await self._write(lambda conn: conn.execute(
            "INSERT INTO policy_status (target_id, body) SELECT ?, ? WHERE EXISTS "
            "(SELECT 1 FROM targets WHERE id = ?) ON CONFLICT (target_id) DO UPDATE SET body = excluded.body",
            (target_id, body, target_id)))

    async def get_statuses(self, target_ids: Sequence[str]) -> dict[str, PolicyStatus]:
        ids = list(target_ids)

        def read(conn: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                found.update(conn.execute(f"SELECT target_id, body FROM policy_status WHERE target_id IN "
                                          f"({','.join('?' * len(chunk))})", chunk))
            return found

        bodies = await self._read(read) if ids else {}
        return {tid: PolicyStatus.model_validate_json(body) for tid, body in bodies.items()}

    async def aclose(self) -> None:
        self._closed = True
        await self._writer.close()
        await self._reader.close()
