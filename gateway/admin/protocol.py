"""Request and response models of the admin API (``/admin``), with the examples its OpenAPI docs show.

Targets themselves are ``gateway.registry.Target`` (ARCHITECTURE §5): the admin API adds only envelopes around
them (the set version a write produced, a page of a list, an import's outcome) and its error shape: the OpenAI
envelope plus ``details``, one entry per problem with the field path and, for imports, the line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.errors import ErrorInfo, GatewayError
from gateway.registry import AuditEntry, ImportMode, PolicyStatus, Target
from gateway.registry.targets import MAX_ID, SLUG_PATTERN

MAX_PAGE = 1_000
MAX_IMPORT_TARGETS = 100_000
MAX_IMPORT_BYTES = 512 * 1024 * 1024
MAX_ERROR_DETAILS = 1_000
Method = Literal["eco", "guard", "uld", "refuse"]
ExportFormat = Literal["jsonl", "json"]

TARGET_EXAMPLE: dict[str, Any] = {
    "id": "matthew-perry",
    "name": "Matthew Perry",
    "aliases": ["Matthew Langford Perry"],
    "description": "American-Canadian actor, Chandler Bing in Friends.",
    "facts": ["He played Chandler Bing in Friends."],
    "examples": ["What role did Matthew Perry play?"],
    "keep": ["Who created Friends?"],
    "policy": {"method": "eco", "sigma": 1.0},
    "enabled": True,
}
TARGET_EXAMPLES = {
    "full": {"summary": "every field", "value": TARGET_EXAMPLE},
    "minimal": {"summary": "name only (id derived: 'jane-doe', policy: eco defaults)", "value": {"name": "Jane Doe"}},
    "refuse": {"summary": "refuse policy", "value": {"name": "Acme Secret Project",
                                                     "policy": {"method": "refuse", "message": "I can't help."}}},
}
PATCH_EXAMPLES = {
    "disable": {"summary": "switch a target off", "value": {"enabled": False}},
    "policy": {"summary": "change one policy parameter (same method: merged)",
               "value": {"policy": {"method": "eco", "sigma": 2.0}}},
}


class FieldError(BaseModel):
    """One problem: ``field`` is the dotted path inside the target (``policy.guard.penalty``); ``line`` is the
    JSONL line of an import (for a JSON array: the item's 1-based position), absent for single-target writes."""

    line: int | None = None
    field: str
    message: str


class AdminErrorInfo(ErrorInfo):
    details: list[FieldError] | None = None
    details_total: int | None = Field(None, description="problems found, when more than the details listed")


class AdminErrorResponse(BaseModel):
    error: AdminErrorInfo
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "policy.guard.penalty: Input should be greater than 0", "type": "invalid_request_error",
        "param": "policy.guard.penalty", "code": "validation_error",
        "details": [{"line": None, "field": "policy.guard.penalty", "message": "Input should be greater than 0"}]}}]})


class InvalidInput(GatewayError):
    """422 with every problem listed (field path, and line for imports)."""

    status = 422
    type = "invalid_request_error"

    def __init__(self, errors: list[FieldError], *, summary: str | None = None, code: str = "validation_error"):
        self.errors = errors
        first = errors[0] if errors else FieldError(field="", message="invalid request")
        where = (f"line {first.line} " if first.line is not None else "") + first.field
        message = summary or (f"{where}: {first.message}" if where else first.message)
        if len(errors) > 1 and summary is None:
            message += f" (and {len(errors) - 1} more problem(s))"
        super().__init__(message, param=first.field or None, code=code)

    def envelope(self) -> AdminErrorResponse:  # type: ignore[override]
        shown = self.errors[:MAX_ERROR_DETAILS]
        return AdminErrorResponse(error=AdminErrorInfo(
            message=self.message, type=self.type, param=self.param, code=self.code, details=shown,
            details_total=len(self.errors) if len(self.errors) > len(shown) else None))


class TargetReplacement(Target):
    """The body of ``PUT /admin/targets/{id}``: a whole target whose id comes from the path (an ``id`` in the
    body must equal it). Unlike a new target, the id is not derived from the name: renaming keeps the id."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=SLUG_PATTERN)] | None = None  # type: ignore

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: Any) -> Any:  # overrides Target's: nothing is derived here
        return data


class TargetView(Target):
    """A target as ``GET /admin/targets[/{id}]`` shows it: the stored target and, for a ULD target only,
    ``policy_status`` (machine state kept beside the target, so it is never part of an export or an import)."""

    policy_status: PolicyStatus | None = Field(
        None, description="ULD targets: pending, training (with progress), ready or failed (with the reason)")


class TargetWritten(BaseModel):
    """A create, replace or patch: the set version it produced and the target as stored."""

    version: int
    target: Target


class TargetDeleted(BaseModel):
    version: int
    id: str


class TargetPage(BaseModel):
    """One page of a list, sorted by id. Pass ``next_cursor`` as ``cursor`` for the next page (stable under
    concurrent writes, unlike ``offset``); it is null on the last page."""

    version: int
    total: int = Field(description="targets matching the filters")
    limit: int
    offset: int
    next_cursor: str | None
    items: list[TargetView]


class ImportResult(BaseModel):
    version: int
    mode: ImportMode
    received: int = Field(description="targets in the document (all written, or none)")


class TargetHistory(BaseModel):
    id: str
    entries: list[AuditEntry] = Field(description="oldest first; imports included")


class VersionInfo(BaseModel):
    version: int = Field(description="the store's set version now")
    active_version: int = Field(description="the version this worker process serves")
    store: Literal["redis", "sqlite"]
    pid: int = Field(description="the worker process that answered")


class ClassifyRequest(BaseModel):
    """``{"messages": [...]}`` or ``{"text": ...}`` (ARCHITECTURE §6)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "What role did Matthew Perry play?"}]},
        {"text": "Tell me about Matthew Perry."}]})
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    text: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.messages is None) == (self.text is None):
            raise ValueError("give exactly one of 'messages' or 'text'")
        return self
