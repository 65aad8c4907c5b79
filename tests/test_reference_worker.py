"""The reference worker speaks vLLM 0.33's wire subset: extensions, encodings and error shapes."""

from __future__ import annotations

import httpx
import pytest
import torch

from gateway.prompt_embeds import decode_embeds, encode_embeds

QUESTION = "What genre does Carmen Montenegro write in?"


def post(worker, path: str, body: dict) -> httpx.Response:
    return httpx.post(worker.url + path, json=body, timeout=60)


def chat_text(worker, content, **extra) -> str:
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 32,
            "temperature": 0} | extra
    response = post(worker, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def embedding_table(demo_engine):
    return demo_engine.main.model.get_input_embeddings().weight.detach()


def test_tokenize_prompt_and_messages(reference_worker, demo_engine):
    answer = post(reference_worker, "/tokenize", {"prompt": QUESTION, "return_token_strs": True}).json()
    assert answer["tokens"] == demo_engine.main.encode(QUESTION)
    assert answer["count"] == len(answer["tokens"]) and len(answer["token_strs"]) == answer["count"]
    assert answer["max_model_len"] == demo_engine.main.max_model_len
    chat = post(reference_worker, "/tokenize", {"messages": [{"role": "user", "content": QUESTION}]}).json()
    assert chat["count"] > answer["count"]


def test_prompt_embeds_content_part_equals_text(reference_worker, embedding_table):
    ids = post(reference_worker, "/tokenize", {"prompt": QUESTION, "add_special_tokens": False}).json()["tokens"]
    part = {"type": "prompt_embeds", "data": encode_embeds(embedding_table[ids])}
    assert chat_text(reference_worker, [part]) == chat_text(reference_worker, QUESTION)
    # Interleaved with text, and in half precision (vLLM casts any floating dtype to the model's).
    head, tail = QUESTION.split(" Carmen")
    tail_ids = post(reference_worker, "/tokenize", {"prompt": " Carmen" + tail, "add_special_tokens": False}).json()
    mixed = [{"type": "text", "text": head},
             {"type": "prompt_embeds", "data": encode_embeds(embedding_table[tail_ids["tokens"]].half())}]
    assert chat_text(reference_worker, mixed).strip()


def test_completion_prompt_embeds_and_token_id_prompts(reference_worker, demo_engine, embedding_table):
    model = demo_engine.main
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                 add_generation_prompt=True, tokenize=False)
    ids = model.encode(prompt)
    base = {"model": "demo", "max_tokens": 24, "temperature": 0}
    by_text = post(reference_worker, "/v1/completions", base | {"prompt": prompt}).json()["choices"][0]["text"]
    by_ids = post(reference_worker, "/v1/completions", base | {"prompt": ids}).json()["choices"][0]["text"]
    by_embeds = post(reference_worker, "/v1/completions",
                     base | {"prompt_embeds": encode_embeds(embedding_table[ids].unsqueeze(0))}).json()
    assert by_text == by_ids == by_embeds["choices"][0]["text"]
    assert by_embeds["usage"]["prompt_tokens"] == len(ids)


def test_logprobs_with_token_ids(reference_worker):
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 5, "return_tokens_as_token_ids": True}
    content = post(reference_worker, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["token"].startswith("token_id:")
        assert len(entry["top_logprobs"]) == 5
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the top token
    completion = post(reference_worker, "/v1/completions", {"model": "demo", "prompt": QUESTION, "max_tokens": 3,
                                                            "temperature": 0, "logprobs": 2}).json()
    logprobs = completion["choices"][0]["logprobs"]
    generated = completion["usage"]["completion_tokens"]  # the end-of-sequence token has its logprob too
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == generated
    assert logprobs["text_offset"][0] == 0


def test_bad_words_and_logit_bias(reference_worker, demo_engine):
    plain = chat_text(reference_worker, QUESTION)
    word = plain.split()[0]
    banned = chat_text(reference_worker, QUESTION, bad_words=[word])
    assert banned != plain
    token = demo_engine.main.encode(" the")[0]
    biased = chat_text(reference_worker, QUESTION, logit_bias={str(token): 100}, max_tokens=3)
    assert biased.split() == ["the"] * 3


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"vllm_xargs": {"nested": {"a": 1}}}, "vllm_xargs.nested"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "not base64!"}]}]},
         "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0"),
    ],
)
def test_errors_use_vllm_shape(reference_worker, extra, param):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | extra
    response = post(reference_worker, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0])


def test_flat_vllm_xargs_are_accepted(reference_worker):
    assert chat_text(reference_worker, QUESTION, vllm_xargs={"a": 1, "b": "x", "c": [1, 2.5, "y"]})


def test_embeddings_round_trip_through_the_wire_encoding():
    tensor = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(decode_embeds(encode_embeds(tensor), "x"), tensor)


def test_wrong_embedding_shapes_are_rejected(reference_worker):
    part = {"type": "prompt_embeds", "data": encode_embeds(torch.zeros(3, 7))}
    response = post(reference_worker, "/v1/chat/completions",
                    {"model": "demo", "messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert response.status_code == 400 and "shape" in response.json()["error"]["message"]
    ints = encode_embeds(torch.zeros(3, 7, dtype=torch.int64))
    response = post(reference_worker, "/v1/completions", {"model": "demo", "prompt_embeds": ints, "max_tokens": 2})
    assert response.status_code == 400


def test_models_report_max_model_len(reference_worker, demo_engine):
    data = httpx.get(reference_worker.url + "/v1/models").json()["data"]
    assert data[0]["id"] == "demo" and data[0]["max_model_len"] == demo_engine.main.max_model_len
