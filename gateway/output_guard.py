"""The output guard on the request path: every answer checked against the guarded targets' facts.

Why on every request, flagged or not: it is the net under the classifier. A prompt that never names a target (a
reverse question, a paraphrase the classifier misses) can still draw out what the target asks to be forgotten; the
generated text names it, so the text is what gets checked.

- Per target (``Target.output_guard``): ``mode`` off | hold | window, ``window_tokens``, ``on_hit`` error | refuse,
  optional ``semantic_threshold``. A request is guarded with all guarded targets at once: ``hold`` if any of them
  holds, else windows of the smallest ``window_tokens``; a hit is handled as the *hit* target asks.
- The target's name counts as one of its facts: an answer naming the target to a prompt that did not is a leak.
- Built off the request path: ``OutputGuardIndexBuilder`` is a hot-reload index builder (like the classifier's),
  so each target set version carries its prepared ``FactIndex``. When no enabled target guards its output the
  index is None and ``request_guard`` returns None: the request path is exactly what it was (the vLLM relay stays).
- On a hit the stream stops (generation is cancelled) and ends with the target-agnostic refusal
  (``finish_reason="content_filter"``) or with ``OutputWithheld`` (an error frame then ``[DONE]`` in a stream; a
  451 error envelope otherwise). The refusal names no one: naming the target would itself answer a reverse question.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.engines.base import GenerationDelta, TokenLogprob
from gateway.errors import OutputWithheld
from gateway.registry.reload import ActiveTargets
from gateway.registry.targets import OutputGuardSettings, Target
from gateway.telemetry.context import current_request
from policies.guard import SentenceEncode
from policies.output_guard import FactIndex, OutputGuard, StreamGuard, StreamMode
from policies.refuse import refusal

log = logging.getLogger(__name__)

OUTPUT_GUARD_INDEX = "output_guard"


@dataclass(frozen=True)
class GuardedFacts:
    """What one target set version needs for output checks (built by ``OutputGuardIndexBuilder``)."""

    index: FactIndex
    settings: Mapping[str, OutputGuardSettings]  # guarded target id -> its settings
    mode: StreamMode
    window_tokens: int
    encode: SentenceEncode | None  # set when a target asks for semantic checks
    key: tuple[Any, ...]  # what the index was built from, to reuse it when a new set leaves it unchanged


def _key(targets: Sequence[Target]) -> tuple[Any, ...]:
    return tuple((t.id, t.name, tuple(t.facts), t.output_guard) for t in targets)


class OutputGuardIndexBuilder:
    """Hot-reload hook (``gateway.registry.reload.IndexBuilder``). ``encode``: the sentence encoder for semantic
    checks (the gateway passes the classifier's); by default the offline MiniLM, loaded on first need."""

    name = OUTPUT_GUARD_INDEX

    def __init__(self, encode: SentenceEncode | None = None):
        from classifiers.encoder import load_encoder
        from gateway.engines.policy import sentence_rows

        self._encode = encode or sentence_rows(functools.cache(load_encoder))

    def build(self, targets: Sequence[Target], previous: GuardedFacts | None) -> GuardedFacts | None:
        guarded = [t for t in targets if t.enabled and t.output_guard.mode != "off"]
        if not guarded:
            return None
        key = _key(guarded)
        if previous is not None and previous.key == key:
            return previous
        thresholds = {t.id: t.output_guard.semantic_threshold for t in guarded}
        encode = self._encode if any(x is not None for x in thresholds.values()) else None
        index = FactIndex.build({t.id: [t.name, *t.facts] for t in guarded}, encode=encode,
                                semantic_thresholds=thresholds)
        mode: StreamMode = "hold" if any(t.output_guard.mode == "hold" for t in guarded) else "window"
        return GuardedFacts(index, {t.id: t.output_guard for t in guarded}, mode,
                            min(t.output_guard.window_tokens for t in guarded), encode, key)


def request_guard(active: ActiveTargets | None, prompt: Iterable[str]) -> RequestGuard | None:
    """The guard for one request on its pinned target set (``prompt``: the texts the client sent, joined only when
    needed), or None when no target guards its output."""
    facts = active.indexes.get(OUTPUT_GUARD_INDEX) if active is not None else None
    return RequestGuard(facts, "\n".join(prompt)) if facts is not None else None


class RequestGuard:
    """One request's output checks; ``wrap`` each choice's delta stream."""

    def __init__(self, facts: GuardedFacts, prompt: str):
        self.facts = facts
        self.guard = OutputGuard(facts.index, prompt=prompt, encode=facts.encode)

    def wrap(self, stream: AsyncIterator[GenerationDelta], *, whole: bool = False) -> GuardedStream:
        """``whole``: release nothing before the end (a non-streamed answer), so a hit replaces all of it."""
        return GuardedStream(self, stream, whole)


class GuardedStream:
    """A delta stream released through a ``StreamGuard``. A class rather than an async generator so that
    ``aclose`` closes the engine's stream even when this one was never iterated (generation stops either way)."""

    def __init__(self, owner: RequestGuard, inner: AsyncIterator[GenerationDelta], whole: bool):
        self._owner = owner
        self._inner = inner
        self._run = self._deltas(whole)

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        return await anext(self._run)

    async def aclose(self) -> None:
        await self._run.aclose()
        await self._inner.aclose()  # type: ignore[attr-defined]

    async def _push(self, checker: StreamGuard, text: str) -> str:
        # Semantic checks encode text: keep that off the event loop. Lexical ones take microseconds.
        if self._owner.facts.encode is not None:
            return await asyncio.to_thread(checker.push, text)
        return checker.push(text)

    async def _finish(self, checker: StreamGuard) -> str:
        if self._owner.facts.encode is not None:
            return await asyncio.to_thread(checker.finish)
        return checker.finish()

    async def _deltas(self, whole: bool):
        facts = self._owner.facts
        checker = StreamGuard(self._owner.guard, facts.mode, facts.window_tokens)
        held_text = ""  # released by the checker, not yet sent (whole answers)
        logprobs: list[TokenLogprob] = []
        token_ids: list[int] = []
        tokens = prompt_tokens = 0
        sent = False
        finished: GenerationDelta | None = None
        try:
            async for delta in self._inner:
                tokens += 1 if delta.text else 0
                prompt_tokens = delta.prompt_tokens or prompt_tokens
                logprobs += delta.logprobs or []
                token_ids += delta.token_ids
                released = await self._push(checker, delta.text)
                if delta.finish_reason is not None and checker.hit is None:
                    released += await self._finish(checker)
                    finished = delta
                if checker.hit is not None:
                    break
                held_text += released
                if finished is None and (whole or not held_text):
                    continue
                # Logprobs and token ids go out with the text they were held with (the last word may trail).
                yield replace(delta, text=held_text, logprobs=logprobs if delta.logprobs is not None else None,
                              token_ids=token_ids)
                sent = sent or bool(held_text)
                held_text, logprobs, token_ids = "", [], []
                if finished is not None:
                    return
            if checker.hit is None and finished is None:  # the engine ended without a finish reason
                rest = held_text + await self._finish(checker)
                if checker.hit is None:
                    if rest:
                        yield GenerationDelta(rest, token_ids=token_ids)
                    return
        finally:
            await self._inner.aclose()  # type: ignore[attr-defined]
        hit = checker.hit
        assert hit is not None
        settings = facts.settings[hit.target_id]
        log.info("output guard hit: target %s (%s, score %.2f); answer %s", hit.target_id, hit.kind, hit.score,
                 "ended with an error" if settings.on_hit == "error" else "replaced by the refusal")
        telemetry = current_request()
        if telemetry is not None:
            telemetry.record_output_guard_hit(hit.target_id, settings.on_hit)
        if settings.on_hit == "error":
            raise OutputWithheld("The answer was withheld: it reproduced information this service has been asked "
                                 "not to disclose.", code="output_withheld")
        yield GenerationDelta(("\n\n" if sent else "") + refusal([]), finish_reason="content_filter",
                              prompt_tokens=prompt_tokens, completion_tokens=tokens)


__all__ = ["OUTPUT_GUARD_INDEX", "GuardedFacts", "GuardedStream", "OutputGuardIndexBuilder", "RequestGuard",
           "request_guard"]
