"""The application factory: settings in, a FastAPI app out. No module-level state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from gateway import __version__, health, metrics
from gateway.admin import router as admin_router
from gateway.admin.handler import AdminHandler
from gateway.auth import APIKeyMiddleware, KeySource, ensure_admin_key
from gateway.engines import Engine, build_engine
from gateway.engines.policy import sentence_rows
from gateway.errors import BadRequest, GatewayError
from gateway.limits import BodySizeLimitMiddleware
from gateway.openai import router as openai_router
from gateway.openai.handler import OpenAIHandler
from gateway.output_guard import OutputGuardIndexBuilder
from gateway.ratelimit import RateLimitMiddleware, build_limiter
from gateway.registry import TargetStore, open_store
from gateway.registry.reload import IndexBuilder, TargetReloader
from gateway.settings import Settings
from gateway.shutdown import ShutdownMiddleware
from gateway.targets_middleware import TargetsVersionMiddleware
from gateway.telemetry.engine import instrument
from gateway.telemetry.middleware import TelemetryConfig, TelemetryMiddleware
from gateway.telemetry.tracing import RequestTracer, build_tracer
from gateway.training import PolicyStatusView, TrainingConfig, UldTrainer
from gateway.unlearning import GUARD_GENERIC_INDEX, GuardGenericBuilder, Unlearner

if TYPE_CHECKING:
    from classifiers.encoder import Encoder

log = logging.getLogger(__name__)

_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _reported(errors: Sequence[Any]) -> tuple[dict[str, Any], tuple]:
    """The validation error to tell the client about, and where. A value that fits no member of a union (``stop``:
    a string or a list) yields one error per member, each under a member tag (``stop.str``, ``stop.list[str]``):
    report the first that is about the value rather than its type (the list is too long), under the field's path."""
    if not errors:
        return {"msg": "invalid request"}, ()
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    loc = tuple(first.get("loc", ()))
    for other in errors:  # another member of the same union: same parent path, the very same input value
        other_loc = tuple(other.get("loc", ()))
        if other_loc != loc and other_loc[:-1] == loc[:-1] and other.get("input") is first.get("input"):
            return first, loc[:-1]  # without the member's tag
    return first, loc


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.envelope().model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first, loc = _reported(exc.errors())
        param = ".".join(str(part) for part in loc if part != "body") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(BadRequest(message, param=param).envelope().model_dump(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal error", "server_error")


def _policy_kit(settings: Settings, engine: Engine, encoder: Callable[[], Encoder] | None):
    """What the policies need of the served model: its tokenizer and embedding rows (and GUARD's state, with
    ``encoder``, the classifier's, for its fact retrieval and semantic neighbours).

    The local engine has them in memory; in front of vLLM they come from a local copy of the served checkpoint
    (``UNLEARN_MODEL``). Without one, flagged requests can only be refused (``Unlearner`` handles None).
    """
    from gateway.engines.local import LocalEngine
    from gateway.engines.policy import checkpoint_kit, local_kit

    if isinstance(engine, LocalEngine):
        return local_kit(engine, encoder)
    try:
        return checkpoint_kit(settings.model, encoder)
    except (OSError, ValueError) as exc:
        log.warning("no local copy of the served model (%s): flagged requests will be refused", exc)
        return None


def _uld_trainer(settings: Settings, store: TargetStore, reloader: TargetReloader) -> UldTrainer | None:
    """The background trainer of ULD assistants, when this gateway trains them (``gateway.training``)."""
    if not settings.trains_uld():
        log.info("ULD assistants are not trained here (uld_auto_train off, engine %s): run `unlearn-gateway train "
                 "assistant` where the model can be trained and register each adapter by path (policy.adapter); "
                 "until then ULD targets are enforced with their fallback policy", settings.engine)
        return None
    config = TrainingConfig(settings.model, settings.resolved_adapters_dir(), settings.uld_train_epochs,
                            settings.uld_train_lease_s)
    return UldTrainer(store, reloader, config)


def create_app(settings: Settings | None = None, engine: Engine | None = None, *, store: TargetStore | None = None,
               index_builders: Sequence[IndexBuilder] | None = None, tracer: RequestTracer | None = None) -> FastAPI:
    """Build the gateway. ``engine`` and ``store`` may be given (tests, benchmarks); else they follow the settings.

    ``index_builders`` turn each target set into what the request path needs; every worker process rebuilds them
    off the request path whenever the set changes (``gateway.registry.reload``). Default: the classifier's index,
    which the unlearning step needs (without it, requests are refused with 503 once targets exist: fail closed).
    ``tracer``: OpenTelemetry span export (tests); else one is built when ``UNLEARN_OTEL_ENDPOINT`` is set.
    """
    settings = settings or Settings()
    if settings.log_content:
        log.warning("UNLEARN_LOG_CONTENT is on: prompts and completions are written to the logs")
    admin_keys = ensure_admin_key(settings.admin_keys, settings.admin_keys_file)
    own_store = store is None
    target_store = store if store is not None else open_store(settings.resolved_store_url(), settings.store_path,
                                                              prefix=settings.store_prefix)
    from classifiers.index import IndexBuilder as ClassifierIndexBuilder

    if index_builders is None:
        classifier_builder = ClassifierIndexBuilder()
        index_builders = (classifier_builder, OutputGuardIndexBuilder(sentence_rows(classifier_builder.encoder)))
    # GUARD's fact retrieval and semantic neighbours use the classifier's encoder (no second MiniLM in memory).
    classifier_builder = next((b for b in index_builders if isinstance(b, ClassifierIndexBuilder)), None)
    encoder = classifier_builder.encoder if classifier_builder is not None else None
    if not any(b.name == GUARD_GENERIC_INDEX for b in index_builders):
        index_builders = (*index_builders, GuardGenericBuilder())
    reloader = TargetReloader(target_store, index_builders, resync_interval_s=settings.resync_interval_s,
                              grace_s=settings.store_grace_s)
    registry, instruments = metrics.build_metrics(reloader, settings.metrics_max_target_labels)
    reloader.swap_listeners.append(lambda _version, lag: instruments.observe_reload(lag))
    if tracer is None and settings.otel_endpoint:
        tracer = build_tracer(settings.otel_endpoint, settings.otel_service_name)
    limiter = build_limiter(settings.rate_limit_rpm, settings.resolved_store_url(), settings.store_prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_engine = engine is None
        unlearner = None
        trainer = None
        app.state.engine = engine if engine is not None else build_engine(settings)
        try:
            await reloader.start()
            await app.state.engine.start()
            # The handler sees the engine through the telemetry wrapper (upstream time, upstream errors).
            kit = _policy_kit(settings, app.state.engine, encoder)
            unlearner = Unlearner(kit, settings.engine, fail_mode=settings.fail_mode,
                                  classify_timeout_s=settings.classify_timeout_s,
                                  lockstep_uld=bool(getattr(app.state.engine, "assistant_url", None)))
            if kit is not None:  # GUARD's vocabulary table off the request path (the first GUARD request waits)
                asyncio.get_running_loop().run_in_executor(None, kit.guard.warm)
            app.state.openai_handler = OpenAIHandler(instrument(app.state.engine, instruments), unlearner)
            app.state.admin_handler = AdminHandler(target_store, reloader, PolicyStatusView(
                target_store, settings.model, settings.trains_uld(), unlearner.serves_uld))
            trainer = _uld_trainer(settings, target_store, reloader)
            if trainer is not None:
                await trainer.start()
            yield
        finally:
            if trainer is not None:
                await trainer.aclose()
            if unlearner is not None:
                await unlearner.aclose()
            await reloader.aclose()
            if own_store:
                await target_store.aclose()
            if own_engine:
                await app.state.engine.aclose()
            if tracer is not None:
                tracer.shutdown()
            if limiter is not None:
                await limiter.aclose()

    app = FastAPI(title="unlearn-gateway", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible gateway that makes a served model forget named targets.")
    app.state.settings = settings
    app.state.store = target_store
    app.state.targets = reloader
    app.state.metrics_registry = registry
    app.state.metrics = instruments
    app.include_router(openai_router.router)
    app.include_router(admin_router.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    _install_error_handlers(app)
    app.add_middleware(ShutdownMiddleware)  # innermost: a request cut by shutdown still gets an answer, counted
    app.add_middleware(TargetsVersionMiddleware, reloader=reloader,  # inside auth: rejected requests skip it
                       fail_mode=settings.fail_mode)
    # The admin import streams and caps its own body (up to 512 MiB); everything else is capped here.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, exempt=("/admin/targets/import",))
    if limiter is not None:  # inside auth: counts by the key that authenticated; rejected requests never count
        app.add_middleware(RateLimitMiddleware, limiter=limiter, rpm=settings.rate_limit_rpm)
    app.add_middleware(APIKeyMiddleware, keys=KeySource(settings.api_keys, settings.api_keys_file),
                       admin_keys=KeySource(admin_keys, settings.admin_keys_file), admin_port=settings.admin_port)
    if settings.cors_origins:  # outside auth: preflight requests carry no key; error responses get the headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                           allow_headers=["authorization", "content-type"],
                           expose_headers=["x-unlearn-decision", "x-unlearn-targets-version", "retry-after"])
    app.add_middleware(TelemetryMiddleware, metrics=instruments, tracer=tracer,  # outermost: counts rejections too
                       config=TelemetryConfig(log_content=settings.log_content))
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes: settings come from the environment."""
    return create_app(Settings())
