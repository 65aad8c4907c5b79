"""The engine interface: what every engine (local transformers, vLLM over HTTP) accepts and yields.

A ``GenerationRequest`` carries a rendered-or-renderable prompt, sampling parameters and the policy
hooks that later stages attach (logits processors, prompt-embedding segments, a lock-step assistant).
An engine turns it into an async stream of ``GenerationDelta``s; closing the stream cancels generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from policies.processors import LogitsProcessor
from policies.uld import UldParams

Role = Literal["system", "user", "assistant", "developer", "tool"]


@dataclass(frozen=True)
class EmbedsPart:
    """A run of prompt positions given as input embeddings ``(tokens, hidden)`` instead of token ids."""

    embeds: torch.Tensor


# A message's content: plain text, or text interleaved with embedding runs (ECO, vLLM's prompt_embeds).
Content = str | list[str | EmbedsPart]


@dataclass(frozen=True)
class Message:
    role: Role
    content: Content


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's only
    # vLLM's ``logprob_token_ids``: report logprobs of exactly these ids (in this order) instead of the top ones.
    logprob_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Assistant:
    """A second model decoding in lock-step with the served one (ULD).

    ``combine(target_logits, assistant_logits)`` returns the logits to sample from; both are 1-D over the
    shared vocabulary. ``model`` names a model the engine can load (a path), or, behind the vLLM engine, the
    model an assistant worker serves. ``params``: the same rule as parameters, for the lock-step form over HTTP
    (``gateway.engines.lockstep``), which combines top-K logprobs rather than logits.
    """

    model: str
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: UldParams | None = None


@dataclass
class GenerationRequest:
    request_id: str
    sampling: SamplingParams
    messages: Sequence[Message] | None = None  # chat: rendered with the model's chat template
    prompt: str | None = None  # completions: used as is
    prompt_ids: list[int] | None = None  # completions: already tokenized
    prompt_embeds: torch.Tensor | None = None  # completions: the whole prompt as embeddings
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    assistant: Assistant | None = None
    # Wire-protocol extras that only the vLLM engine forwards (per-request policy args for the plugin).
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class GenerationDelta:
    """New text since the previous delta. The last delta of a sequence has ``finish_reason`` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """What the gateway needs from an engine."""

    def model_names(self) -> list[str]: ...

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...
