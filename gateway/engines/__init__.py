"""Engines behind one interface: ``local`` (transformers in process) and ``vllm`` (HTTP workers)."""

from __future__ import annotations

from gateway.engines.base import (
    Assistant,
    EmbedsPart,
    Engine,
    GenerationDelta,
    GenerationRequest,
    Message,
    SamplingParams,
    TokenLogprob,
)
from gateway.settings import Settings

__all__ = ["Assistant", "EmbedsPart", "Engine", "GenerationDelta", "GenerationRequest", "Message",
           "SamplingParams", "TokenLogprob", "build_engine"]


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "vllm":
        from gateway.engines.vllm import VLLMEngine

        if not settings.worker_urls:
            raise ValueError("UNLEARN_ENGINE=vllm needs UNLEARN_WORKER_URLS")
        return VLLMEngine(
            settings.worker_urls,
            served_model_name=settings.served_model_name,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
            first_token_timeout_s=settings.upstream_first_token_timeout_s,
            retries=settings.upstream_retries,
            health_interval_s=settings.health_interval_s,
            assistant_url=settings.uld_assistant_url or None,
            tokenizer_model=settings.model if settings.uld_assistant_url else None,
        )
    from gateway.engines.local import LocalEngine

    return LocalEngine(settings.model, settings.served_model_name, settings.device, settings.local_max_concurrency)
