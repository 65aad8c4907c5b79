"""The vLLM engine against reference workers over real HTTP: parsing, round-robin, failover."""

from __future__ import annotations

import httpx
import pytest

from gateway.engines import GenerationRequest, Message, SamplingParams
from gateway.engines.vllm import VLLMEngine
from gateway.errors import BadRequest, Unavailable
from tests.conftest import free_port

QUESTION = "What genre does Carmen Montenegro write in?"


def request(max_tokens: int = 24, **sampling) -> GenerationRequest:
    return GenerationRequest("t", SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
                             messages=[Message("user", QUESTION)])


async def collect(engine, req):
    text, last = "", None
    async for delta in engine.generate(req):
        text += delta.text
        last = delta
    return text, last


async def test_parsed_stream_equals_the_local_engine(reference_worker, demo_engine):
    engine = VLLMEngine([reference_worker.url])
    await engine.start()
    try:
        assert engine.model_names() == ["demo"]
        remote, last = await collect(engine, request())
        local, local_last = await collect(demo_engine, request())
        assert remote == local
        assert last.finish_reason == local_last.finish_reason
        assert (last.prompt_tokens, last.completion_tokens) == (local_last.prompt_tokens, local_last.completion_tokens)
        _, with_logprobs = await collect(engine, request(max_tokens=2, top_logprobs=3))
        assert with_logprobs.logprobs is None or len(with_logprobs.logprobs[0].top) == 3
    finally:
        await engine.aclose()


async def test_worker_errors_keep_their_status(reference_worker):
    engine = VLLMEngine([reference_worker.url])
    await engine.start()
    try:
        with pytest.raises(BadRequest) as info:
            await collect(engine, request(max_tokens=100_000))
        assert info.value.status == 400 and "context length" in info.value.message
    finally:
        await engine.aclose()


async def test_round_robin_skips_a_dead_worker_and_retries_on_connect_errors(reference_worker):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    engine = VLLMEngine([dead, reference_worker.url, dead], health_interval_s=60)
    await engine.start()
    try:
        assert [w.healthy for w in engine.workers] == [False, True, False]
        assert await engine.ready()
        for worker in engine.workers:  # pretend the health check has not noticed yet
            worker.healthy = True
        for _ in range(4):
            text, _ = await collect(engine, request(max_tokens=4))
            assert text
        assert [w.healthy for w in engine.workers] == [False, True, False]
    finally:
        await engine.aclose()


async def test_no_reachable_worker_is_503():
    engine = VLLMEngine([f"http://127.0.0.1:{free_port()}"], retries=1)
    await engine.start()
    try:
        assert not await engine.ready()
        with pytest.raises(Unavailable):
            await collect(engine, request())
    finally:
        await engine.aclose()


def test_gateway_reports_unready_without_workers():
    from gateway.app import create_app
    from gateway.settings import Settings
    from tests.conftest import serve

    server = serve(create_app(Settings(engine="vllm", worker_urls=[f"http://127.0.0.1:{free_port()}"])))
    try:
        assert httpx.get(server.url + "/ready").status_code == 503
        response = httpx.post(server.url + "/v1/chat/completions",
                              json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
    finally:
        server.stop()
