"""API-key authentication as a pure ASGI middleware: every route is protected unless listed as public."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/docs", "/redoc", "/openapi.json"})


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """A set of keys kept only as hashes; ``check`` compares against every one in constant time."""

    def __init__(self, keys: list[str]):
        self._hashes = [hash_key(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def check(self, key: str) -> bool:
        candidate = hash_key(key)
        found = False
        for stored in self._hashes:
            found |= hmac.compare_digest(candidate, stored)
        return found


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app = app
        self.keys = keys
        if not keys:
            log.warning("UNLEARN_API_KEYS is empty: the OpenAI routes are OPEN to anyone who can reach this port "
                        "(development only)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.keys.check(token):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send 'Authorization: Bearer <key>'." if token is None else "Invalid API key."
        body = json.dumps({"error": {"message": message, "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
