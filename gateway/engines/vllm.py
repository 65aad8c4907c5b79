"""The vLLM engine: a client of vLLM 0.33's OpenAI server (or our reference worker), over aiohttp.

- Pooled keep-alive connections, connect and read timeouts.
- Several workers: round-robin over the healthy ones; a background task probes ``/health``.
- Retries only before the first token: a worker that refuses the connection, resets or closes it, or sends no
  first byte within ``first_token_timeout_s`` (streamed requests) is marked unhealthy and the request moves to the
  next worker. Nothing has reached the client then, so a retry never duplicates output. Once bytes flow, a broken
  stream ends the body with ``UpstreamError`` (the handler turns it into a final SSE error frame, or a 502).
  Non-streamed answers come in one piece at the end, so only ``read_timeout_s`` bounds a silent worker there.
- Two ways to serve: ``generate`` parses the stream into deltas (what policies need), ``relay`` forwards
  the worker's bytes untouched (plain requests: no per-chunk JSON work in the hot path).
- ULD (a request with an ``assistant``): lock-step decoding against ``assistant_url``, a worker serving the
  assistant under the name the target's ``policy.adapter`` gives (``gateway.engines.lockstep``); the served
  model's tokenizer (``tokenizer_model``, a local copy) turns the chosen ids into text. No assistant worker: the
  gateway enforces ULD targets with their fallback (``Unlearner``).

aiohttp rather than httpx: relaying 64 concurrent streams on two cores, aiohttp kept 0.99x of direct
throughput and httpx 0.52x (1.9x in aiohttp's favour; 1.04x at 16 streams), because the httpx relay became
CPU-bound first; measured with ``unlearn-gateway bench http-client`` (README, Performance).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.engines._decoding import eos_token_ids
from gateway.engines.base import EmbedsPart, GenerationDelta, GenerationRequest, Message, TokenLogprob
from gateway.errors import BadRequest, GatewayError, NotFound, Unavailable, UpstreamError, UpstreamTimeout
from gateway.prompt_embeds import encode_embeds

log = logging.getLogger(__name__)


_JSON = {"content-type": "application/json"}
# What a misbehaving worker raises: refused/reset/closed connections, broken bodies, our deadlines, socket timeouts.
_WORKER_FAULTS = (aiohttp.ClientError, TimeoutError)


UPSTREAM_KEEPALIVE_S = 4.0


@dataclass
class Worker:
    url: str
    healthy: bool = True


@dataclass
class Relayed:
    """A worker's answer passed through: status, content type and the body as it arrives."""

    status: int
    content_type: str
    body: AsyncIterator[bytes]


def _upstream_error(status: int, raw: bytes) -> GatewayError:
    """vLLM's error envelope (``code`` = HTTP status) -> ours, keeping client errors' status and message."""
    try:
        info = json.loads(raw)["error"]
        message, param = str(info.get("message", "")), info.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param = raw[:500].decode(errors="replace"), None
    if status == 404:
        return NotFound(message or "not found", param=param)
    if 400 <= status < 500:
        return BadRequest(message or "rejected by the worker", param=param, status=status)
    return UpstreamError(f"worker error {status}: {message}")


def _wire_content(message: Message) -> str | list[dict[str, str]]:
    if isinstance(message.content, str):
        return message.content
    return [{"type": "prompt_embeds", "data": encode_embeds(p.embeds)} if isinstance(p, EmbedsPart)
            else {"type": "text", "text": p} for p in message.content]


