"""Routes of the admin API: thin functions that hand over to ``AdminHandler``.

Authentication is the middleware's (admin keys only under ``/admin``); it leaves the key's id in
``request.state.key_id``, recorded as the actor of every write. Validation errors here are 422 with every field
path listed (``AdminRoute``), unlike the OpenAI routes' 400, because the admin API promises 422.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import AwareDatetime
from starlette.responses import JSONResponse, StreamingResponse

from gateway.admin.handler import AdminHandler
from gateway.admin.imports import document_format
from gateway.admin.protocol import (
    MAX_IMPORT_BYTES,
    MAX_PAGE,
    PATCH_EXAMPLES,
    TARGET_EXAMPLES,
    AdminErrorResponse,
    ClassifyRequest,
    ExportFormat,
    FieldError,
    ImportResult,
    InvalidInput,
    Method,
    TargetDeleted,
    TargetHistory,
    TargetPage,
    TargetReplacement,
    TargetView,
    TargetWritten,
    VersionInfo,
)
from gateway.errors import PayloadTooLarge
from gateway.registry import ImportMode, Target, TargetPatch

VERSION_HEADER = "x-unlearn-targets-version"


class AdminRoute(APIRoute):
    """Turns FastAPI's request validation errors into the admin API's 422 envelope with all field paths."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                details = [FieldError(field=".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                                      message=str(err.get("msg", "invalid")))
                           for err in exc.errors()]
                raise InvalidInput(details) from None

        return route_handler


async def get_handler(request: Request) -> AdminHandler:
    return request.app.state.admin_handler


async def get_actor(request: Request) -> str:
    """The id of the admin key that authenticated this request (set by the auth middleware)."""
    return getattr(request.state, "key_id", None) or "unknown"


Handler = Annotated[AdminHandler, Depends(get_handler)]
Actor = Annotated[str, Depends(get_actor)]
AsOf = Annotated[AwareDatetime | None, Query(description="ISO 8601 time with a timezone, e.g. "
                                                         "2026-01-01T12:00:00Z: the state as it was then")]

_errors: dict[int | str, dict[str, Any]] = {status: {"model": AdminErrorResponse}
                                            for status in (401, 403, 404, 409, 422, 503)}
router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute, responses=_errors,
                   dependencies=[Depends(HTTPBearer(auto_error=False, description="an admin key"))])


def _versioned(response: Response, version: int) -> None:
    response.headers[VERSION_HEADER] = str(version)


@router.post("/targets", status_code=201, summary="Create a target (409 if its id exists)")
async def create_target(target: Annotated[Target, Body(openapi_examples=TARGET_EXAMPLES)], handler: Handler,
                        actor: Actor, response: Response) -> TargetWritten:
    written = await handler.create(target, actor)
    _versioned(response, written.version)
    response.headers["location"] = f"/admin/targets/{written.target.id}"
    return written


@router.get("/targets", summary="List targets (sorted by id; filters; limit/offset or cursor paging)",
            response_model=TargetPage)
async def list_targets(
    handler: Handler,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    enabled: bool | None = None,
    method: Annotated[Method | None, Query(description="policy method")] = None,
    text: Annotated[str | None, Query(min_length=1, description="case-insensitive substring of the name, an alias "
                                                                "or the description")] = None,
    as_of: AsOf = None,
) -> JSONResponse:
    page = await handler.list(limit=limit, offset=offset, cursor=cursor, enabled=enabled, method=method, text=text,
                              as_of=as_of)
    return JSONResponse(page, headers={VERSION_HEADER: str(page["version"])})


@router.post("/targets/import", summary="Import many targets at once: all or nothing",
             description="Body: a JSON array of targets (`application/json`) or one target per line "
                         "(`application/x-ndjson` or `application/jsonl`), up to 100,000. `mode=upsert` adds or "
                         "overwrites the given targets; `mode=replace` makes the document the whole set. Any "
                         "problem rejects the whole import (422) with one entry per problem: line and field path.",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Target"}},
                                      "example": [{"name": "Jane Doe"}, {"name": "John Roe",
                                                                          "policy": {"method": "refuse"}}]},
                 "application/x-ndjson": {"schema": {"type": "string"},
                                          "example": '{"name": "Jane Doe"}\n{"name": "John Roe"}\n'}}}})
async def import_targets(request: Request, handler: Handler, actor: Actor, response: Response,
                         mode: ImportMode = "upsert") -> ImportResult:
    body = await _read_capped(request, MAX_IMPORT_BYTES)
    result = await handler.import_document(body, document_format(request.headers.get("content-type"), body), mode,
                                           actor)
    _versioned(response, result.version)
    return result


@router.get("/targets/export", summary="Export every target (JSONL stream or JSON array)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}, "application/json": {}}}})
async def export_targets(handler: Handler, format: ExportFormat = "jsonl", as_of: AsOf = None) -> StreamingResponse:
    version, chunks = await handler.export(format, as_of)
    media = "application/x-ndjson" if format == "jsonl" else "application/json"
    return StreamingResponse(chunks, media_type=media, headers={VERSION_HEADER: str(version)})


@router.get("/targets/{target_id}", summary="Get one target (optionally as it was at a past time)",
            response_model=TargetView)
async def get_target(target_id: str, handler: Handler, as_of: AsOf = None) -> JSONResponse:
    return JSONResponse(await handler.get(target_id, as_of))


@router.put("/targets/{target_id}", summary="Replace a target (its id stays)")
async def replace_target(target_id: str, body: Annotated[TargetReplacement, Body(openapi_examples=TARGET_EXAMPLES)],
                         handler: Handler, actor: Actor, response: Response) -> TargetWritten:
    written = await handler.replace(target_id, body, actor)
    _versioned(response, written.version)
    return written


@router.patch("/targets/{target_id}", summary="Change some fields of a target (same-method policy fields merge)")
async def patch_target(target_id: str, patch: Annotated[TargetPatch, Body(openapi_examples=PATCH_EXAMPLES)],
                       handler: Handler, actor: Actor, response: Response) -> TargetWritten:
    written = await handler.patch(target_id, patch, actor)
    _versioned(response, written.version)
    return written


@router.delete("/targets/{target_id}", summary="Delete a target (its history stays)")
async def delete_target(target_id: str, handler: Handler, actor: Actor, response: Response) -> TargetDeleted:
    deleted = await handler.delete(target_id, actor)
    _versioned(response, deleted.version)
    return deleted


@router.get("/targets/{target_id}/history", summary="Every change of a target: who, when, before and after")
async def target_history(target_id: str, handler: Handler) -> TargetHistory:
    return await handler.history(target_id)


@router.get("/version", summary="The store's target set version and the one this worker serves")
async def version(handler: Handler, response: Response) -> VersionInfo:
    info = await handler.version()
    _versioned(response, info.version)
    return info


@router.post("/classify", summary="Dry-run the classifier on a conversation or text (ARCHITECTURE §6)",
             responses={501: {"model": AdminErrorResponse}})
async def classify(body: ClassifyRequest, handler: Handler) -> dict:
    return await handler.classify(body)


async def _read_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) more than ``cap`` bytes before reading them all into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"import body over {cap // 2**20} MiB", code="body_too_large")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"import body over {cap // 2**20} MiB", code="body_too_large")
        parts.append(chunk)
    return b"".join(parts)

