"""Routes of the OpenAI surface: thin functions that hand over to ``OpenAIHandler``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.errors import ErrorResponse
from gateway.openai.handler import OpenAIHandler
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelList


async def get_handler(request: Request) -> OpenAIHandler:  # async: no thread-pool hop per request
    return request.app.state.openai_handler


Handler = Annotated[OpenAIHandler, Depends(get_handler)]

_errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 502, 503)}
router = APIRouter(prefix="/v1", tags=["openai"], responses=_errors)


@router.post("/chat/completions", summary="Create a chat completion (JSON or SSE stream)")
async def chat_completions(body: ChatCompletionRequest, request: Request, handler: Handler) -> Response:
    return await handler.chat(body, request)


@router.post("/completions", summary="Create a completion for raw prompts (JSON or SSE stream)")
async def completions(body: CompletionRequest, request: Request, handler: Handler) -> Response:
    return await handler.completions(body, request)


@router.get("/models", summary="List the served models")
async def models(handler: Handler) -> ModelList:
    return handler.models()
