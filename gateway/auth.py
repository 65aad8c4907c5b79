"""API-key authentication as a pure ASGI middleware: every route is protected unless listed as public.

Two kinds of keys, never interchangeable (ARCHITECTURE §8):

- user keys (``UNLEARN_API_KEYS`` / ``UNLEARN_API_KEYS_FILE``) for the OpenAI routes; none configured = open;
- admin keys (``UNLEARN_ADMIN_KEYS`` / ``UNLEARN_ADMIN_KEYS_FILE``) for ``/admin`` only. A user key there is
  403 (it is a real key, just not allowed), anything else 401. An admin key on the OpenAI routes is 401: an
  operator's key leaking into a chat client must not quietly work.

Keys are held only as SHA-256 hashes and compared in constant time against every stored hash. A secrets file is
re-read when it changes (checked at most once a second), so keys rotate without a restart. The id of the key
that authenticated a request (first 8 hex digits of its hash, never the key) is put in ``scope["state"]
["key_id"]``: the admin API records it as the actor of every write, and the rate limiter counts by it.

Admin port (``UNLEARN_ADMIN_PORT``): when set, the server listens on two ports and this middleware routes by the
port a connection came in on (the ASGI ``scope["server"]``): ``/admin`` answers only on the admin port, every other
non-public route only on the main port; the wrong port answers 404, whatever the key. One app serves both, so
both see the same targets, reloader and metrics. The public paths (health, readiness, metrics, docs) answer on both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json"})
ADMIN_PREFIX = "/admin"
KEY_ID_HEX = 8


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """The public id of a key (what the audit history shows): the first hex digits of its SHA-256."""
    return hash_key(key).hex()[:KEY_ID_HEX]


def generate_key(kind: str = "admin") -> str:
    return f"ug-{kind}-{secrets.token_urlsafe(32)}"


class KeyRing:
    """A set of keys kept only as hashes; ``match`` compares against every one in constant time."""

    def __init__(self, keys: Iterable[str] = ()):
        self._hashes = [hash_key(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, key: str) -> str | None:
        """The id of the matching key, or None. Every stored hash is compared, so timing tells nothing."""
        candidate = hash_key(key)
        found: bytes | None = None
        for stored in self._hashes:
            if hmac.compare_digest(candidate, stored):
                found = stored
        return found.hex()[:KEY_ID_HEX] if found is not None else None

    def check(self, key: str) -> bool:
        return self.match(key) is not None


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are ignored."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class KeyFile:
    """The keys of a secrets file, re-read when its mtime, size or inode changes.

    The file is stat'ed at most once per ``check_interval_s``, on the request path (one ``stat`` a second is
    cheaper than a watcher task per worker). A file that cannot be read revokes its keys (fail closed) until it
    can be read again; a rotation by atomic rename (write new file, ``mv`` over the old) is never seen half-written.
    """

    def __init__(self, path: Path, *, check_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._ring = KeyRing()
        self._refresh()

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            keys = read_key_file(self.path)
        except OSError as exc:
            if self._stamp != (0, 0, 0):
                log.error("cannot read keys file %s (%s): its keys are refused until it can be read", self.path, exc)
            self._stamp, self._ring = (0, 0, 0), KeyRing()
            return
        self._stamp, self._ring = stamp, KeyRing(keys)
        log.info("loaded %d key(s) from %s", len(keys), self.path)

    def ring(self) -> KeyRing:
        now = self._clock()
        if now - self._checked_at >= self._interval:
            with self._lock:
                if now - self._checked_at >= self._interval:
                    self._checked_at = now
                    self._refresh()
        return self._ring


class KeySource:
    """Keys from settings plus, optionally, a secrets file. ``configured`` is False only with neither."""

    def __init__(self, keys: Iterable[str] | KeyRing = (), file: Path | None = None, *,
                 check_interval_s: float = 1.0):
        self._static = keys if isinstance(keys, KeyRing) else KeyRing(keys)
        self._file = KeyFile(file, check_interval_s=check_interval_s) if file is not None else None

    @property
    def configured(self) -> bool:
        return bool(self._static) or self._file is not None

    def match(self, key: str) -> str | None:
        found = self._static.match(key)
        if self._file is not None:
            found = self._file.ring().match(key) or found
        return found


def ensure_admin_key(keys: list[str], keys_file: Path | None) -> list[str]:
    """The admin keys to use: the configured ones, or (none configured) a fresh key printed once to stderr.

    ``unlearn-gateway serve`` calls this once in the supervisor and hands the key to every worker through the
    environment, so all workers of one server accept the same generated key.
    """
    if keys or keys_file is not None:
        return keys
    key = generate_key("admin")
    print(f"UNLEARN_ADMIN_KEYS is empty: generated an admin key for this run (it changes on restart; set "
          f"UNLEARN_ADMIN_KEYS to keep one):\n  {key}", file=sys.stderr, flush=True)
    return [key]


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return server[1] if server else None


@dataclass(frozen=True)
class Denial:
    status: int
    message: str
    code: str | None


async def _deny(scope: Scope, send: Send, denial: Denial) -> None:
    if scope["type"] != "http":  # a websocket: refuse the handshake (the server answers 403)
        await send({"type": "websocket.close", "code": 1008})
        return
    type_ = {401: "authentication_error", 404: "not_found_error"}.get(denial.status, "permission_error")
    body = json.dumps({"error": {"message": denial.message, "type": type_, "param": None,
                                 "code": denial.code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if denial.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": denial.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: KeySource | KeyRing, admin_keys: KeySource | KeyRing | None = None,
                 admin_port: int | None = None):
        self.app = app
        self.admin_port = admin_port
        self.keys = keys if isinstance(keys, KeySource) else KeySource(keys)
        self.admin_keys = admin_keys if isinstance(admin_keys, KeySource) else KeySource(admin_keys or KeyRing())
        if not self.keys.configured:
            log.warning("UNLEARN_API_KEYS is empty: the OpenAI routes are OPEN to anyone who can reach this port "
                        "(development only)")

    def decide(self, path: str, token: str | None, port: int | None = None) -> str | None | Denial:
        """The id of the key that may use ``path`` (reached on ``port``), None for an open route, or why the request
        is refused."""
        if self.admin_port is not None and is_admin_path(path) != (port == self.admin_port):
            return Denial(404, "Not Found", None)  # exactly what an unknown route answers: nothing to learn
        if is_admin_path(path):
            found = self.admin_keys.match(token) if token is not None else None
            if found is not None:
                return found
            if token is None:
                return Denial(401, "Missing admin key: send 'Authorization: Bearer <admin key>'.", "invalid_api_key")
            if self.keys.match(token) is not None:
                return Denial(403, "User API keys are not valid under /admin: use an admin key.",
                              "admin_key_required")
            return Denial(401, "Invalid admin key.", "invalid_api_key")
        if not self.keys.configured:
            return None
        found = self.keys.match(token) if token is not None else None
        if found is not None:
            return found
        if token is None:
            return Denial(401, "Missing API key: send 'Authorization: Bearer <key>'.", "invalid_api_key")
        if self.admin_keys.match(token) is not None:
            return Denial(401, "Admin keys are not accepted on this route: use an API key.", "invalid_api_key")
        return Denial(401, "Invalid API key.", "invalid_api_key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)  # lifespan, and the public paths
            return
        decision = self.decide(scope["path"], bearer_token(scope), local_port(scope))
        if isinstance(decision, Denial):
            await _deny(scope, send, decision)
            return
        if decision is not None:
            scope.setdefault("state", {})["key_id"] = decision
        await self.app(scope, receive, send)
