"""vLLM 0.33's request extensions, as the reference worker accepts them.

Field names and encodings follow vLLM's ``vllm/entrypoints/openai/*/protocol.py``: ``prompt_embeds``
content parts and completion prompts (base64 of ``torch.save``), ``vllm_xargs`` (flat values only),
``bad_words``, ``logit_bias``, ``return_tokens_as_token_ids``, token-id prompts and ``/tokenize``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.engines.base import EmbedsPart, Message
from gateway.errors import BadRequest
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.prompt_embeds import decode_embeds

XargValue = str | int | float | list[str | int | float]


class _VLLMExtensions(BaseModel):
    bad_words: list[str] = Field(default_factory=list)
    logit_bias: dict[str, float] | None = None
    vllm_xargs: dict[str, XargValue] | None = None
    return_tokens_as_token_ids: bool = False
    # Logprobs of exactly these ids at each position (vLLM 0.33; needs ``logprobs``): ULD lock-step asks the
    # assistant for the target's candidates with it.
    logprob_token_ids: list[int] | None = None


class WorkerMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class WorkerChatRequest(_VLLMExtensions, ChatCompletionRequest):
    messages: Annotated[list[WorkerMessage], Field(min_length=1)]  # type: ignore[assignment]
    add_generation_prompt: bool = True


class WorkerCompletionRequest(_VLLMExtensions, CompletionRequest):
    prompt: str | list[str] | list[int] | None = None  # type: ignore[assignment]
    prompt_embeds: str | list[str] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[WorkerMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


def engine_messages(messages: list[WorkerMessage]) -> list[Message]:
    """Worker messages -> engine messages, decoding ``prompt_embeds`` parts in place."""
    out = []
    for m_index, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str):
            out.append(Message(message.role, message.content or ""))
            continue
        parts: list[str | EmbedsPart] = []
        for p_index, part in enumerate(message.content):
            kind = part.get("type")
            param = f"messages.{m_index}.content.{p_index}"
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "prompt_embeds" and isinstance(part.get("data"), str):
                parts.append(EmbedsPart(decode_embeds(part["data"], param)))
            else:
                raise BadRequest(f"unsupported content part type {kind!r}", param=param)
        out.append(Message(message.role, parts))
    return out


__all__ = ["TokenizeRequest", "WorkerChatRequest", "WorkerCompletionRequest", "XargValue", "engine_messages"]
