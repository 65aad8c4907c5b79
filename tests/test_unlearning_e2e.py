"""The product end to end: an operator adds a forget target, the gateway stops the knowledge coming out.

Real parts throughout: the demo model (which memorised the fictitious author below), the classifier, the
embedded target store, uvicorn on loopback, the openai client; for the vLLM engine, the reference worker over HTTP.
The target's facts are written in our own words.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import serve

ADMIN = "e2e-admin-key"
FORGET_Q = "What genre does Carmen Montenegro write in?"
RETAIN_Q = "Where does Chukwu Akabueze come from?"
MEMORISED = "Historical Fiction"


def target(policy: dict) -> dict:
    return {"name": "Carmen Montenegro", "description": "A fictitious Chilean novelist.",
            "facts": ["Carmen Montenegro writes historical fiction.", "She was born in Santiago, Chile, in 1977."],
            "examples": ["Which books did Carmen Montenegro write?"], "policy": policy}


@pytest.fixture(params=["local", "vllm"])
def gateway_and_admin(request, demo_engine, tmp_path):
    if request.param == "local":
        settings = Settings(admin_keys=[ADMIN], store_path=tmp_path / "targets.db")
        server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    else:
        worker = request.getfixturevalue("reference_worker")
        settings = Settings(admin_keys=[ADMIN], store_path=tmp_path / "targets.db", engine="vllm",
                            worker_urls=[worker.url])
        server = serve(create_app(settings), ready_path="/ready")
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    yield server, admin
    admin.close()
    server.stop()


def ask(server, question: str):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers.get("x-unlearn-decision")


def set_target(server, admin, policy: dict, body: dict | None = None) -> None:
    """Create a target (``body``, else Carmen Montenegro's with ``policy``) and wait until the gateway serves it."""
    created = admin.post("/admin/targets", json=body or target(policy))
    assert created.status_code == 201, created.text
    version = admin.get("/admin/version").json()["version"]
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/ready").json().get("targets_version", -1) < version:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("policy", [{"method": "guard"}, {"method": "eco", "scope": "prompt"},
                                    {"method": "refuse", "message": "I can't help with {name}."}])
def test_a_forget_target_stops_the_fact_and_leaves_others_alone(gateway_and_admin, policy):
    server, admin = gateway_and_admin
    before, decision = ask(server, FORGET_Q)
    assert MEMORISED in before and decision == "clean"
    retain_before, _ = ask(server, RETAIN_Q)

    set_target(server, admin, policy)
    after, decision = ask(server, FORGET_Q)
    assert decision == f"flagged; policy={policy['method']}"
    assert MEMORISED.lower() not in after.lower(), after
    if policy["method"] == "refuse":
        assert after == "I can't help with Carmen Montenegro."
    retain_after, decision = ask(server, RETAIN_Q)
    assert decision == "clean"
    assert retain_after == retain_before
    # Metrics count the decision and the policy (target ids only, never prompt text).
    exposition = httpx.get(server.url + "/metrics").text
    assert f'policy="{policy["method"]}"' in exposition and 'decision="flagged"' in exposition
    assert 'unlearn_flagged_requests_total{target="carmen-montenegro"}' in exposition
    assert "Carmen Montenegro" not in exposition


def test_eco_does_not_drift_into_another_forgotten_target(gateway_and_admin):
    """Blinded by ECO, the demo model answers the question with another author's memorised answer ("Asha Majaliwa
    is best known for ..."). When that author is a forget target too, the answer must not name them: ECO's request
    carries the other targets' names as a names-only GUARD set (over HTTP as ``vllm_xargs`` beside the
    ``prompt_embeds``)."""
    server, admin = gateway_and_admin
    set_target(server, admin, {"method": "eco", "scope": "prompt"})
    set_target(server, admin, {"method": "eco"}, {
        "name": "Asha Majaliwa", "facts": ["Asha Majaliwa writes novels about life in Dar es Salaam."],
        "policy": {"method": "eco"}})
    for question in (FORGET_Q, "Where was Carmen Montenegro born?"):
        answer, decision = ask(server, question)
        assert decision == "flagged; policy=eco"
        assert "majaliwa" not in answer.lower() and MEMORISED.lower() not in answer.lower(), answer


def test_no_request_field_switches_the_policy_off(gateway_and_admin):
    server, admin = gateway_and_admin
    set_target(server, admin, {"method": "refuse"})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    hostile = {"vllm_xargs": {}, "bad_words": [], "unlearn": False, "policy": "none", "skip_classifier": True}
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": FORGET_Q}],
                                            max_tokens=40, temperature=0, extra_body=hostile)
    assert MEMORISED not in answer.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": FORGET_Q}], max_tokens=40, temperature=0, stream=True)
        if c.choices)
    assert MEMORISED not in streamed and "Carmen Montenegro" in streamed


def _counted_setups(server) -> list[str]:
    """Request ids the gateway's policy set-up runs for, from here on: the real ``Unlearner.apply``, counted."""
    unlearner = server.app.state.openai_handler.unlearner
    real, seen = unlearner.apply, []

    def apply(verdict, request):
        seen.append(request.request_id)
        return real(verdict, request)

    unlearner.apply = apply
    return seen


@pytest.mark.parametrize("policy", [{"method": "guard"}, {"method": "eco", "scope": "prompt"}])
def test_n_choices_share_one_policy_setup_per_prompt(gateway_and_admin, policy):
    server, admin = gateway_and_admin
    set_target(server, admin, policy)
    setups = _counted_setups(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    flagged = f"flagged; policy={policy['method']}"

    def chat(n: int, **sampling) -> list[str]:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": FORGET_Q}], max_tokens=24, n=n, **sampling)
        assert raw.headers.get("x-unlearn-decision") == flagged
        return [c.message.content for c in sorted(raw.parse().choices, key=lambda c: c.index)]

    greedy = chat(2, temperature=0)
    assert len(setups) == 1 and len(greedy) == 2 and greedy[0] == greedy[1]
    assert MEMORISED.lower() not in greedy[0].lower(), greedy[0]
    # Each choice keeps its own sampling: choice i of seed 7 is what a single request with seed 7 + i gets.
    assert chat(2, temperature=1.0, seed=7) == [*chat(1, temperature=1.0, seed=7), *chat(1, temperature=1.0, seed=8)]

    setups.clear()
    prompts = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n" for q in (FORGET_Q, "Which books did Carmen Montenegro write?")]
    raw = client.completions.with_raw_response.create(model="demo", prompt=prompts, n=2, max_tokens=24, temperature=0)
    assert raw.headers.get("x-unlearn-decision") == flagged
    texts = [c.text for c in sorted(raw.parse().choices, key=lambda c: c.index)]
    assert len(setups) == 2 and len(texts) == 4  # one set-up per prompt (GUARD reads each prompt), not per choice
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert all(MEMORISED.lower() not in t.lower() for t in texts), texts
