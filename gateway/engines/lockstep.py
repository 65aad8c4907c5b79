"""ULD against vLLM: the gateway decodes in lock-step with a target worker and an assistant worker.

Why this path (VLLM.md §3, option A): vLLM has no two-model logit arithmetic, but every stock server returns
top-K logprobs for a one-token completion of a token-id prompt. Each step the gateway

1. asks the target worker for its top-K logprobs of the next token (``/v1/completions``, ``prompt=[ids]``,
   ``max_tokens=1``, ``logprobs=K``, ``return_tokens_as_token_ids``);
2. asks the assistant worker for its logprobs of exactly the target's candidates that pass the relative-top
   filter (``logprob_token_ids``), so the combination is exact over the target's top K;
3. combines them with ``policies.uld.combine_top_logprobs``, samples, appends the token and repeats.

It costs two round trips and two (prefix-cached on vLLM) admissions per token and is paid only by flagged
requests; a dedicated ULD model plugin is the faster phase-2 path. The gateway detokenizes with its own tokenizer
and handles stop strings and end of sequence itself. Prompt-embeds (ECO) cannot be combined with it: the
assistant would need the same embeddings.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
import torch

from gateway.engines._decoding import TextStream, sample_next
from gateway.engines.base import GenerationDelta, SamplingParams
from gateway.errors import UpstreamError
from policies.processors import LogitsProcessor, apply_processors
from policies.uld import UldParams, combine_top_logprobs, lockstep_threshold, scores_tensor

_JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class LockstepWorkers:
    """The two servers of one generation (keep both on the same replicas so prefix caching works)."""

    target_url: str
    assistant_url: str
    target_model: str | None = None
    assistant_model: str | None = None


def parse_top_logprobs(entry: dict[str, float]) -> dict[int, float]:
    """``{"token_id:N": logprob}`` (``return_tokens_as_token_ids``) -> ``{N: logprob}``."""
    out: dict[int, float] = {}
    for key, value in entry.items():
        if not key.startswith("token_id:"):
            raise UpstreamError(f"expected token ids as logprob keys, got {key!r}")
        out[int(key.removeprefix("token_id:"))] = float(value)
    return out


class LockstepULD:
    """Yields ``GenerationDelta``s for one prompt, decoding ``z_t + w z_a`` over two HTTP workers."""

    def __init__(self, workers: LockstepWorkers, tokenizer, eos_ids: Sequence[int], params: UldParams | None = None,
                 top_k: int = 20, session: aiohttp.ClientSession | None = None):
        self.workers = workers
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.params = params or UldParams()
        self.top_k = top_k
        self._session = session

    async def _next_logprobs(self, session: aiohttp.ClientSession, url: str, model: str | None, ids: list[int],
                             token_ids: Sequence[int] | None = None) -> dict[int, float]:
        payload: dict = {"prompt": ids, "max_tokens": 1, "temperature": 0.0,
                         "logprobs": len(token_ids) if token_ids else self.top_k, "return_tokens_as_token_ids": True}
        if model:
            payload["model"] = model
        if token_ids:
            payload["logprob_token_ids"] = list(token_ids)
        async with session.post(f"{url}/v1/completions", data=json.dumps(payload).encode(), headers=_JSON) as r:
            body = await r.read()
            if r.status != 200:
                raise UpstreamError(f"lock-step worker {url} answered {r.status}: {body[:300]!r}")
        tops = json.loads(body)["choices"][0]["logprobs"]["top_logprobs"]
        if not tops or not tops[0]:
            raise UpstreamError(f"lock-step worker {url} returned no logprobs")
        return parse_top_logprobs(tops[0])

    async def step_scores(self, session: aiohttp.ClientSession, ids: list[int]) -> dict[int, float]:
        """The combined scores of the next token's candidates for the sequence ``ids``."""
        w = self.workers
        target = await self._next_logprobs(session, w.target_url, w.target_model, ids)
        threshold = lockstep_threshold(target, self.params.alpha, self.params.min_keep)
        candidates = [i for i, lp in target.items() if lp >= threshold]
        assistant = await self._next_logprobs(session, w.assistant_url, w.assistant_model, ids, candidates)
        return combine_top_logprobs(target, assistant, self.params.weight, self.params.alpha, self.params.min_keep,
                                    self.params.gate)

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams, max_model_len: int | None = None,
                       processors: Sequence[LogitsProcessor] = ()) -> AsyncIterator[GenerationDelta]:
        """Decode in lock-step; ``processors`` (the gateway's own, e.g. the other targets' names) act on the
        combined scores here, since the workers only report logprobs."""
        own_session = self._session is None
        session = self._session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
        try:
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator().manual_seed(sampling.seed % 2**64)
            budget = sampling.max_tokens if sampling.max_tokens is not None else (
                (max_model_len or 2048) - len(prompt_ids))
            stream = TextStream(self.tokenizer, sampling.stop)
            ids = list(prompt_ids)
            output: list[int] = []
            finish = "length"
            vocab = len(self.tokenizer)
            while len(output) < budget:
                combined = await self.step_scores(session, ids)
                scores = apply_processors(processors, prompt_ids, output, scores_tensor(combined, vocab))
                token = sample_next(scores, sampling.temperature, sampling.top_p, generator)
                output.append(token)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                ids.append(token)
                text = stream.push(token)
                yield GenerationDelta(text, [token])
                if stream.stopped:
                    finish = "stop"
                    break
            yield GenerationDelta(stream.flush(), [], finish_reason=finish, prompt_tokens=len(prompt_ids),
                                  completion_tokens=len(output))
        finally:
            if own_session:
                await session.close()


async def tokenize_chat(session: aiohttp.ClientSession, url: str, messages: list[dict],
                        model: str | None = None) -> list[int]:
    """Render a chat once on the target worker (``/tokenize`` with ``messages``) so both workers see the same ids."""
    payload: dict = {"messages": messages, "add_generation_prompt": True}
    if model:
        payload["model"] = model
    async with session.post(f"{url}/tokenize", data=json.dumps(payload).encode(), headers=_JSON) as response:
        if response.status != 200:
            raise UpstreamError(f"/tokenize on {url} answered {response.status}")
        return list((await response.json())["tokens"])


__all__ = ["LockstepULD", "LockstepWorkers", "parse_top_logprobs", "tokenize_chat"]
