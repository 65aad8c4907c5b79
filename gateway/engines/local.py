"""The local engine: a transformers causal LM in process, decoding with a KV cache.

It is the embedded default (CPU here, GPU where present) and the core of the reference worker. Each
request decodes in a worker thread (torch releases the GIL) and hands text deltas to the event loop;
closing the delta stream stops decoding at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gateway.engines._decoding import TextStream, eos_token_ids, sample_next
from gateway.engines.base import EmbedsPart, GenerationDelta, GenerationRequest, Message, TokenLogprob
from gateway.errors import BadRequest
from models import resolve_model_path
from policies.processors import apply_processors

log = logging.getLogger(__name__)

# Where an embeddings run sits in the rendered chat text; vLLM reserves the same literal.
EMBEDS_PLACEHOLDER = "<prompt_embeds>"
# Token id recorded at embedding positions, as vLLM does.
EMBEDS_TOKEN_ID = 0


@dataclass
class Prompt:
    """A rendered prompt: token ids, and the runs of positions whose input embeddings are given."""

    ids: list[int]
    embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start position, (n, hidden))


class LoadedModel:
    """A causal LM with its tokenizer, ready to decode."""

    def __init__(self, name: str, device: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name = name
        self.path: Path = resolve_model_path(name)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()
        # Serving never trains: without grads, building ECO's prompt embeddings records no autograd graph.
        self.model.requires_grad_(False)
        config = self.model.config
        self.max_model_len: int = int(getattr(config, "max_position_embeddings", 2048))
        self.hidden_size: int = int(config.hidden_size)
        self.eos_ids = set(eos_token_ids(self.model.generation_config.eos_token_id, self.tokenizer))

    # -- prompts ------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> Prompt:
        """Apply the chat template; embedding parts become runs of given embeddings in place."""
        runs: list[torch.Tensor] = []
        rendered_messages = []
        for message in messages:
            if isinstance(message.content, str):
                text = message.content
            else:
                pieces = []
                for part in message.content:
                    if isinstance(part, EmbedsPart):
                        runs.append(part.embeds)
                        pieces.append(EMBEDS_PLACEHOLDER)
                    else:
                        pieces.append(part)
                text = "".join(pieces)
            rendered_messages.append({"role": message.role, "content": text})
        text = self.tokenizer.apply_chat_template(
            rendered_messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        if not runs:
            return Prompt(self.encode(text))
        pieces = text.split(EMBEDS_PLACEHOLDER)
        if len(pieces) != len(runs) + 1:
            raise BadRequest(f"text content must not contain the reserved literal {EMBEDS_PLACEHOLDER!r}")
        prompt = Prompt(self.encode(pieces[0]))
        for run, piece in zip(runs, pieces[1:]):
            prompt.embeds.append((len(prompt.ids), self.check_embeds(run)))
            prompt.ids += [EMBEDS_TOKEN_ID] * run.shape[0] + self.encode(piece)
        return prompt

    def check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2 or embeds.shape[1] != self.hidden_size or not embeds.is_floating_point():
            raise BadRequest(
                f"prompt embeds must be a floating tensor of shape (tokens, {self.hidden_size}), "
                f"got {tuple(embeds.shape)} {embeds.dtype}"
            )
        return embeds.to(self.device, torch.float32)

    def input_embeddings(self, prompt: Prompt) -> torch.Tensor:
        """``(1, len, hidden)`` input embeddings of a prompt, given runs spliced in."""
        embeds = self.model.get_input_embeddings()(torch.tensor([prompt.ids], device=self.device))
        for start, run in prompt.embeds:
            embeds[0, start : start + run.shape[0]] = run
        return embeds


def _forward(loaded: LoadedModel, ids: list[list[int]] | None, cache, embeds: torch.Tensor | None = None):
    """One forward step of ``loaded`` over ``ids`` (a batch of one), or over input ``embeds``, after ``cache``:
    (the last position's logits, the grown cache)."""
    with torch.inference_mode():  # thread-local: set it in the thread that runs the step
        inputs = {"inputs_embeds": embeds} if embeds is not None else {
            "input_ids": torch.tensor(ids, device=loaded.device)}
        # Only the last position's logits are used: a prompt's full (tokens x vocabulary) head product is
        # wasted (12% of a 200-token prefill on the demo model).
        out = loaded.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


DeltaSink = Callable[[GenerationDelta | BaseException | None], None]


class InlineExecutor:
    """``submit`` runs the call at once, in the caller's thread: the sequential twin of a thread pool."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class LocalEngine:
    """Serves one model in process; loads lock-step assistant models on demand."""

    def __init__(self, model: str = "demo", served_model_name: str | None = None, device: str = "auto",
                 max_concurrency: int = 8, assistant_overlap: bool | None = None):
        """``assistant_overlap``: step a lock-step assistant in a thread of its own beside the served model's step
        (True), or after it (False); None measures both when an assistant is first loaded and keeps the faster."""
        self.main = LoadedModel(model, device)
        self.served_model_name = served_model_name or model
        self._device = device
        self._assistants: dict[str, LoadedModel] = {}
        self._assistant_overlap = assistant_overlap
        self._overlaps: dict[str, bool] = {}
        self._assistants_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="local-engine")
        # Both forwards release the GIL in their kernels, so an assistant stepping in its own thread can hide
        # behind the served model's step; on some hosts (two vCPUs of one core, small models whose steps are
        # mostly Python) the two threads only contend, and stepping one after the other is faster (ULD at 0.70x
        # of plain instead of 0.62x on one such machine; the reverse, 0.73-0.81x against 0.69-0.71x, on others).
        self._assistant_executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="local-engine-assistant")
        self._inline = InlineExecutor()
        self._active = 0
        self._active_lock = threading.Lock()

    @property
    def active_generations(self) -> int:
        """Decoding loops running right now (a cancelled one stops within one step)."""
        return self._active

    def model_names(self) -> list[str]:
        return [self.served_model_name]

    async def start(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._assistant_executor.shutdown(wait=False, cancel_futures=True)

    def render(self, request: GenerationRequest) -> Prompt:
        if request.messages is not None:
            return self.main.render_chat(list(request.messages))
        if request.prompt_embeds is not None:
            embeds = self.main.check_embeds(request.prompt_embeds)
            return Prompt([EMBEDS_TOKEN_ID] * embeds.shape[0], [(0, embeds)])
        if request.prompt_ids is not None:
            vocab = len(self.main.tokenizer)
            if any(not 0 <= i < vocab for i in request.prompt_ids):
                raise BadRequest(f"prompt token ids must lie in [0, {vocab})", param="prompt")
            return Prompt(list(request.prompt_ids))
        return Prompt(self.main.encode(request.prompt or ""))

    def load_assistant(self, name: str) -> LoadedModel:
        """The lock-step assistant ``name`` (a model path), loaded once; how it steps is decided then."""
        with self._assistants_lock:
            if name not in self._assistants:
                assistant = LoadedModel(name, self._device)
                overlap = self._assistant_overlap
                self._overlaps[name] = self._overlap_is_faster(assistant) if overlap is None else overlap
                self._assistants[name] = assistant
            return self._assistants[name]

    def assistant_overlaps(self, name: str) -> bool:
        """Whether the assistant ``name`` steps in its own thread (loading it, and measuring, if needed)."""
        self.load_assistant(name)
        return self._overlaps[name]

    def _overlap_is_faster(self, assistant: LoadedModel, steps: int = 8, rounds: int = 3) -> bool:
        """Time a few lock-step decoding steps both ways, alternated, and say whether the thread won (~0.5 s for
        the demo model, once per assistant)."""
        ids = [[1 + i % (len(self.main.tokenizer) - 1) for i in range(16)]]

        def run(executor) -> float:
            _, cache = _forward(self.main, ids, None)
            _, a_cache = _forward(assistant, ids, None)
            started = time.perf_counter()
            for k in range(steps):
                token = [[1 + k]]
                a_step = executor.submit(_forward, assistant, token, a_cache)
                _, cache = _forward(self.main, token, cache)
                _, a_cache = a_step.result()
            return time.perf_counter() - started

        best = {True: math.inf, False: math.inf}
        for _ in range(rounds):
            best[True] = min(best[True], run(self._assistant_executor))
            best[False] = min(best[False], run(self._inline))
        log.info("lock-step assistant %s: %.2f ms a step in its own thread, %.2f ms after the served model's",
                 assistant.path, best[True] / steps * 1e3, best[False] / steps * 1e3)
        return best[True] < best[False]

    def _budget(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.main.max_model_len
        if prompt_len == 0:
            raise BadRequest("the prompt is empty", param="messages")
        wanted = max_tokens if max_tokens is not None else limit - prompt_len
        if prompt_len + max(wanted, 1) > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the messages, {wanted} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens" if max_tokens is not None else "messages",
                code="context_length_exceeded",
            )
        return wanted

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        prompt = self.render(request)
        budget = self._budget(len(prompt.ids), request.sampling.max_tokens)
        if request.assistant is not None and prompt.embeds:
            raise BadRequest("a lock-step assistant cannot decode a prompt given as embeddings")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationDelta | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def sink(item: GenerationDelta | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._executor, self._decode, prompt, budget, request, sink, cancelled)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()  # the thread stops at its next step; its errors were already delivered
            future.add_done_callback(lambda f: f.exception())

    # -- the decoding loop (runs in a worker thread) ----------------------------------------------------------
    def _decode(self, prompt: Prompt, budget: int, request: GenerationRequest, sink: DeltaSink,
                cancelled: threading.Event) -> None:
        with self._active_lock:
            self._active += 1
        try:
            with torch.inference_mode():
                self._decode_steps(prompt, budget, request, sink, cancelled)
        except BaseException as exc:  # surfaced to the awaiting coroutine
            sink(exc)
        finally:
            with self._active_lock:
                self._active -= 1
            sink(None)

    def _decode_steps(self, prompt: Prompt, budget: int, request: GenerationRequest, sink: DeltaSink,
                      cancelled: threading.Event) -> None:
        main = self.main
        sampling = request.sampling
        generator = None
        if sampling.seed is not None:
            # OpenAI seeds are any int64; torch wants [0, 2**64).
            generator = torch.Generator(device=main.device).manual_seed(sampling.seed % 2**64)
        stream = TextStream(main.tokenizer, sampling.stop)

        assistant = self.load_assistant(request.assistant.model) if request.assistant else None
        overlap = assistant is not None and self._overlaps[request.assistant.model]
        a_executor = self._assistant_executor if overlap else self._inline
        a_step = None  # the assistant's step in flight: (logits, cache) for the same tokens as the served model's
        if assistant is not None:
            a_step = a_executor.submit(_forward, assistant, [prompt.ids], None)
        if prompt.embeds:
            logits, cache = _forward(main, None, None, embeds=main.input_embeddings(prompt))
        else:
            logits, cache = _forward(main, [prompt.ids], None)
        output_ids: list[int] = []
        finish = "length"
        eos_logprobs = None
        while len(output_ids) < budget:
            if cancelled.is_set():
                return
            raw = logits.float()
            if a_step is not None:
                a_logits, a_cache = a_step.result()
                scores = request.assistant.combine(raw, a_logits.float())
            else:
                scores = raw.clone()
            scores = apply_processors(request.logits_processors, prompt.ids, output_ids, scores)
            token = sample_next(scores, sampling.temperature, sampling.top_p, generator)
            output_ids.append(token)
            logprobs = None
            if sampling.top_logprobs is not None:
                logprobs = [self._logprob(raw, token, sampling.top_logprobs, sampling.logprob_token_ids)]
            if token in main.eos_ids:
                finish, eos_logprobs = "stop", logprobs
                break
            text = stream.push(token)
            if stream.stopped:
                sink(GenerationDelta(text, [token], logprobs))
                finish = "stop"
                break
            sink(GenerationDelta(text, [token], logprobs))
            if len(output_ids) >= budget:
                break
            if assistant is not None:
                a_step = a_executor.submit(_forward, assistant, [[token]], a_cache)
            logits, cache = _forward(main, [[token]], cache)
        sink(GenerationDelta(stream.flush(), [], eos_logprobs, finish_reason=finish,
                             prompt_tokens=len(prompt.ids), completion_tokens=len(output_ids)))

    def _logprob(self, logits: torch.Tensor, token: int, top: int, ids: tuple[int, ...] = ()) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, dim=-1)
        decode = self.main.tokenizer.decode
        top_entries: tuple[tuple[int, str, float], ...] = ()
        if ids:
            top_entries = tuple((i, decode([i]), float(logprobs[i])) for i in ids)
        elif top > 0:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            top_entries = tuple((int(i), decode([int(i)]), float(v)) for v, i in zip(values, ids))
        return TokenLogprob(token, decode([token]), float(logprobs[token]), top_entries)
