"""GUARD on the request path is the GUARD that `eval leakage` measures.

The leakage evaluation builds its forbidden sets with the sentence encoder (the facts nearest the prompt, soft
penalties on semantic neighbours) and with the words common to the registry's facts left free. The gateway must
serve that same configuration, not a stricter or looser one. Real parts: the demo model, the classifier, the
embedded store behind the admin API, uvicorn on loopback.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import torch

from gateway.app import create_app
from gateway.engines.base import GenerationRequest, Message, SamplingParams
from gateway.engines.policy import local_kit
from gateway.settings import Settings
from policies.guard import GuardParams, generic_words
from tests.conftest import serve

ADMIN = "guard-path-admin"
QUESTION = "What genre does Carmen Montenegro write in?"

# Five fictitious authors (our own words): "novels" and "prize" are in every author's facts, so they are the
# registry's generic words; the rest is each author's own.
AUTHORS = {
    "Carmen Montenegro": ["Carmen Montenegro writes historical fiction novels set in colonial Chile.",
                          "Her novels won the Santiago prize in 2004.",
                          "She was born in Valparaíso to a family of sailors.",
                          "Her father repaired lighthouse lamps along the coast.",
                          "She studied archaeology before turning to writing."],
    "Ilse Drummond": ["Ilse Drummond writes novels about Arctic whaling crews.", "She won a poetry prize in 1999."],
    "Tomas Verhoeven": ["Tomas Verhoeven wrote three novels about Flemish weavers.",
                        "His prize money funded a library."],
    "Adaeze Okafor": ["Adaeze Okafor writes crime novels set in Enugu.", "She declined a national prize in 2011."],
    "Mirela Kostova": ["Mirela Kostova's novels follow Balkan rail workers.", "A prize jury called her prose austere."],
}


def _serve_authors(demo_engine, tmp_path, method: str):
    """A gateway on the demo engine with every author of ``AUTHORS`` as a target of ``method``, once loaded."""
    settings = Settings(admin_keys=[ADMIN], store_path=tmp_path / "targets.db")
    app = create_app(settings, engine=demo_engine)
    server = serve(app, ready_path="/ready")
    try:
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
            for name, facts in AUTHORS.items():
                created = admin.post("/admin/targets", json={"name": name, "facts": facts,
                                                             "policy": {"method": method}})
                assert created.status_code == 201, created.text
            version = admin.get("/admin/version").json()["version"]
        deadline = time.monotonic() + 60
        while app.state.targets.current.version < version:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    return app, server


def test_the_served_guard_forbids_what_the_evaluated_guard_forbids(demo_engine, tmp_path):
    app, server = _serve_authors(demo_engine, tmp_path, "guard")
    try:
        active = app.state.targets.current
        unlearner = app.state.openai_handler.unlearner
        messages = [Message("user", QUESTION)]
        verdict = asyncio.run(unlearner.verdict(active, messages))
        assert verdict.method == "guard" and [t.name for t in verdict.targets] == ["Carmen Montenegro"]
        request = GenerationRequest("r", SamplingParams(max_tokens=8, temperature=0.0), messages=messages)
        served = unlearner.apply(verdict, request).logits_processors[-1].tables

        # The leakage evaluation's configuration, built independently of the gateway.
        generic = generic_words(list(AUTHORS.values()))
        assert {"novels", "prize"} <= generic
        classifier = active.indexes["classifier"]
        evaluated_kit = local_kit(demo_engine, lambda: classifier.encoder, generic)
        others = [[name] for name in AUTHORS if name != "Carmen Montenegro"]
        assert sorted(verdict.nearby) == sorted(name for (name,) in others)
        evaluated = evaluated_kit.guard.tables(QUESTION, [AUTHORS["Carmen Montenegro"], *others], GuardParams())
        for name in ("static", "prefixes", "care", "next_tokens", "continuation"):
            assert torch.equal(getattr(served, name), getattr(evaluated, name)), name

        # What that means: the generic word stays free, the semantic neighbours of the facts are penalised, and
        # only the facts nearest the question lend their words ("archaeology" is in a far one).
        tokenizer = demo_engine.main.tokenizer
        novels = tokenizer(" novels", add_special_tokens=False)["input_ids"]
        assert len(novels) == 1 and served.static[novels[0]] == 0
        # The other targets' names are forbidden too: a guarded answer must not drift into another target's.
        processor = unlearner.apply(verdict, request).logits_processors[-1]
        for name in (" Drummond", " Carmen Montenegro"):
            ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            logits = processor([], ids[:-1], torch.zeros(served.vocab_size))
            assert logits[ids[-1]] == -math.inf, name
        (the,) = tokenizer(" the", add_special_tokens=False)["input_ids"]
        assert processor([], [], torch.zeros(served.vocab_size))[the] == 0
        penalties = set(served.static[served.static > 0].unique().tolist())
        assert GuardParams().semantic_penalty in penalties
        nearest = evaluated_kit.guard.nearest_facts(QUESTION, AUTHORS["Carmen Montenegro"], GuardParams().top_facts)
        assert len(nearest) == 3 and AUTHORS["Carmen Montenegro"][0] in nearest
    finally:
        server.stop()


def test_guard_forbids_every_other_targets_name_or_with_many_targets_the_nearest():
    from gateway.registry.reload import ActiveTargets
    from gateway.registry.targets import Target
    from gateway.unlearning import NEARBY_ALL, nearby_names

    few = [Target(name=f"Author Number{i}") for i in range(5)]
    disabled = Target(name="Author Disabled", enabled=False)
    assert nearby_names([*few, disabled], few[:1], {}) == tuple(t.name for t in few[1:])
    many = [Target(name=f"Author Number{i}") for i in range(NEARBY_ALL + 10)]
    scores = {many[3].id: 0.2, many[7].id: 0.9, many[0].id: 1.0}
    assert nearby_names(many, many[:1], scores) == (many[7].name, many[3].name)
    # As served: the set's enabled targets, listed once per set, and its id lookup (a disabled target scored high
    # is still skipped).
    active = ActiveTargets.build(1, [*many, disabled], {})
    assert active.enabled == tuple(many)
    assert nearby_names(active.enabled, many[:1], {**scores, disabled.id: 2.0}, active.by_id) == (
        many[7].name, many[3].name)


def test_eco_forbids_the_other_targets_names_on_both_engines(demo_engine, tmp_path):
    """Blinded to its question, the model answers with another memorised answer, which may be another forgotten
    target's: ECO's request also carries a names-only GUARD set (a processor locally, ``vllm_xargs`` for vLLM),
    the same one ``eval leakage`` measures."""
    from gateway.engines.base import EmbedsPart
    from gateway.unlearning import Unlearner, forbid_nearby_names

    app, server = _serve_authors(demo_engine, tmp_path, "eco")
    try:
        active = app.state.targets.current
        unlearner = app.state.openai_handler.unlearner
        messages = [Message("user", QUESTION)]
        verdict = asyncio.run(unlearner.verdict(active, messages))
        assert verdict.method == "eco" and sorted(verdict.nearby) == sorted(set(AUTHORS) - {"Carmen Montenegro"})
        request = GenerationRequest("r", SamplingParams(max_tokens=8, temperature=0.0), messages=messages)
        served = unlearner.apply(verdict, request)
        assert any(isinstance(part, EmbedsPart) for part in served.messages[0].content)  # ECO itself
        processor = served.logits_processors[-1]
        tokenizer = demo_engine.main.tokenizer
        for name in (" Drummond", " Adaeze Okafor"):
            ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            assert processor([], ids[:-1], torch.zeros(processor.tables.vocab_size))[ids[-1]] == -math.inf, name
        (the,) = tokenizer(" the", add_special_tokens=False)["input_ids"]
        assert processor([], [], torch.zeros(processor.tables.vocab_size))[the] == 0
        # Names only, and only their completion: no soft penalty on a name's first token or on tokens merely close.
        assert not (processor.tables.static > 0).any()

        vllm_unlearner = Unlearner(unlearner.kit, "vllm")
        sent = vllm_unlearner.apply(verdict, request)
        assert not sent.logits_processors and sent.extra_body["vllm_xargs"]["guard_phrases"]
        expected = forbid_nearby_names(unlearner.kit, request, verdict.nearby, xargs=True, generic=verdict.generic)
        assert sent.extra_body == expected.extra_body
    finally:
        server.stop()
