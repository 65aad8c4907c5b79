"""The official openai client against the gateway over both engines, on real loopback servers."""

from __future__ import annotations

import httpx
import openai
import pytest

QUESTION = "What genre does Carmen Montenegro write in?"


def client(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def chat(server, content: str = QUESTION, **kwargs):
    kwargs.setdefault("max_tokens", 48)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("model", "demo")
    return client(server).chat.completions.create(messages=[{"role": "user", "content": content}], **kwargs)


def test_models_lists_the_demo_model(gateway):
    assert [m.id for m in client(gateway).models.list()] == ["demo"]


def test_chat_answers_with_usage_and_finish_reason(gateway):
    response = chat(gateway)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_greedy_output_equals_non_streamed(gateway):
    full = chat(gateway)
    stream = chat(gateway, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_max_tokens_ends_with_length(gateway):
    response = chat(gateway, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3
    # max_completion_tokens is the newer name of the same limit
    response = client(gateway).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": QUESTION}], max_completion_tokens=2, temperature=0)
    assert response.usage.completion_tokens == 2


def test_stop_string_cuts_the_answer(gateway):
    full = chat(gateway).choices[0].message.content
    words = full.split()
    assert len(words) > 3, full
    stop = " " + words[2]
    cut = chat(gateway, stop=[stop, "@@never@@"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(gateway, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content


def test_n_choices_and_seeded_sampling(gateway):
    response = chat(gateway, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    again = chat(gateway, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    streamed = chat(gateway, n=2, temperature=0, max_tokens=8, stream=True)
    indices = {choice.index for chunk in streamed for choice in chunk.choices}
    assert indices == {0, 1}


def test_system_and_multi_turn_content_parts(gateway):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "What genre does "},
                                     {"type": "text", "text": "Carmen Montenegro write in?"}]},
    ]
    response = client(gateway).chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0,
                                                       user="tester", top_p=0.9)
    assert response.choices[0].message.content


def test_completions_raw_prompt_stream_and_json(gateway):
    c = client(gateway)
    prompt = "<|user|>\n" + QUESTION + "<|end|>\n<|assistant|>\n"
    full = c.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0)
    assert full.choices[0].text.strip()
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt=prompt, max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == full.choices[0].text
    chat_answer = chat(gateway, max_tokens=20).choices[0].message.content
    assert full.choices[0].text == chat_answer  # the same template, rendered by hand


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"max_tokens": 100_000}, 400, "max_tokens"),
        ({"temperature": 5}, 400, "temperature"),
        ({"n": 1000}, 400, "n"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]}, 400,
         "messages.0.content"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ],
)
def test_errors_are_openai_envelopes(gateway, kwargs, status, param):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]} | kwargs
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param


def test_openai_client_raises_typed_errors(gateway):
    with pytest.raises(openai.NotFoundError):
        chat(gateway, model="nope")
    with pytest.raises(openai.BadRequestError):
        chat(gateway, max_tokens=100_000)


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"messages": "x"}', b"\xff\xfe", b"null"])
def test_malformed_bodies_are_400(gateway, body):
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_use_the_envelope(gateway):
    assert httpx.get(gateway.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = httpx.get(gateway.url + "/v1/chat/completions")
    assert response.status_code == 405
    assert "error" in response.json()


def test_unsupported_fields_are_ignored_and_never_forwarded(gateway, reference_worker):
    """vllm_xargs / bad_words / logit_bias from a client must not reach the engine."""
    plain = chat(gateway).choices[0].message.content
    first_word = plain.split()[0]
    hostile = {"bad_words": [first_word], "logit_bias": {"5": 100}, "vllm_xargs": {"x": 1},
               "guided_json": {"type": "object"}, "frobnicate": True}
    assert chat(gateway, extra_body=hostile).choices[0].message.content == plain
    # The same fields sent to the worker directly do change generation: the test can tell.
    direct = client(reference_worker).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0,
        extra_body={"bad_words": [first_word]})
    assert direct.choices[0].message.content != plain


def test_health_and_ready(gateway):
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(gateway, reference_worker, demo_engine, stream):
    """Closing the connection stops decoding in whichever engine generates (local, or the worker)."""
    import time

    engine = demo_engine if _engine_kind(gateway) == "local" else reference_worker.app.state.engine
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 450,
            "temperature": 1.0, "top_p": 1.0, "seed": 1, "stream": stream}
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
                for _ in response.iter_lines():
                    break
                assert engine.active_generations >= 1
        else:
            try:
                http.post(gateway.url + "/v1/chat/completions", json=body, timeout=0.3)
            except httpx.ReadTimeout:
                pass
    for _ in range(200):
        if engine.active_generations == 0:
            break
        time.sleep(0.02)
    assert engine.active_generations == 0


def _engine_kind(server) -> str:
    return server.app.state.settings.engine
