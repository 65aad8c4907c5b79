"""The reference worker's HTTP app: vLLM 0.33's OpenAI server subset over the local engine.

Errors use vLLM's shape, ``{"error": {"message", "type", "param", "code": <HTTP status>}}``, so the
gateway's vLLM engine meets exactly what a real vLLM server sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway import __version__
from gateway.engines.local import LoadedModel, LocalEngine
from gateway.errors import BadRequest, GatewayError
from gateway.openai.handler import Extras, OpenAIHandler
from gateway.prompt_embeds import decode_embeds
from gateway.worker.protocol import (
    TokenizeRequest,
    WorkerChatRequest,
    WorkerCompletionRequest,
    XargValue,
    engine_messages,
)
from policies.processors import BadWords, LogitBias, LogitsProcessor

# Turns a request's vllm_xargs into a logits processor (or None when the args are not for it): the
# reference worker's counterpart of vLLM's `vllm.logits_processors` plugins.
XargsProcessorFactory = Callable[[dict[str, XargValue], LoadedModel], LogitsProcessor | None]


def _vllm_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    type_ = HTTPStatus(status).phrase.replace(" ", "") + "Error" if status != 500 else "InternalServerError"
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


def _processors(body, model: LoadedModel, factories: Sequence[XargsProcessorFactory]) -> tuple[LogitsProcessor, ...]:
    processors: list[LogitsProcessor] = []
    if body.logit_bias:
        vocab = len(model.tokenizer)
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError as exc:
            raise BadRequest("logit_bias keys must be token ids", param="logit_bias") from exc
        if any(not 0 <= k < vocab for k in bias):
            raise BadRequest(f"logit_bias token ids must lie in [0, {vocab})", param="logit_bias")
        processors.append(LogitBias(bias))
    if body.bad_words:
        processors.append(BadWords.from_words(body.bad_words, model.encode))
    for factory in factories:
        processor = factory(body.vllm_xargs or {}, model)
        if processor is not None:
            processors.append(processor)
    return tuple(processors)


def _check_logprob_ids(body, model: LoadedModel) -> None:
    ids = getattr(body, "logprob_token_ids", None) or []
    vocab = len(model.tokenizer)
    if any(not 0 <= i < vocab for i in ids):
        raise BadRequest(f"logprob_token_ids must lie in [0, {vocab})", param="logprob_token_ids")


def create_worker_app(engine: LocalEngine, xargs_processors: Sequence[XargsProcessorFactory] | None = None) -> FastAPI:
    """``xargs_processors`` default: GUARD (``gateway.worker.guard.GuardXargs``), as our vLLM plugin installs it."""
    if xargs_processors is None:
        from gateway.worker.guard import GuardXargs

        xargs_processors = [GuardXargs()]
    handler = OpenAIHandler(engine)
    model = engine.main

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await engine.aclose()

    app = FastAPI(title="unlearn-gateway reference worker (vLLM 0.33 protocol subset)", version=__version__,
                  lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return _vllm_error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _vllm_error(400, f"{param}: {first['msg']}" if param else str(first["msg"]), param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _vllm_error(exc.status_code, str(exc.detail))

    @app.post("/v1/chat/completions")
    async def chat(body: WorkerChatRequest, request: Request) -> Response:
        _check_logprob_ids(body, model)
        extras = Extras(_processors(body, model, xargs_processors), body.return_tokens_as_token_ids)
        return await handler.chat(body, request, messages=engine_messages(body.messages), extras=extras)

    @app.post("/v1/completions")
    async def completions(body: WorkerCompletionRequest, request: Request) -> Response:
        _check_logprob_ids(body, model)
        prompts: list[dict] = []
        embeds = [body.prompt_embeds] if isinstance(body.prompt_embeds, str) else (body.prompt_embeds or [])
        prompts += [{"prompt_embeds": decode_embeds(e, "prompt_embeds")} for e in embeds]
        if isinstance(body.prompt, str):
            prompts.append({"prompt": body.prompt})
        elif body.prompt and all(isinstance(p, int) for p in body.prompt):
            prompts.append({"prompt_ids": list(body.prompt)})
        elif body.prompt:
            prompts += [{"prompt": p} for p in body.prompt]
        if not prompts:
            raise BadRequest("either prompt or prompt_embeds must be given", param="prompt")
        extras = Extras(_processors(body, model, xargs_processors), body.return_tokens_as_token_ids)
        return await handler.completions(body, request, prompts=prompts, extras=extras)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if body.messages is not None:
            ids = model.render_chat(engine_messages(body.messages), body.add_generation_prompt).ids
        elif body.prompt is not None:
            ids = model.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        else:
            raise BadRequest("either prompt or messages must be given", param="prompt")
        strs = model.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids, "token_strs": strs}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": str(model.path),
             "parent": None, "max_model_len": model.max_model_len} for name in engine.model_names()]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    return app
