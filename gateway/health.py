"""Liveness and readiness."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process serves HTTP")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the engine can generate and the forget targets are current")
async def ready(request: Request) -> JSONResponse:
    """503 while the engine cannot generate, before the first target load, or once the target store has been
    unreachable past ``UNLEARN_STORE_GRACE_S`` (requests are still served with the last good set meanwhile).
    ``pid`` names the worker process that answered, so tools can tell a server's workers apart."""
    engine_ready = await request.app.state.engine.ready()
    targets = request.app.state.targets
    is_ready = engine_ready and targets.ready()
    status = targets.status()
    return JSONResponse({"ready": is_ready, "engine": request.app.state.settings.engine,
                         "engine_ready": engine_ready, "targets_version": status["version"], "targets": status,
                         "pid": os.getpid()},
                        status_code=200 if is_ready else 503)