class VLLMEngine:
    def __init__(self, urls: list[str], served_model_name: str | None = None, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 600.0, retries: int = 2, health_interval_s: float = 5.0,
                 first_token_timeout_s: float = 60.0, assistant_url: str | None = None,
                 tokenizer_model: str | None = None, lockstep_top_k: int = 20):
        if not urls:
            raise ValueError("the vLLM engine needs at least one worker URL")
        if assistant_url and not tokenizer_model:
            raise ValueError("lock-step ULD needs a local copy of the served model's tokenizer (tokenizer_model)")
        self.assistant_url = assistant_url.rstrip("/") if assistant_url else None
        self._tokenizer_model = tokenizer_model
        self._lockstep_top_k = lockstep_top_k  # vLLM's default --max-logprobs
        self._tokenizer: tuple[Any, list[int]] | None = None
        self.workers = [Worker(u.rstrip("/")) for u in urls]
        self._served_model_name = served_model_name
        self._names: list[str] = [served_model_name] if served_model_name else []
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._retries = retries
        self._first_token_timeout_s = first_token_timeout_s
        self._health_interval_s = health_interval_s
        self._next = 0
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        # Idle pooled connections are dropped before the worker drops them: vLLM (uvicorn) closes idle keep-alive
        # connections after 5 s, and writing a request onto one it just closed fails with nothing to retry on.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, raise_for_status=False)
        await self.check_health()
        if not self._names:
            self._names = await self._fetch_model_names()
        self._health_task = asyncio.create_task(self._health_loop())

    async def aclose(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._session:
            await self._session.close()

    async def ready(self) -> bool:
        return any(w.healthy for w in self.workers)

    def model_names(self) -> list[str]:
        """The served model ids; empty until a worker has answered ``/v1/models``."""
        return self._names

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("VLLMEngine.start() was not awaited")
        return self._session

    # -- workers ---------------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        async def probe(worker: Worker) -> None:
            try:
                async with self.session.get(f"{worker.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    healthy = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                healthy = False
            if healthy != worker.healthy:
                log.warning("worker %s is now %s", worker.url, "healthy" if healthy else "UNHEALTHY")
            worker.healthy = healthy

        await asyncio.gather(*(probe(w) for w in self.workers))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self.check_health()
            if not self._names:
                self._names = await self._fetch_model_names()

    async def _fetch_model_names(self) -> list[str]:
        for worker in self.workers:
            try:
                async with self.session.get(f"{worker.url}/v1/models") as response:
                    if response.status == 200:
                        return [m["id"] for m in (await response.json())["data"]]
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                continue
        return []

    def _pick(self, tried: set[int]) -> Worker | None:
        n = len(self.workers)
        # Healthy workers first, round-robin; if none is healthy, still try the others once.
        for want_healthy in (True, False):
            for k in range(n):
                index = (self._next + k) % n
                if index not in tried and self.workers[index].healthy == want_healthy:
                    self._next = (index + 1) % n
                    tried.add(index)
                    return self.workers[index]
        return None

    def _mark_unhealthy(self, worker: Worker, why: str) -> None:
        """Route around ``worker`` until the health probe finds it answering again."""
        if worker.healthy:
            log.warning("worker %s is now UNHEALTHY: %s", worker.url, why)
        worker.healthy = False

    async def _open(self, worker: Worker, path: str, payload: bytes, stream: bool
                    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """POST to one worker and wait for the first bytes of its answer (a streamed one within the first-token
        timeout). Worker faults raise one of ``_WORKER_FAULTS``; an error answer raises its ``GatewayError``."""
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self._first_token_timeout_s if stream else None):
                response = await self.session.post(f"{worker.url}{path}", data=payload, headers=_JSON)
                if response.status != 200:
                    raw = await response.read()
                    response.release()
                    raise _upstream_error(response.status, raw)
                first = await response.content.readany()
        except BaseException:
            if response is not None:
                response.close()
            raise
        if not first:
            response.close()
            raise aiohttp.ServerDisconnectedError("the worker ended its answer before the first byte")
        return response, first

    async def _body(self, worker: Worker, response: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in response.content.iter_any():
                yield chunk
        except _WORKER_FAULTS as exc:  # output has started: no retry, the client gets a clean error instead
            self._mark_unhealthy(worker, f"stream broke: {exc!r}")
            raise UpstreamError(f"the worker stream broke: {exc!r}") from exc
        finally:
            response.close()

    # -- serving ---------------------------------------------------------------------------------------------
    async def relay(self, path: str, payload: bytes, *, stream: bool = False) -> Relayed:
        """Send a sanitised OpenAI request (JSON bytes) and pass the answer through; ``stream``: the payload asks
        for SSE (the first-token timeout applies). Errors become ``GatewayError``s; see the module docstring for
        which worker faults move the request to another worker."""
        tried: set[int] = set()
        last_error: BaseException | None = None
        for _ in range(self._retries + 1):
            worker = self._pick(tried)
            if worker is None:
                break
            try:
                response, first = await self._open(worker, path, payload, stream)
            except _WORKER_FAULTS as exc:
                self._mark_unhealthy(worker, f"failed before its first token: {exc!r}")
                last_error = exc
                continue
            return Relayed(response.status, response.headers.get("content-type", "application/json"),
                           self._body(worker, response, first))
        if isinstance(last_error, TimeoutError):
            raise UpstreamTimeout(f"no inference worker sent a first token in time ({last_error!r})")
        if last_error is None or isinstance(last_error, aiohttp.ClientConnectorError):
            raise Unavailable(f"no inference worker reachable ({last_error})")
        raise UpstreamError(f"the inference workers failed before answering ({last_error!r})")

    def _payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        if request.logits_processors or request.assistant is not None:
            raise ValueError("in-process logits processors and assistants do not travel to a vLLM worker; "
                             "send them as extra_body (vllm_xargs, bad_words, logit_bias)")
        s = request.sampling
        payload: dict[str, Any] = {"model": self._names[0] if self._names else None, "stream": True,
                                   "stream_options": {"include_usage": True}, "temperature": s.temperature,
                                   "top_p": s.top_p}
        if s.max_tokens is not None:
            payload["max_tokens"] = s.max_tokens
        if s.seed is not None:
            payload["seed"] = s.seed
        if s.stop:
            payload["stop"] = list(s.stop)
        if request.messages is not None:
            path = "/v1/chat/completions"
            payload["messages"] = [{"role": m.role, "content": _wire_content(m)} for m in request.messages]
            if s.top_logprobs is not None:
                payload |= {"logprobs": True, "top_logprobs": s.top_logprobs}
        else:
            path = "/v1/completions"
            if request.prompt_embeds is not None:
                payload["prompt_embeds"] = encode_embeds(request.prompt_embeds)
            else:
                payload["prompt"] = request.prompt_ids if request.prompt_ids is not None else request.prompt
            if s.top_logprobs is not None:
                payload["logprobs"] = s.top_logprobs
        payload |= request.extra_body
        return path, payload

    def _served_tokenizer(self) -> tuple[Any, list[int]]:
        """The served model's tokenizer and end-of-sequence ids, loaded once (for lock-step decoding)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer, GenerationConfig

            from models import resolve_model_path

            path = resolve_model_path(self._tokenizer_model or "")
            tokenizer = AutoTokenizer.from_pretrained(path)
            generation_eos = None
            with contextlib.suppress(OSError):  # a checkpoint without generation_config.json
                generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
            self._tokenizer = (tokenizer, eos_token_ids(generation_eos, tokenizer))
        return self._tokenizer

    async def _lockstep(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from gateway.engines.lockstep import LockstepULD, LockstepWorkers, tokenize_chat

        assistant = request.assistant
        if assistant is None or assistant.params is None or self.assistant_url is None:
            raise ValueError("lock-step ULD needs an assistant worker (assistant_url) and the ULD parameters")
        worker = self._pick(set())
        if worker is None:
            raise Unavailable("no healthy worker")
        tokenizer, eos_ids = await asyncio.to_thread(self._served_tokenizer)
        model = self._names[0] if self._names else None
        if request.messages is not None:
            messages = [{"role": m.role, "content": _wire_content(m)} for m in request.messages]
            prompt_ids = await tokenize_chat(self.session, worker.url, messages, model)
        elif request.prompt_ids is not None:
            prompt_ids = list(request.prompt_ids)
        elif request.prompt is not None:
            prompt_ids = tokenizer(request.prompt)["input_ids"]
        else:
            raise BadRequest("a lock-step assistant cannot decode a prompt given as embeddings")
        lockstep = LockstepULD(LockstepWorkers(worker.url, self.assistant_url, model, assistant.model), tokenizer,
                               eos_ids, assistant.params, top_k=self._lockstep_top_k, session=self.session)
        async for delta in lockstep.generate(prompt_ids, request.sampling, processors=request.logits_processors):
            yield delta

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if request.assistant is not None:
            async for delta in self._lockstep(request):
                yield delta
            return
        path, payload = self._payload(request)
        relayed = await self.relay(path, json.dumps(payload).encode(), stream=True)
        chat = path.endswith("chat/completions")
        pending: GenerationDelta | None = None
        buffer = b""
        async for chunk in relayed.body:
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ").strip()
                if not data or data == b"[DONE]":
                    continue
                message = json.loads(data)
                if "error" in message:
                    raise UpstreamError(f"worker error mid-stream: {message['error'].get('message')}")
                if message.get("usage") and not message.get("choices"):
                    if pending is not None:
                        pending.prompt_tokens = message["usage"]["prompt_tokens"]
                        pending.completion_tokens = message["usage"]["completion_tokens"]
                    continue
                for choice in message.get("choices", []):
                    delta = self._delta(choice, chat)
                    if pending is not None:
                        yield pending
                    pending = delta
        if pending is not None:
            yield pending

    @staticmethod
    def _delta(choice: dict[str, Any], chat: bool) -> GenerationDelta:
        text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
        logprobs = None
        raw = choice.get("logprobs")
        if raw and chat:
            logprobs = [TokenLogprob(-1, e["token"], e["logprob"],
                                     tuple((-1, t["token"], t["logprob"]) for t in e.get("top_logprobs", [])))
                        for e in raw.get("content") or []]
        elif raw:
            logprobs = [TokenLogprob(-1, t, lp, tuple((-1, k, v) for k, v in (top or {}).items()))
                        for t, lp, top in zip(raw["tokens"], raw["token_logprobs"], raw["top_logprobs"] or [])]
        return GenerationDelta(text, [], logprobs, finish_reason=choice.get("finish_reason"))
