"""The logic behind ``/admin``: validated writes to the target store, consistent reads, imports and exports.

Writes go straight to the store, which bumps the set version and notifies every worker (this one included);
the response carries the new version so a caller can wait for it (``x-unlearn-targets-version`` on ``/ready``
or any OpenAI response). Reads are served from this worker's in-memory snapshot when it is current (one cheap
version read decides), else from a fresh store snapshot, so a read right after a write through another replica
still sees it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from gateway.admin.imports import DocumentFormat, parse_document
from gateway.admin.protocol import (
    ExportFormat,
    FieldError,
    ImportResult,
    InvalidInput,
    Method,
    TargetDeleted,
    TargetHistory,
    TargetPage,
    TargetReplacement,
    TargetWritten,
    VersionInfo,
)
from gateway.errors import BadRequest, NotInstalled
from gateway.registry import ImportMode, Target, TargetNotFound, TargetPatch, TargetStore
from gateway.registry.reload import TargetReloader
from gateway.registry.sqlite_store import SQLiteTargetStore
from gateway.training import PolicyStatusView

EXPORT_CHUNK = 1_000  # targets per streamed chunk


def validation_details(exc: ValidationError, *, line: int | None = None) -> list[FieldError]:
    return [FieldError(line=line, field=".".join(str(p) for p in err["loc"]), message=err["msg"])
            for err in exc.errors(include_url=False)]


def _matches(target: Target, enabled: bool | None, method: Method | None, text: str | None) -> bool:
    if enabled is not None and target.enabled != enabled:
        return False
    if method is not None and target.policy.method != method:
        return False
    if text:
        needle = text.casefold()
        haystack = (target.name, target.description, *target.aliases)
        return any(needle in field.casefold() for field in haystack)
    return True


def _shown(target: Target, statuses: Mapping[str, Any]) -> dict[str, Any]:
    """A target as JSON, with its ``policy_status`` when it has one (``TargetView``)."""
    shown = target.model_dump(mode="json")
    if (status := statuses.get(target.id)) is not None:
        shown["policy_status"] = status.model_dump(mode="json")
    return shown


class AdminHandler:
    def __init__(self, store: TargetStore, reloader: TargetReloader, statuses: PolicyStatusView | None = None):
        """``statuses``: how ULD targets' ``policy_status`` is shown (None: not shown)."""
        self.store = store
        self.reloader = reloader
        self.statuses = statuses

    async def _statuses(self, targets: Sequence[Target]) -> Mapping[str, Any]:
        return await self.statuses.of(targets) if self.statuses is not None else {}

    # -- reads ------------------------------------------------------------------------------------------------

    async def _read_set(self, as_of: datetime | None) -> tuple[int, Sequence[Target]]:
        if as_of is not None:
            return await self.store.as_of(as_of)
        version = await self.store.version()
        active = self.reloader.current
        if active.loaded and active.version == version:
            return version, active.targets
        return await self.store.snapshot()

    async def list(self, *, limit: int, offset: int, cursor: str | None, enabled: bool | None,
                   method: Method | None, text: str | None, as_of: datetime | None) -> dict[str, Any]:
        """A ``TargetPage`` as JSON; current (not ``as_of``) pages show ULD targets' ``policy_status``."""
        if cursor is not None and offset:
            raise InvalidInput([FieldError(field="offset", message="give either cursor or offset, not both")])
        version, targets = await self._read_set(as_of)
        matching = [t for t in targets if _matches(t, enabled, method, text)]  # sorted by id already
        if cursor is not None:
            start = next((i for i, t in enumerate(matching) if t.id > cursor), len(matching))
        else:
            start = offset
        page = matching[start:start + limit]
        more = start + limit < len(matching)
        statuses = await self._statuses(page) if as_of is None else {}
        envelope = TargetPage(version=version, total=len(matching), limit=limit, offset=start,
                              next_cursor=page[-1].id if more and page else None, items=[])
        return envelope.model_dump(mode="json") | {"items": [_shown(t, statuses) for t in page]}

    async def get(self, target_id: str, as_of: datetime | None) -> dict[str, Any]:
        """A ``TargetView`` as JSON (``policy_status`` for a ULD target, unless ``as_of`` asks for the past)."""
        if as_of is None:
            found = await self.store.get(target_id)
        else:
            _, targets = await self.store.as_of(as_of)
            found = next((t for t in targets if t.id == target_id), None)
        if found is None:
            raise TargetNotFound(target_id)
        return _shown(found, await self._statuses([found]) if as_of is None else {})

    async def history(self, target_id: str) -> TargetHistory:
        entries = await self.store.history(target_id)
        if not entries:
            raise TargetNotFound(target_id)
        return TargetHistory(id=target_id, entries=entries)

    async def version(self) -> VersionInfo:
        store = "sqlite" if isinstance(self.store, SQLiteTargetStore) else "redis"
        return VersionInfo(version=await self.store.version(), active_version=self.reloader.current.version,
                           store=store, pid=os.getpid())

    async def export(self, fmt: ExportFormat, as_of: datetime | None) -> tuple[int, AsyncIterator[bytes]]:
        """The set as JSONL (one target per line) or one JSON array, streamed in chunks."""
        version, targets = await self._read_set(as_of)

        async def chunks() -> AsyncIterator[bytes]:
            if fmt == "json":
                yield b"["
            for start in range(0, len(targets), EXPORT_CHUNK):
                part = targets[start:start + EXPORT_CHUNK]
                if fmt == "json":
                    text = ",".join(t.model_dump_json() for t in part)
                    yield (("," if start else "") + text).encode()
                else:
                    yield "".join(t.model_dump_json() + "\n" for t in part).encode()
                await asyncio.sleep(0)  # let other requests in between chunks of a large export
            if fmt == "json":
                yield b"]\n"

        return version, chunks()

    # -- writes -----------------------------------------------------------------------------------------------

    async def create(self, target: Target, actor: str) -> TargetWritten:
        version = await self.store.create(target, actor)
        return TargetWritten(version=version, target=target)

    async def replace(self, target_id: str, body: TargetReplacement, actor: str) -> TargetWritten:
        if body.id is not None and body.id != target_id:
            raise InvalidInput([FieldError(field="id", message=f"the body's id {body.id!r} differs from the path's "
                                                               f"{target_id!r}; ids cannot change")])
        try:  # the path's id is validated here, with the body: an impossible id is a 422, like a bad field
            target = Target.model_validate({**body.model_dump(), "id": target_id})
        except ValidationError as exc:
            raise InvalidInput(validation_details(exc)) from None
        version = await self.store.replace(target, actor)
        return TargetWritten(version=version, target=target)

    async def patch(self, target_id: str, patch: TargetPatch, actor: str) -> TargetWritten:
        result: dict[str, Target] = {}

        def apply(current: Target) -> Target:  # may run more than once (optimistic retries): keep it pure
            result["after"] = patch.apply(current)
            return result["after"]

        try:
            version = await self.store.update(target_id, apply, actor, action="patch")
        except ValidationError as exc:
            raise InvalidInput(validation_details(exc)) from None
        return TargetWritten(version=version, target=result["after"])

    async def delete(self, target_id: str, actor: str) -> TargetDeleted:
        return TargetDeleted(version=await self.store.delete(target_id, actor), id=target_id)

    async def import_document(self, body: bytes, fmt: DocumentFormat, mode: ImportMode, actor: str) -> ImportResult:
        targets = await asyncio.to_thread(parse_document, body, fmt)
        version = await self.store.import_targets(targets, actor, mode)
        return ImportResult(version=version, mode=mode, received=len(targets))

    # -- classifier ------------------------------------------------------------------------------------------

    async def classify(self, body: Any) -> dict[str, Any]:
        """The classifier's decision on the worker's active target set, without generating anything."""
        import asyncio

        active = self.reloader.current
        index = active.indexes.get("classifier")
        if index is None:
            raise NotInstalled("no classifier index is loaded in this worker", code="classifier_not_installed")
        conversation = body.messages if body.messages is not None else body.text
        try:
            decision = await asyncio.to_thread(index.classify, conversation)
        except (TypeError, KeyError, AttributeError) as exc:  # malformed messages: the client's to fix
            raise BadRequest(f"messages could not be read: {exc}", param="messages") from exc
        return decision.as_dict() | {"targets_version": active.version}
