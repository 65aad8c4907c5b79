"""The application factory: settings in, a FastAPI app out. No module-level state."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import __version__, health
from gateway.auth import APIKeyMiddleware, KeyRing
from gateway.engines import Engine, build_engine
from gateway.errors import BadRequest, GatewayError
from gateway.openai import router as openai_router
from gateway.openai.handler import OpenAIHandler
from gateway.settings import Settings

log = logging.getLogger(__name__)

_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.envelope().model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(BadRequest(message, param=param).envelope().model_dump(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal error", "server_error")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the gateway. ``engine`` may be given (tests, benchmarks); else it follows the settings."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_engine = engine is None
        app.state.engine = engine if engine is not None else build_engine(settings)
        await app.state.engine.start()
        app.state.openai_handler = OpenAIHandler(app.state.engine)
        try:
            yield
        finally:
            if own_engine:
                await app.state.engine.aclose()

    app = FastAPI(title="unlearn-gateway", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible gateway that makes a served model forget named targets.")
    app.state.settings = settings
    app.include_router(openai_router.router)
    app.include_router(health.router)
    _install_error_handlers(app)
    app.add_middleware(APIKeyMiddleware, keys=KeyRing(settings.api_keys))
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes: settings come from the environment."""
    return create_app(Settings())
