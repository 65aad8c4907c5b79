"""The unlearning step of a request: classify the whole conversation, pick the policy, apply it.

One ``Unlearner`` per worker process. It holds no target state of its own: each request brings the snapshot it
was pinned to (``request.state.targets``, see ``gateway.targets_middleware``) and is judged against exactly that
version. The policy math stays in ``policies/``; ``gateway.engines.policy.PolicyKit`` maps it onto engine hooks.

Choosing among several matched targets: the strictest method wins (``STRICTNESS``), applied with the union of
the matched targets' names and facts. No request field takes part in any of this, so none can switch a policy
off. A ULD target without a trained assistant (or behind the vLLM engine without an assistant worker for lock-step
decoding) is enforced with its stated fallback, never left unenforced.

Fail closed: a request that cannot be classified (the classifier raises or overruns ``classify_timeout_s``, the
index is missing, the worker has not loaded the targets yet) is never served unguarded. ``fail_mode="error"``
answers 503 (``ClassificationUnavailable``, its ``code`` the reason); ``fail_mode="refuse"`` answers with the
target-agnostic refusal instead (a ``Verdict`` with ``unclassified`` set). The handler counts either as a
fail-closed event, apart from intentional interventions (flagged requests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.engines.base import GenerationRequest, Message
from gateway.engines.policy import message_text
from gateway.errors import ClassificationUnavailable
from gateway.registry.reload import ActiveTargets
from gateway.registry.targets import EcoPolicy, Target

log = logging.getLogger(__name__)

# refuse never generates; GUARD forbids the facts' tokens outright; ECO blinds the prompt; ULD only reweighs.
STRICTNESS = {"refuse": 4, "guard": 3, "eco": 2, "uld": 1}
CLASSIFIER_INDEX = "classifier"
GUARD_GENERIC_INDEX = "guard_generic"
FailMode = Literal["error", "refuse"]


class GuardGenericBuilder:
    """Hot-reload hook (``gateway.registry.reload.IndexBuilder``): the words GUARD never forbids because many
    active targets' facts use them (``policies.guard.generic_words``: "author", "novel" for TOFU's authors).
    They depend on the whole target set, so they are derived once per set, off the request path."""

    name = GUARD_GENERIC_INDEX

    def build(self, targets: Sequence[Target], previous: frozenset[str] | None) -> frozenset[str]:
        from policies.guard import generic_words

        return generic_words([t.facts for t in targets if t.enabled])


@dataclass(frozen=True)
class Verdict:
    """What the gateway decided for one request."""

    flagged: bool = False
    method: str | None = None  # the policy applied
    targets: tuple[Target, ...] = ()
    spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # message index -> char spans
    unclassified: str | None = None  # why classification could not run, when fail_mode="refuse" answered for it
    generic: frozenset[str] = frozenset()  # GUARD's generic words of the target set the request was judged on
    nearby: tuple[str, ...] = ()  # names of the other active targets the policy also forbids (``nearby_names``)

    @property
    def header(self) -> str:
        # The target list is an admin secret (it names people who asked to be forgotten): say only what happened.
        if self.unclassified is not None:
            return f"unclassified; policy={self.method}"
        return f"flagged; policy={self.method}" if self.flagged else "clean"

    def names(self) -> list[str]:
        return [n for t in self.targets for n in (t.name, *t.aliases)]


CLEAN = Verdict()
NEARBY_ALL = 64  # up to this many other active targets, GUARD forbids all their names; beyond, the nearest ones


def nearby_names(active: Sequence[Target], matched: Sequence[Target], scores: Mapping[str, float],
                 by_id: Mapping[str, Target] | None = None) -> tuple[str, ...]:
    """Names of the other enabled targets that a GUARD answer must not drift into.

    Why: pushed off its own target's facts, the model falls back on other memorised answers, and those may be
    another forgotten target's ("Some of Roshni Rahman's most acclaimed works ..." in an answer about another
    author: 21% of GUARD's answers to the TOFU targets' training examples named another target, 0% with this).
    With few targets all their names are forbidden; with many, those the classifier scored for this prompt (its
    nearest candidates). ``active``: the enabled targets (``ActiveTargets.enabled``; disabled ones are skipped);
    ``by_id`` looks the scored ids up, so that with 100,000 targets a request never walks them all."""
    mine = {t.id for t in matched}
    if len(active) <= NEARBY_ALL + len(mine):
        return tuple(t.name for t in active if t.enabled and t.id not in mine)
    lookup = by_id if by_id is not None else {t.id: t for t in active}
    scored = [lookup[i] for i in scores if i not in mine and i in lookup and lookup[i].enabled]
    return tuple(t.name for t in sorted(scored, key=lambda t: -scores[t.id])[:NEARBY_ALL])


def guard_fact_groups(matched: Sequence[Target], nearby: Sequence[str]) -> list[list[str]]:
    """GUARD's fact groups: each matched target's facts (its name when it has none), and each nearby name alone.
    The gateway and ``eval leakage`` both build GUARD from this, so what is evaluated is what is served."""
    return [list(t.facts) or [t.name] for t in matched] + [[name] for name in nearby]


def forbid_nearby_names(kit, request: GenerationRequest, nearby: Sequence[str], *, xargs: bool,
                        generic: frozenset[str] | None = None) -> GenerationRequest:
    """An ECO or ULD request with the nearby targets' names forbidden (GUARD's machinery, names only): as
    ``vllm_xargs`` for a vLLM worker (``xargs``), else as an in-process processor (the local engine, and ULD's
    lock-step decoding, which samples in the gateway).

    Why: pushed off its own target's facts, the model answers with some other memorised answer, which may be another
    forgotten target's ("Jad Ambrose Al-Shamary's commitment ... true crime genre"): forgetting one target leaked
    another. On the TOFU targets' training examples 22% of ECO's answers and 3% of ULD's named another target; with
    the names forbidden 0% for both (forget ROUGE-L 0.097 -> 0.101 and 0.178 -> 0.177). A name's first token is not
    penalised, only its completion blocked: the soft first-token penalty GUARD gives a fact's phrases also changed
    answers to keep prompts served with ULD as if flagged (ROUGE-L against the unguarded answer 1.0 -> 0.914, and
    0.939 without it). The gateway and ``eval leakage`` both build the names here, so what is evaluated is what
    is served."""
    if not nearby:
        return request
    from policies.guard import GuardParams

    params = GuardParams(semantic=False, first_token_penalty=0.0)  # the names' own tokens, nothing close to them
    return kit.forbid_names_request(request, nearby, params, generic, xargs=xargs)


def _conversation(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": message_text(m)} for m in messages]


class Unlearner:
    def __init__(self, kit, engine_kind: str, *, fail_mode: FailMode = "error", classify_timeout_s: float = 2.0,
                 lockstep_uld: bool = False):
        """``kit``: a ``PolicyKit`` for the served model; ``engine_kind``: "local" or "vllm"; ``fail_mode`` and
        ``classify_timeout_s``: see the module docstring; ``lockstep_uld``: the vllm engine has an assistant worker
        (``UNLEARN_ULD_ASSISTANT_URL``), so ULD targets with an adapter decode in lock-step instead of their
        fallback."""
        self.kit = kit
        self.engine_kind = engine_kind
        self.serves_uld = engine_kind == "local" or lockstep_uld
        self.fail_mode = fail_mode
        self.classify_timeout_s = classify_timeout_s
        self._classifier = None

    async def aclose(self) -> None:
        if self._classifier is not None:
            await self._classifier.aclose()

    def _classifier_for(self, index):
        from classifiers import Classifier

        if self._classifier is None:
            self._classifier = Classifier(index)
        elif self._classifier.index is not index:
            self._classifier.swap(index)
        return self._classifier

    async def verdict(self, active: ActiveTargets | None, messages: Sequence[Message]) -> Verdict:
        """The verdict on one conversation; raises ``ClassificationUnavailable`` when it cannot be classified
        and ``fail_mode`` is "error"."""
        try:
            return await self._judge(active, messages)
        except ClassificationUnavailable as failure:
            if self.fail_mode != "refuse":
                raise
            log.warning("request failed closed with the refusal: %s", failure.code)
            return Verdict(True, "refuse", unclassified=failure.code)

    async def _judge(self, active: ActiveTargets | None, messages: Sequence[Message]) -> Verdict:
        if active is not None and not active.loaded:
            raise ClassificationUnavailable("the forget targets are not loaded yet; try again shortly",
                                            code="targets_not_loaded")
        if active is None or not active.enabled:
            return CLEAN
        index = active.indexes.get(CLASSIFIER_INDEX)
        if index is None:  # targets exist but their index is missing: refuse to guess
            raise ClassificationUnavailable("the classifier index is not built yet; try again shortly",
                                            code="classifier_index_missing")
        try:
            async with asyncio.timeout(self.classify_timeout_s):
                decision = await self._classifier_for(index).classify(_conversation(messages))
        except TimeoutError as exc:  # a slow answer is no answer: never treated as "clean"
            log.error("classification took longer than %.3f s", self.classify_timeout_s)
            raise ClassificationUnavailable("the request could not be classified in time; try again shortly",
                                            code="classifier_timeout") from exc
        except Exception as exc:  # fail closed: an unclassified request is never served unguarded
            log.exception("classification failed")
            raise ClassificationUnavailable("the request could not be classified; try again shortly",
                                            code="classifier_error") from exc
        if not decision.flagged:
            return CLEAN
        targets = tuple(active.by_id[t] for t in decision.targets if t in active.by_id and active.by_id[t].enabled)
        if not targets:
            return CLEAN
        method = max((self.effective_method(t) for t in targets), key=STRICTNESS.__getitem__)
        spans: dict[int, list[tuple[int, int]]] = {}
        for message_index, start, end, _ in decision.spans:
            spans.setdefault(message_index, []).append((start, end))
        # GUARD forbids the nearby names with the facts; ECO and ULD forbid them alone (``forbid_nearby_names``).
        nearby = (nearby_names(active.enabled, targets, decision.scores, active.by_id)
                  if method in ("guard", "eco", "uld") else ())
        return Verdict(True, method, targets, spans, generic=active.indexes.get(GUARD_GENERIC_INDEX, frozenset()),
                       nearby=nearby)

    def effective_method(self, target: Target) -> str:
        if self.kit is None:  # no tokenizer or embeddings of the served model: refusing is all that is safe
            return "refuse"
        policy = target.policy
        if policy.method == "uld" and (policy.adapter is None or not self.serves_uld):
            return policy.fallback
        return policy.method

    def apply(self, verdict: Verdict, request: GenerationRequest) -> GenerationRequest:
        """The request with the verdict's policy attached (not for ``refuse``: the handler answers that)."""
        from policies.eco import EcoParams
        from policies.guard import GuardParams
        from policies.uld import UldParams

        chosen = [t for t in verdict.targets if self.effective_method(t) == verdict.method]
        policy = next((t.policy for t in chosen if t.policy.method == verdict.method), chosen[0].policy)
        if verdict.method == "eco" and request.messages is not None:
            # A ULD target enforced with its "eco" fallback has no ECO parameters of its own: ECO's defaults apply.
            eco = policy if isinstance(policy, EcoPolicy) else EcoPolicy()
            params = EcoParams.from_policy(eco)
            corrupted = self.kit.eco(request, verdict.names(), params, spans=verdict.spans, scope=eco.scope)
            return forbid_nearby_names(self.kit, corrupted, verdict.nearby, xargs=self.engine_kind != "local",
                                       generic=verdict.generic)
        if verdict.method == "uld":
            uld = self.kit.uld_request(request, policy.adapter, UldParams.from_policy(policy))
            return forbid_nearby_names(self.kit, uld, verdict.nearby, xargs=False, generic=verdict.generic)
        # GUARD, and ECO on raw completions (no messages to corrupt): forbid the facts' tokens.
        facts = guard_fact_groups(verdict.targets, verdict.nearby)
        guard_policy = policy if policy.method == "guard" else None
        params = GuardParams.from_policy(guard_policy) if guard_policy is not None else GuardParams()
        if self.engine_kind == "local":
            return self.kit.guard_processor_request(request, facts, params, verdict.generic)
        return self.kit.guard_xargs_request(request, facts, params, verdict.generic)

    def refusal(self, verdict: Verdict) -> str:
        from policies.refuse import refusal

        template = next((t.policy.message for t in verdict.targets if t.policy.method == "refuse"), None)
        return refusal([t.name for t in verdict.targets], template)
