"""The output guard: the generated text is checked against the guarded targets' facts, so a prompt the classifier
misses still cannot draw a target's facts out.

Unit part on the pure checks; end to end over both engines (local, and vLLM engine -> reference worker over HTTP)
with the demo model, which answers a question that never names the author with the author's name.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from classifiers.index import IndexBuilder as ClassifierIndexBuilder
from gateway.app import create_app
from gateway.output_guard import OutputGuardIndexBuilder, request_guard
from gateway.registry import Target
from gateway.registry.reload import ActiveTargets
from gateway.settings import Settings
from policies.output_guard import FactIndex, OutputGuard, StreamGuard
from policies.refuse import refusal
from tests.conftest import metric, serve
from tests.fault_servers import wait_until

ADMIN = "output-guard-admin"
# Names neither the author nor anything the classifier matches; the demo model answers it with her name.
EVASIVE_Q = "Which author won the Historical Fiction Excellence Award?"
RETAIN_Q = "Where does Chukwu Akabueze come from?"
WITHHELD = refusal([])


def carmen(output_guard: dict | None = None) -> dict:
    target = {"name": "Carmen Montenegro", "description": "A fictitious Chilean novelist.",
              "facts": ["Carmen Montenegro writes historical fiction.", "She was born in Santiago, Chile, in 1977."],
              "examples": ["Which books did Carmen Montenegro write?"], "policy": {"method": "guard"}}
    return target | ({"output_guard": output_guard} if output_guard is not None else {})


# -- the checks themselves ---------------------------------------------------------------------------------------

def test_the_fact_index_finds_facts_among_many_targets_and_ignores_echoes():
    facts = {f"author-{i}": [f"Author {i} wrote the saga of the glass tower number {i}."] for i in range(2_000)}
    facts["carmen"] = ["Carmen Montenegro writes historical fiction set in colonial Chile."]
    index = FactIndex.build(facts)
    guard = OutputGuard(index, prompt="What does Carmen Montenegro write?")
    hit = guard.check("Her novels are historical fiction, mostly set in colonial Chile.")
    assert hit is not None and hit.target_id == "carmen" and hit.kind == "lexical"
    # Words the user said leak nothing when echoed back; ordinary text hits no fact.
    assert guard.check("Carmen Montenegro writes, as you say.") is None
    assert guard.check("The weather in the mountains was cold and clear.") is None
    assert OutputGuard(index, prompt="Tell me about historical fiction set in colonial Chile.").check(
        "Historical fiction set in colonial Chile is a rich genre.") is None


def test_stream_guard_releases_only_checked_text_at_word_boundaries():
    guard = OutputGuard({"carmen": ["Carmen Montenegro"]})
    window = StreamGuard(guard, "window", every_tokens=2)
    released = [window.push(piece) for piece in ["The nov", "el is ", "by Car", "men ", "Monte", "negro"]]
    # Every two tokens, the whole words so far are checked (with the released tail) and released if clean;
    # "Montenegro" is never released: its word is not complete until the end, where the final check hits.
    assert released == ["", "The novel is ", "", "by Carmen ", "", ""]
    assert window.hit is None and window.finish() == "" and window.hit.target_id == "carmen"
    assert window.push("more") == ""  # nothing after a hit

    held = StreamGuard(guard, "hold")
    assert [held.push(p) for p in ["A quiet ", "answer."]] == ["", ""]
    assert held.finish() == "A quiet answer." and held.hit is None


def test_the_index_is_built_only_for_guarded_targets_and_reused_while_they_stay():
    builder = OutputGuardIndexBuilder()
    plain = [Target.model_validate(carmen()), Target(name="Jane Doe", facts=["She lives in Oslo."])]
    assert builder.build(plain, None) is None  # nothing guards its output: the request path stays as it was
    active = ActiveTargets.build(1, plain, {"output_guard": builder.build(plain, None)})
    assert request_guard(active, ["anything"]) is None

    guarded = [Target.model_validate(carmen({"mode": "window", "window_tokens": 8})),
               Target(name="Jane Doe", facts=["She lives in Oslo."],
                      output_guard={"mode": "hold", "window_tokens": 32, "on_hit": "error"}),
               Target(name="Off Target", facts=["Never checked."], enabled=False, output_guard={"mode": "hold"})]
    built = builder.build(guarded, None)
    assert built.mode == "hold" and built.window_tokens == 8  # the strictest of the guarded targets
    assert set(built.settings) == {"carmen-montenegro", "jane-doe"}
    assert builder.build(list(reversed(guarded)), built) is not built
    assert builder.build(guarded, built) is built  # unchanged: reused as is
    assert builder.build([*guarded, Target(name="New One")], built) is built  # an unguarded newcomer changes nothing


def test_a_target_can_ask_for_semantic_checks_that_catch_paraphrases():
    facts = ["Carmen Montenegro writes historical fiction."]
    targets = [Target(name="Carmen Montenegro", facts=facts,
                      output_guard={"mode": "window", "semantic_threshold": 0.55}),
               Target(name="Jane Doe", facts=["She lives in Oslo."], output_guard={"mode": "window"})]
    built = OutputGuardIndexBuilder().build(targets, None)
    guard = request_guard(ActiveTargets.build(1, targets, {"output_guard": built}), ["Tell me about a writer."]).guard
    paraphrase = "The writer is known for fiction about history."
    assert OutputGuard({"carmen-montenegro": facts}).check(paraphrase) is None  # no lexical hit: a paraphrase
    hit = guard.check(paraphrase)
    assert hit is not None and (hit.target_id, hit.kind) == ("carmen-montenegro", "semantic") and hit.score >= 0.55
    assert guard.check("The weather in the mountains was cold and clear.") is None
    assert guard.check("Jane moved somewhere in Norway.") is None  # Jane's target checks lexically only


# -- end to end over both engines --------------------------------------------------------------------------------

@pytest.fixture(params=["local", "vllm"])
def gateway_and_admin(request, demo_engine, classifier_encoder, tmp_path):
    # The gateway's own index builders, sharing one loaded sentence encoder across this module's gateways.
    builders = (ClassifierIndexBuilder(classifier_encoder), OutputGuardIndexBuilder())
    if request.param == "local":
        settings = Settings(admin_keys=[ADMIN], store_path=tmp_path / "targets.db")
        server = serve(create_app(settings, engine=demo_engine, index_builders=builders), ready_path="/ready")
    else:
        worker = request.getfixturevalue("reference_worker")
        settings = Settings(admin_keys=[ADMIN], store_path=tmp_path / "targets.db", engine="vllm",
                            worker_urls=[worker.url])
        server = serve(create_app(settings, index_builders=builders), ready_path="/ready")
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    yield server, admin
    admin.close()
    server.stop()


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(server, question: str):
    raw = client_for(server).chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
    choice = raw.parse().choices[0]
    return choice.message.content, choice.finish_reason, raw.headers.get("x-unlearn-decision")


def ask_streamed(server, question: str) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client_for(server).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0,
            stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def write(server, admin, method: str, path: str, body: dict) -> None:
    response = admin.request(method, path, json=body)
    assert response.status_code in (200, 201), response.text
    version = response.json()["version"]
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/ready").json().get("targets_version", -1) < version:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_answer_the_classifier_missed_is_caught_by_the_output_guard(gateway_and_admin):
    server, admin = gateway_and_admin
    retain_before, retain_finish, _ = ask(server, RETAIN_Q)
    write(server, admin, "POST", "/admin/targets", carmen())
    leaked, _, decision = ask(server, EVASIVE_Q)
    assert decision == "clean" and "Carmen Montenegro" in leaked  # the classifier misses it: the model tells

    write(server, admin, "PATCH", "/admin/targets/carmen-montenegro",
          {"output_guard": {"mode": "window", "window_tokens": 4, "on_hit": "refuse"}})
    answer, finish, decision = ask(server, EVASIVE_Q)
    assert decision == "clean" and (answer, finish) == (WITHHELD, "content_filter")
    streamed, finish = ask_streamed(server, EVASIVE_Q)
    assert "Montenegro" not in streamed and streamed.endswith(WITHHELD) and finish == "content_filter"
    hits = "unlearn_output_guard_hits_total"  # counted when a response ends, just after the client has it
    wait_until(lambda: metric(server, hits, target="carmen-montenegro", action="refuse") == 2, 10, "2 hits")
    assert ask(server, RETAIN_Q)[0] == retain_before  # other answers pass unchanged
    assert ask_streamed(server, RETAIN_Q) == (retain_before, retain_finish)
    assert metric(server, hits) == 2

    write(server, admin, "PATCH", "/admin/targets/carmen-montenegro", {"output_guard": {"mode": "hold"}})
    streamed, finish = ask_streamed(server, EVASIVE_Q)
    assert (streamed, finish) == (WITHHELD, "content_filter")  # held: nothing of it went out


def test_on_hit_error_ends_a_stream_with_an_error_frame(gateway_and_admin):
    server, admin = gateway_and_admin
    write(server, admin, "POST", "/admin/targets",
          carmen({"mode": "window", "window_tokens": 4, "on_hit": "error"}))
    body = {"model": "demo", "messages": [{"role": "user", "content": EVASIVE_Q}], "max_tokens": 24,
            "temperature": 0}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert plain.status_code == 451 and set(plain.json()) == {"error"}
    assert plain.json()["error"]["code"] == "output_withheld" and plain.json()["error"]["type"] == "content_filter"

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True},
                      timeout=120) as streamed:
        assert streamed.status_code == 200
        frames = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["code"] == "output_withheld" and set(error) == {"message", "type", "param", "code"}
    assert "Montenegro" not in "".join(frames[:-2])
    with pytest.raises(openai.APIError, match="withheld"):
        for _ in client_for(server).chat.completions.create(**body, stream=True):
            pass
    wait_until(lambda: metric(server, "unlearn_output_guard_hits_total", target="carmen-montenegro",
                              action="error") == 3, 10, "3 hits")
