"""Pins one target snapshot per request and reports its version in ``x-unlearn-targets-version``.

A pure ASGI middleware, so the header lands on every response, streamed ones included (it is added to the
``http.response.start`` message, which precedes the first byte of any body), without the OpenAI handler knowing.
The snapshot read at the start of the request is put in ``scope["state"]["targets"]`` (``request.state.targets``)
and the classifier must use that object: the request is then judged against exactly the version its header
names, even if a reload swaps the set while it runs.

Fail closed: until a worker has loaded the target set once, it refuses generation requests (503) instead of
serving them with no targets at all; with ``fail_mode="refuse"`` it passes them on with the not-loaded placeholder
pinned and the unlearning step answers with the refusal. After the first load it always has a last good set,
whatever the store does.

``/admin`` responses are left alone: they report the version of the data they read or wrote themselves.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import is_admin_path
from gateway.registry.reload import TargetReloader
from gateway.telemetry.context import RequestTelemetry

HEADER = b"x-unlearn-targets-version"


class TargetsVersionMiddleware:
    def __init__(self, app: ASGIApp, reloader: TargetReloader, fail_mode: str = "error"):
        self.app = app
        self.reloader = reloader
        self.answer_unloaded = fail_mode == "error"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_admin_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        active = self.reloader.current
        if (not active.loaded and self.answer_unloaded and scope["method"] == "POST"
                and scope["path"].startswith("/v1/")):
            telemetry = scope["state"].get("telemetry") if "state" in scope else None
            if isinstance(telemetry, RequestTelemetry):
                telemetry.record_fail_closed("targets_not_loaded")
            await _not_loaded(send)
            return
        scope.setdefault("state", {})["targets"] = active
        value = str(active.version).encode()

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, value)]
            await send(message)

        await self.app(scope, receive, send_with_version)


async def _not_loaded(send: Send) -> None:
    body = json.dumps({"error": {
        "message": "The forget targets are not loaded yet (the target store has not answered since startup); "
                   "try again shortly.",
        "type": "service_unavailable", "param": None, "code": "targets_not_loaded"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
