"""Forget targets as validated values (ARCHITECTURE §5, contract).

Everything that enters the registry passes through these models, so a typo, an unknown method or an out-of-range
policy parameter is a ``pydantic.ValidationError`` whose ``loc`` names the field (the admin API turns it into a
422), never a record that is stored and later breaks a worker. Size bounds keep one target from growing without
limit: the whole set is held in memory by every gateway worker.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_ID = 128
MAX_NAME = 512
MAX_TEXT = 4_000  # one fact, example, keep prompt or alias
MAX_DESCRIPTION = 8_000
MAX_ALIASES = 200
MAX_ITEMS = 1_000  # facts, examples, keep: each list

SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$"

Slug = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=SLUG_PATTERN)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]

# Frozen: a Target read from a snapshot is shared by every request a worker serves; nobody may edit it in place.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_strip_whitespace=True)


def slugify(name: str) -> str:
    """Derive an id from a name: "Beyoncé Knowles" -> "beyonce-knowles".

    NFKD splits accented letters into base letter + combining mark, the marks are dropped, every run of other
    characters becomes one '-'. A name with no Latin letters or digits at all (e.g. "北京") still needs a stable
    id, so it falls back to ``target-<12 hex of sha256(name)>``: deterministic, so re-importing the same
    document maps to the same record.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_only = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_only).strip("-")[:MAX_ID].rstrip("-")
    if slug:
        return slug
    return "target-" + hashlib.sha256(name.strip().encode()).hexdigest()[:12]


class EcoPolicy(BaseModel):
    """Embedding-corrupted prompts: noise on the input embeddings of the flagged tokens."""

    model_config = _STRICT
    method: Literal["eco"] = "eco"
    corruption: Literal["gaussian", "zero", "flip"] = "gaussian"
    sigma: float = Field(1.0, ge=0)
    dims: int | None = Field(None, ge=1, description="embedding dimensions corrupted; None = all")
    # "prompt" (every token of the flagged message but the last) is ECO's rule for non-entity tasks; "entity" (the
    # flagged spans only) suits models whose knowledge hangs on the name, which a memorising model's is not (README).
    scope: Literal["entity", "prompt"] = "prompt"
    seed: int | None = None


class GuardPolicy(BaseModel):
    """Generation-time restriction: penalise or forbid tokens drawn from the target's closest facts."""

    model_config = _STRICT
    method: Literal["guard"] = "guard"
    mode: Literal["soft", "hard"] = "hard"
    penalty: float = Field(10.0, gt=0)
    top_facts: int = Field(3, ge=1, le=50)
    semantic_threshold: float = Field(0.75, gt=0, le=1)
    ngram: int = Field(3, ge=0, le=8, description="no run of this many words of the facts can be generated; 0 = off")
    ngram_facts: Literal["nearest", "all"] = Field(
        "all", description="the n-grams come from all the target's facts or only the top_facts retrieved ones")

    @field_validator("ngram")
    @classmethod
    def _ngram_is_a_run(cls, value: int) -> int:
        if value == 1:
            raise ValueError("ngram must be 0 (off) or at least 2: single words are what the forbidden tokens cover")
        return value


class UldPolicy(BaseModel):
    """Unlearning from logit difference with an assistant model; the weight must be negative."""

    model_config = _STRICT
    method: Literal["uld"] = "uld"
    weight: float = Field(-1.5, lt=0, description="w in z_target + w * z_assistant (ULD's TOFU setting: -0.8, "
                          "without the gate)")
    alpha: float = Field(0.01, gt=0, lt=1)
    layers: int = Field(2, ge=1)
    adapter: str | None = Field(None, min_length=1, max_length=1024)
    min_keep: int | None = Field(None, ge=0, description="also keep the target's top min_keep tokens; unset = ULD's "
                                 "released code, floor(alpha * |V|); 0 = the relative-top rule alone")
    gate: float = Field(0.5, ge=0, le=1, description="apply the difference only at steps where the assistant gives "
                        "one of the target's kept candidates at least this probability (recognises a fact); 0 = every "
                        "step, ULD's rule")
    fallback: Literal["guard", "eco", "refuse"] = Field(
        "guard", description="enforced until the assistant is trained (policy_status 'ready')")


class RefusePolicy(BaseModel):
    """A templated refusal, no generation."""

    model_config = _STRICT
    method: Literal["refuse"] = "refuse"
    message: str | None = Field(None, min_length=1, max_length=MAX_TEXT)


Policy = Annotated[EcoPolicy | GuardPolicy | UldPolicy | RefusePolicy, Field(discriminator="method")]


