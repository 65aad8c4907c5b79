"""What a write changes, decided without I/O, so both stores make the same decisions.

Targets are handled here as their JSON records (``Target.model_dump_json()``): that is what the stores keep, an
import of 100,000 targets then compares strings instead of re-parsing every stored record, and audit entries
can carry the stored text unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from gateway.registry.store import ImportLineError, ImportMode, ImportRejected
from gateway.registry.targets import Action, AuditEntry, Target


@dataclass(frozen=True)
class Change:
    """One target's record before and after a write (None: absent)."""

    target_id: str
    before: str | None
    after: str | None


def validate_batch(items: Sequence[Target | Mapping[str, Any]], lines: Sequence[int] | None = None) -> list[Target]:
    """Validate every item and check ids are unique; collect all problems, then raise ``ImportRejected``.

    Errors name an item by its 1-based position, or by ``lines[i]`` when given (the admin API passes the JSONL
    line each item came from, so a report points into the operator's file, blank lines included).
    """
    errors: list[ImportLineError] = []
    targets: list[Target] = []
    first_line: dict[str, int] = {}
    numbers = lines if lines is not None else range(1, len(items) + 1)
    if len(numbers) != len(items):
        raise ValueError("lines must give one line number per item")
    for line, item in zip(numbers, items, strict=True):
        try:
            target = item if isinstance(item, Target) else Target.model_validate(item)
        except ValidationError as exc:
            errors.extend(ImportLineError(line, ".".join(str(p) for p in err["loc"]), err["msg"])
                          for err in exc.errors(include_url=False))
            continue
        if target.id in first_line:
            errors.append(ImportLineError(line, "id", f"duplicate id {target.id!r} (first at line "
                                                        f"{first_line[target.id]})"))
            continue
        first_line[target.id] = line
        targets.append(target)
    if errors:
        raise ImportRejected(errors)
    return targets


def plan_import(records: Sequence[tuple[str, str]], current: Mapping[str, str], mode: ImportMode) -> list[Change]:
    """Changes an import makes. ``records``: (id, JSON) of the import; ``current``: stored JSON of at least the
    imported ids (all ids for ``replace``). Unchanged targets produce no change, so re-importing the same
    document adds no per-target history."""
    if mode not in ("upsert", "replace"):
        raise ValueError(f"import mode must be 'upsert' or 'replace', not {mode!r}")
    changes = [Change(tid, current.get(tid), body) for tid, body in records if current.get(tid) != body]
    if mode == "replace":
        kept = {tid for tid, _ in records}
        changes.extend(Change(tid, body, None) for tid, body in sorted(current.items()) if tid not in kept)
    return changes


def apply_update(before: Target, fn: Callable[[Target], Target]) -> Target:
    """Run a caller's read-modify-write function and re-validate what it returns (``model_copy(update=...)``
    skips validation); the id is the record's key, so it may not change."""
    after = fn(before)
    if not isinstance(after, Target):
        raise TypeError(f"update function must return a Target, not {type(after).__name__}")
    after = Target.model_validate(after.model_dump())
    if after.id != before.id:
        raise ValueError(f"update may not change the id ({before.id!r} -> {after.id!r})")
    return after


def now_us() -> int:
    return time.time_ns() // 1_000


def to_us(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("as_of needs a timezone-aware datetime")
    delta = when.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(at_us: int) -> datetime:
    return datetime.fromtimestamp(at_us // 1_000_000, UTC).replace(microsecond=at_us % 1_000_000)


def audit_entry(version: int, at_us: int, actor: str, action: Action, target_id: str | None,
                before: str | None, after: str | None) -> AuditEntry:
    return AuditEntry(version=version, at=from_us(at_us), actor=actor, action=action, target_id=target_id,
                      before=Target.model_validate_json(before) if before else None,
                      after=Target.model_validate_json(after) if after else None)


def replay(entries: Iterable[tuple[str | None, str | None]]) -> list[Target]:
    """Rebuild a set from (target_id, after-JSON) audit entries in order; entries without an id are markers."""
    state: dict[str, str] = {}
    for target_id, after in entries:
        if target_id is None:
            continue
        if after is None:
            state.pop(target_id, None)
        else:
            state[target_id] = after
    return [Target.model_validate_json(state[tid]) for tid in sorted(state)]
