"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process serves HTTP")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the engine can generate")
async def ready(request: Request) -> JSONResponse:
    engine_ready = await request.app.state.engine.ready()
    return JSONResponse({"ready": engine_ready, "engine": request.app.state.settings.engine},
                        status_code=200 if engine_ready else 503)
