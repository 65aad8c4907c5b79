"""The logic behind ``/v1/chat/completions`` and ``/v1/completions``.

Requests become engine ``GenerationRequest``s (one per choice), engines yield text deltas, and this
module shapes them into OpenAI responses: one JSON body, or SSE chunks ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.engines.base import Engine, GenerationDelta, GenerationRequest, Message, SamplingParams, TokenLogprob
from gateway.errors import ClassificationUnavailable, GatewayError, NotFound, Unavailable
from gateway.openai._streams import DONE, EventStreamResponse, merge, primed, sse, unless_disconnected
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.output_guard import RequestGuard, request_guard
from gateway.telemetry.context import current_request
from gateway.unlearning import CLEAN, STRICTNESS, Unlearner, Verdict
from policies.processors import LogitsProcessor

log = logging.getLogger(__name__)

Kind = Literal["chat", "text"]


@dataclass
class _Choice:
    """One generation: the index it is reported under and which prompt it answers."""

    index: int
    prompt_index: int
    request: GenerationRequest


def _token(entry_id: int, token: str, as_ids: bool) -> str:
    return f"token_id:{entry_id}" if as_ids else token


def _chat_logprobs(entries: list[TokenLogprob], as_ids: bool) -> dict[str, Any]:
    def item(token_id: int, token: str, logprob: float) -> dict[str, Any]:
        return {"token": _token(token_id, token, as_ids), "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [item(e.token_id, e.token, e.logprob) | {"top_logprobs": [item(*t) for t in e.top]}
                        for e in entries]}


def _text_logprobs(entries: list[TokenLogprob], offset: int, as_ids: bool) -> dict[str, Any]:
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [_token(e.token_id, e.token, as_ids) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token(i, t, as_ids): lp for i, t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Extras:
    """What the reference worker adds to a request beyond the OpenAI fields (vLLM's extensions)."""

    processors: tuple[LogitsProcessor, ...] = ()
    tokens_as_ids: bool = False


@dataclass
class _Job:
    kind: Kind
    request_id: str
    model: str
    choices: list[_Choice]
    logprobs: bool
    tokens_as_ids: bool

    def logprobs_of(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs or entries is None:
            return None
        if self.kind == "chat":
            return _chat_logprobs(entries, self.tokens_as_ids)
        return _text_logprobs(entries, offset, self.tokens_as_ids)


def _usage(prompt_tokens: dict[int, int], completion_tokens: int) -> dict[str, int]:
    """Usage of a request; choices that answer the same prompt count its tokens once, as OpenAI does."""
    prompt = sum(prompt_tokens.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


async def _read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _canned(text: str, prompt_tokens: int = 0) -> AsyncGenerator[GenerationDelta, None]:
    """A finished answer that is not generated (the refusal policy), shaped like an engine stream."""
    yield GenerationDelta(text, finish_reason="stop", prompt_tokens=prompt_tokens)


class OpenAIHandler:
    def __init__(self, engine: Engine, unlearner: Unlearner | None = None):
        """``unlearner``: the gateway's unlearning step; None in the reference worker (it serves, never judges)."""
        self.engine = engine
        self.unlearner = unlearner

    async def _verdict(self, request: Request, conversations: list[list[Message]]) -> Verdict:
        """The strictest verdict over the conversations (one per completions prompt, one for a chat)."""
        if self.unlearner is None:
            return CLEAN
        active = getattr(request.state, "targets", None)
        started = time.perf_counter()
        telemetry = current_request()
        try:
            verdicts = [await self.unlearner.verdict(active, messages) for messages in conversations]
        except ClassificationUnavailable as failure:  # fail closed with a 503: counted apart from interventions
            if telemetry is not None:
                telemetry.record_fail_closed(failure.code or "classifier_error")
            raise
        flagged = [v for v in verdicts if v.flagged]
        verdict = max(flagged, key=lambda v: STRICTNESS[v.method or "uld"]) if flagged else CLEAN
        if telemetry is not None:
            unclassified = next((v.unclassified for v in verdicts if v.unclassified is not None), None)
            if unclassified is not None:  # fail_mode=refuse answered for it: a fail-closed event, not a flag
                telemetry.record_fail_closed(unclassified, "refuse")
            else:
                telemetry.record_decision(verdict.flagged, [t.id for t in verdict.targets], verdict.method,
                                          time.perf_counter() - started)
        return verdict

    def _decision_headers(self, verdict: Verdict) -> dict[str, str]:
        return {"x-unlearn-decision": verdict.header} if self.unlearner is not None else {}

    async def _guarded(self, verdict: Verdict, choices: list[_Choice]) -> str | None:
        """Attach the verdict's policy to every choice; return the answer text instead for ``refuse``."""
        if not verdict.flagged or self.unlearner is None:
            return None
        if verdict.method == "refuse":
            return self.unlearner.refusal(verdict)
        # Policy set-up tokenises facts and builds embeddings (milliseconds to hundreds of them): off the event
        # loop, so one flagged request does not stall every stream this worker relays. It depends on the prompt
        # and the verdict only (ECO's noise comes from the policy's seed, not the request's), and the choices of
        # one prompt differ only in id and sampling: build it once per prompt and give each choice its own.
        applied: dict[int, GenerationRequest] = {}
        for choice in choices:
            if choice.prompt_index not in applied:
                applied[choice.prompt_index] = await asyncio.to_thread(self.unlearner.apply, verdict, choice.request)
            policy = applied[choice.prompt_index]
            choice.request = replace(policy, request_id=choice.request.request_id, sampling=choice.request.sampling,
                                     logits_processors=list(policy.logits_processors))
        return None

    def _output_guard(self, request: Request, prompt: Iterable[str]) -> RequestGuard | None:
        """Checks of the answer against the guarded targets' facts (every request: they catch classifier misses);
        None, at no cost, when no active target guards its output."""
        if self.unlearner is None:
            return None
        return request_guard(getattr(request.state, "targets", None), prompt)

    # -- models ----------------------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in self.engine.model_names()])

    def _model(self, requested: str | None) -> str:
        names = self.engine.model_names()
        if not names:
            raise Unavailable("no inference worker has reported its model yet; try again shortly")
        if requested is None:
            return names[0]
        if requested not in names:
            raise NotFound(f"The model `{requested}` does not exist.", param="model", code="model_not_found")
        return requested

    # -- entry points ----------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request, *, messages: list[Message] | None = None,
                   extras: Extras = Extras()) -> Response:
        model = self._model(body.model)
        verdict = CLEAN
        messages_from_body = messages is None  # the gateway's own path; the reference worker passes messages
        if messages is None:
            messages = [Message(m.role, m.text()) for m in body.messages]
            verdict = await self._verdict(request, [messages])
        headers = self._decision_headers(verdict)
        guard = self._output_guard(request, (m.content for m in messages if isinstance(m.content, str)))
        if messages_from_body and not verdict.flagged and guard is None:
            relayed = await self._relay("/v1/chat/completions", body, model, request, headers)
            if relayed is not None:
                return relayed
        top = (body.top_logprobs or 0) if body.logprobs else None
        sampling = self._sampling(body, body.token_limit(), top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = [_Choice(i, 0, GenerationRequest(f"{request_id}-{i}", self._seeded(sampling, i), messages=messages,
                                                   logits_processors=list(extras.processors)))
                   for i in range(body.n)]
        job = _Job("chat", request_id, model, choices, top is not None, extras.tokens_as_ids)
        canned = await self._guarded(verdict, choices)
        return await self._serve(job, body, request, headers, canned=canned, guard=guard)

    async def completions(self, body: CompletionRequest, request: Request, *, prompts: list[dict] | None = None,
                          extras: Extras = Extras()) -> Response:
        """``prompts``: one dict per prompt with ``prompt``, ``prompt_ids`` or ``prompt_embeds``."""
        model = self._model(body.model)
        verdict = CLEAN
        if prompts is None:
            verdict = await self._verdict(request, [[Message("user", p)] for p in body.prompts()])
        headers = self._decision_headers(verdict)
        guard = self._output_guard(request, body.prompts()) if prompts is None else None
        if prompts is None:
            if not verdict.flagged and guard is None:
                relayed = await self._relay("/v1/completions", body, model, request, headers)
                if relayed is not None:
                    return relayed
            prompts = [{"prompt": p} for p in body.prompts()]
        sampling = self._sampling(body, body.max_tokens if body.max_tokens is not None else 16, body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices = []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                generation = GenerationRequest(f"{request_id}-{index}", self._seeded(sampling, j),
                                               logits_processors=list(extras.processors), **prompt)
                choices.append(_Choice(index, p, generation))
        job = _Job("text", request_id, model, choices, body.logprobs is not None, extras.tokens_as_ids)
        canned = await self._guarded(verdict, choices)
        return await self._serve(job, body, request, headers, canned=canned, guard=guard)

    @staticmethod
    def _sampling(body, max_tokens: int | None, top_logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
            top_logprobs=top_logprobs,
            logprob_token_ids=tuple(getattr(body, "logprob_token_ids", None) or ()),
        )

    @staticmethod
    def _seeded(sampling: SamplingParams, i: int) -> SamplingParams:
        # n choices from one seed must differ from each other and still be reproducible.
        return sampling if sampling.seed is None or i == 0 else replace(sampling, seed=sampling.seed + i)

    async def _relay(self, path: str, body, model: str, request: Request,
                     headers: dict[str, str]) -> Response | None:
        """Pass a plain request through to an engine that can relay bytes (vLLM): no re-encoding per chunk.

        The payload is rebuilt from the declared fields only, so nothing else a client sent travels on.
        """
        relay = getattr(self.engine, "relay", None)
        if relay is None:
            return None
        payload = body.model_copy(update={"model": model}).model_dump_json(exclude_none=True).encode()
        relayed = await relay(path, payload, stream=bool(body.stream))
        if body.stream:
            return EventStreamResponse(relayed.body, media_type=relayed.content_type, headers=headers)
        content = await unless_disconnected(request, _read_all(relayed.body))
        if content is None:
            return Response(status_code=499)
        return Response(content, media_type=relayed.content_type, headers=headers)

    # -- serving ---------------------------------------------------------------------------------------------
    async def _serve(self, job: _Job, body, request: Request, headers: dict[str, str] | None = None,
                     canned: str | None = None, guard: RequestGuard | None = None) -> Response:
        """``guard``: the output guard, wrapped around each generated stream after priming (so engine errors
        before the first token stay plain HTTP errors, and a guard hit in a stream is an error frame)."""
        streams: list[AsyncGenerator[GenerationDelta, None]] = []
        try:
            for choice in job.choices:
                stream = _canned(canned) if canned is not None else self.engine.generate(choice.request)
                stream = await primed(stream)
                if guard is not None and canned is None:
                    stream = guard.wrap(stream, whole=not body.stream)  # type: ignore[assignment]
                streams.append(stream)
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(self._events(job, streams, include_usage), headers=headers)
        result = await unless_disconnected(request, self._collect(job, streams))
        if result is None:  # the client left; nothing to answer
            return Response(status_code=499)
        return JSONResponse(result, headers=headers)

    async def _collect(self, job: _Job, streams: list[AsyncGenerator[GenerationDelta, None]]) -> dict[str, Any]:
        texts = [""] * len(job.choices)
        logprobs: list[list[TokenLogprob]] = [[] for _ in job.choices]
        finish: list[str | None] = [None] * len(job.choices)
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        async for i, delta in merge(streams):
            texts[i] += delta.text
            if delta.logprobs:
                logprobs[i] += delta.logprobs
            if delta.finish_reason:
                finish[i] = delta.finish_reason
                prompt_tokens[job.choices[i].prompt_index] = delta.prompt_tokens
                completion_tokens += delta.completion_tokens
        out_choices = []
        for i, choice in enumerate(job.choices):
            entry: dict[str, Any] = {"index": choice.index, "finish_reason": finish[i],
                                     "logprobs": job.logprobs_of(logprobs[i])}
            if job.kind == "chat":
                entry["message"] = {"role": "assistant", "content": texts[i]}
            else:
                entry["text"] = texts[i]
            out_choices.append(entry)
        return {
            "id": job.request_id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": out_choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    async def _events(self, job: _Job, streams: list[AsyncGenerator[GenerationDelta, None]],
                      include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        object_name = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

        def chunk(choice_entries: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": job.request_id, "object": object_name, "created": created,
                                       "model": job.model, "choices": choice_entries}
            if usage is not None:
                payload["usage"] = usage
            return sse(payload)

        offsets = [0] * len(job.choices)
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        try:
            if job.kind == "chat":
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in job.choices])
            async for i, delta in merge(streams):
                if not (delta.text or delta.finish_reason or (job.logprobs and delta.logprobs)):
                    continue  # text held back (stop-string prefix, partial UTF-8)
                entry: dict[str, Any] = {"index": job.choices[i].index, "finish_reason": delta.finish_reason,
                                         "logprobs": job.logprobs_of(delta.logprobs, offsets[i])}
                if job.kind == "chat":
                    entry["delta"] = {"content": delta.text} if delta.text else {}
                else:
                    entry["text"] = delta.text
                    offsets[i] += len(delta.text)
                if delta.finish_reason:
                    prompt_tokens[job.choices[i].prompt_index] = delta.prompt_tokens
                    completion_tokens += delta.completion_tokens
                yield chunk([entry])
            if include_usage:
                yield chunk([], _usage(prompt_tokens, completion_tokens))
        except GatewayError as exc:
            yield sse(exc.envelope().model_dump())
        except Exception:  # a stream has started: the only way left to report is an error frame
            log.exception("generation failed mid-stream (request %s)", job.request_id)
            yield sse({"error": {"message": "generation failed", "type": "server_error", "param": None,
                                 "code": None}})
        yield DONE
