"""Turning an import document (JSON array or JSONL) into validated targets, or into a full error report.

Everything here is CPU work without I/O, so the handler runs it in a thread: a 100,000-line import takes
seconds to parse and validate, and the worker must keep serving chat requests meanwhile. Every problem of the
document is collected (bad JSON on a line, a non-object, a field that fails validation, a duplicate id), so an
operator fixes the file in one pass instead of one error per attempt.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from gateway.admin.protocol import MAX_IMPORT_TARGETS, FieldError, InvalidInput
from gateway.errors import PayloadTooLarge, UnsupportedMediaType
from gateway.registry import ImportRejected, Target
from gateway.registry.changes import validate_batch

DocumentFormat = Literal["json", "jsonl"]
JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
                         "application/jsonlines", "application/json-seq"})
JSON_TYPES = frozenset({"application/json"})


def document_format(content_type: str | None, body: bytes) -> DocumentFormat:
    """From the content type; with none (or a generic one), from the first non-blank byte."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in JSONL_TYPES:
        return "jsonl"
    if media in JSON_TYPES:
        return "json"
    if media in ("", "application/octet-stream", "text/plain"):
        return "json" if body.lstrip()[:1] == b"[" else "jsonl"
    raise UnsupportedMediaType(f"unsupported content type {media!r}: send a JSON array as application/json or "
                               "JSON lines as application/x-ndjson (or application/jsonl)", code="unsupported_media")


def _too_many(count: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"an import holds at most {MAX_IMPORT_TARGETS:,} targets (this one has {count:,}); "
                           "split it into several upsert imports", code="too_many_targets")


def _parse_jsonl(text: str) -> tuple[list[Any], list[int], list[FieldError]]:
    items: list[Any] = []
    lines: list[int] = []
    errors: list[FieldError] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(items) + len(errors) >= MAX_IMPORT_TARGETS:
            raise _too_many(sum(1 for line in text.split("\n") if line.strip()))
        try:
            items.append(json.loads(raw))
            lines.append(number)
        except ValueError as exc:
            errors.append(FieldError(line=number, field="", message=f"invalid JSON: {exc}"))
    return items, lines, errors


def _parse_array(text: str) -> tuple[list[Any], list[int], list[FieldError]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [], [FieldError(line=exc.lineno, field="", message=f"invalid JSON: {exc.msg} (column {exc.colno})")]
    if not isinstance(document, list):
        return [], [], [FieldError(line=1, field="", message="expected a JSON array of targets (or send JSON lines "
                                                            "as application/x-ndjson)")]
    if len(document) > MAX_IMPORT_TARGETS:
        raise _too_many(len(document))
    return document, list(range(1, len(document) + 1)), []


def parse_document(body: bytes, fmt: DocumentFormat) -> list[Target]:
    """Validated targets in document order, or ``InvalidInput`` listing every problem (nothing is written)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput([FieldError(line=None, field="", message=f"the document is not UTF-8: {exc}")],
                           code="import_rejected") from None
    items, lines, errors = _parse_jsonl(text) if fmt == "jsonl" else _parse_array(text)
    kept_items, kept_lines = [], []
    for item, line in zip(items, lines, strict=True):
        if isinstance(item, dict):
            kept_items.append(item)
            kept_lines.append(line)
        else:
            errors.append(FieldError(line=line, field="", message=f"expected a JSON object, got "
                                                                   f"{type(item).__name__}"))
    targets: list[Target] = []
    try:
        targets = validate_batch(kept_items, kept_lines)
    except ImportRejected as rejected:
        errors.extend(FieldError(line=e.line, field=e.field, message=e.message) for e in rejected.errors)
    if not errors and not targets:
        errors.append(FieldError(line=None, field="", message="the document holds no targets"))
    if errors:
        errors.sort(key=lambda e: (e.line or 0))
        summary = (f"import rejected, nothing written: {len(errors)} problem(s); first: "
                   + (f"line {errors[0].line} " if errors[0].line is not None else "")
                   + (f"{errors[0].field}: " if errors[0].field else "") + errors[0].message)
        raise InvalidInput(errors, summary=summary, code="import_rejected")
    return targets