class OutputGuardSettings(BaseModel):
    """Checks of the generated text against this target's facts, on every request (flagged or not): the safety net
    for prompts the classifier misses. ``hold`` buffers an answer until it is checked whole; ``window`` releases
    it in checked steps of ``window_tokens`` tokens. On a hit the answer is replaced by a refusal that names no
    one (``refuse``) or ends with an OpenAI-style error (``error``)."""

    model_config = _STRICT
    mode: Literal["off", "hold", "window"] = "off"
    window_tokens: int = Field(16, ge=1, le=4096)
    on_hit: Literal["error", "refuse"] = "refuse"
    semantic_threshold: float | None = Field(
        None, gt=0, le=1, description="also hit on sentence-embedding cosine >= this (None: lexical checks only)")


class Target(BaseModel):
    """One forget target. ``id`` is generated from ``name`` when absent."""

    model_config = _STRICT
    id: Slug
    name: Name
    aliases: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME)]] = Field(
        default_factory=list, max_length=MAX_ALIASES)
    description: str = Field("", max_length=MAX_DESCRIPTION)
    facts: list[Text] = Field(default_factory=list, max_length=MAX_ITEMS)
    examples: list[Text] = Field(default_factory=list, max_length=MAX_ITEMS)
    keep: list[Text] = Field(default_factory=list, max_length=MAX_ITEMS)
    policy: Policy = Field(default_factory=EcoPolicy)
    output_guard: OutputGuardSettings = Field(default_factory=OutputGuardSettings)
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: Any) -> Any:
        name = data.get("name") if isinstance(data, dict) else None
        if isinstance(name, str) and name.strip() and data.get("id") is None:
            return {**data, "id": slugify(name)}
        return data


def _reject_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may not be null; leave the field out to keep its value")
    return value


class TargetPatch(BaseModel):
    """A partial update (HTTP PATCH): fields left out keep their value.

    A ``policy`` with the same method as the current one is merged field by field (JSON merge-patch style:
    ``{"policy": {"method": "eco", "sigma": 2}}`` changes only sigma); a different method replaces the policy,
    its unset parameters taking their defaults; either way a policy patch names its method. ``output_guard`` is
    merged field by field too. ``id`` may be given
    only if it equals the current id.
    """

    model_config = _STRICT
    id: Slug | None = None
    name: Name | None = None
    aliases: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME)]] | None = Field(
        None, max_length=MAX_ALIASES)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    facts: list[Text] | None = Field(None, max_length=MAX_ITEMS)
    examples: list[Text] | None = Field(None, max_length=MAX_ITEMS)
    keep: list[Text] | None = Field(None, max_length=MAX_ITEMS)
    policy: Policy | None = None
    output_guard: OutputGuardSettings | None = None
    enabled: bool | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_null(cls, value: Any) -> Any:
        return _reject_null(value)

    def apply(self, target: Target) -> Target:
        """Return a new validated Target; raise ``ValidationError`` (loc ``id``) on an attempt to rename."""
        if self.id is not None and self.id != target.id:
            raise ValidationError.from_exception_data("TargetPatch", [InitErrorDetails(
                type=PydanticCustomError("id_immutable", "id cannot change (it is '{current}')",
                                         {"current": target.id}),
                loc=("id",), input=self.id)])
        changes = self.model_dump(exclude_unset=True, exclude={"id", "policy", "output_guard"})
        merged = target.model_dump()
        merged.update(changes)
        if self.output_guard is not None and "output_guard" in self.model_fields_set:  # merged field by field
            merged["output_guard"] = {**target.output_guard.model_dump(),
                                      **self.output_guard.model_dump(exclude_unset=True)}
        if self.policy is not None and "policy" in self.model_fields_set:
            given = self.policy.model_dump(exclude_unset=True)
            if self.policy.method == target.policy.method:
                merged["policy"] = {**target.policy.model_dump(), **given}
            else:
                merged["policy"] = {**given, "method": self.policy.method}
        return Target.model_validate(merged)


Action = Literal["create", "replace", "patch", "delete", "import"]


class AuditEntry(BaseModel):
    """One line of the append-only history: who changed what, when, and the value before and after.

    ``actor`` is the admin key's id, never the key. All entries of one write share its ``version`` and ``at``.
    An import writes one entry per target it changed plus one with ``target_id=None`` that marks the import.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = Field(ge=1)
    at: AwareDatetime
    actor: str
    action: Action
    target_id: str | None = None
    before: Target | None = None
    after: Target | None = None

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)
