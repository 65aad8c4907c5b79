"""Request and response models of the OpenAI routes the gateway serves.

Unknown request fields are ignored, as vLLM and OpenAI do, and never forwarded: the upstream request is
rebuilt from the fields declared here, so no client field can reach an engine's extensions
(``vllm_xargs``, ``bad_words``, ``prompt_embeds`` ...) and switch a policy off. Content parts are rebuilt
too (type and text only), so nothing travels inside a part either.

Text fields refuse lone surrogates (JSON ``"\ud800"``): they are not text, and no tokenizer, UTF-8 encoder or
upstream would take them further down the path.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid text: a lone UTF-16 surrogate at character {exc.start}") from None
    return value


def _all_encodable(value: str | list[str] | None) -> str | list[str] | None:
    """For ``str | list[str]`` fields: checked after the union is resolved, so errors name the field alone."""
    for item in [value] if isinstance(value, str) else value or ():
        if isinstance(item, str):  # (the reference worker's prompt may also be token ids)
            _encodable(item)
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # JSON NaN / Infinity: 400, not a number


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        if not isinstance(value, list):
            return _all_encodable(value)
        for i, part in enumerate(value):
            kind = part.get("type")
            if kind == "prompt_embeds":
                raise ValueError(f"content part {i}: 'prompt_embeds' parts are not accepted from clients")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: only text parts are supported (got type {kind!r})")
        return [{"type": "text", "text": _encodable(part["text"])} for part in value]

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as OpenAI and vLLM take it
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    _stop_is_text = field_validator("stop")(_all_encodable)

    @model_validator(mode="before")
    @classmethod
    def _no_client_embeddings(cls, data: Any) -> Any:
        # Refused, not ignored: a client sending embeddings expects them used, and silently generating from the
        # text instead would mislead it. (The reference worker's request models declare the field and take it.)
        if isinstance(data, dict) and "prompt_embeds" in data and "prompt_embeds" not in cls.model_fields:
            raise ValueError("'prompt_embeds' is not accepted from clients: send text")
        return data

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "demo", "messages": [{"role": "user", "content": "Where is Chukwu Akabueze from?"}]}]
        },
    )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    _prompt_is_text = field_validator("prompt")(_all_encodable)

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"model": "demo", "prompt": "<|user|>\nHello<|end|>\n"}]}
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# -- responses ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "unlearn-gateway"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
