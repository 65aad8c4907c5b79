"""A target's policy status: where the artefact its policy needs (a ULD assistant) stands.

Why a record of its own, outside the target: the target is the admin's document, versioned and audited; the status
is machine state that changes every second while an assistant trains. Writing it into the target would bump the
set version (every worker would reload the whole set per progress tick) and could overwrite an admin's concurrent
edit. So stores keep statuses beside the targets (``TargetStore.put_status``), unversioned and unaudited; only the
end result, the adapter's path, is written into the target's policy (an ordinary audited write), which is how every
replica learns of it through hot reload.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

PolicyState = Literal["pending", "training", "ready", "failed"]


class PolicyStatus(BaseModel):
    """``pending``: waiting for a trainer; ``training`` with ``progress`` 0..1; ``ready``: the adapter is registered;
    ``failed`` with ``reason``. ``fingerprint`` names the target content a training was for, so a status about an
    older version of the target is recognised as stale."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    state: PolicyState
    progress: float | None = Field(None, ge=0, le=1)
    message: str | None = Field(None, description="what is happening now, or how to get out of 'pending'")
    reason: str | None = Field(None, description="why training failed")
    adapter: str | None = Field(None, description="the trained assistant's path, once ready")
    fingerprint: str | None = None
    owner: str | None = Field(None, description="the trainer that wrote this status")
    updated_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))


__all__ = ["PolicyState", "PolicyStatus"]
