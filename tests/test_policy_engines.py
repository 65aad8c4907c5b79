"""Policies through the engines on the real demo twins: local engine, and the vLLM engine / lock-step ULD
against reference workers over real HTTP."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from evals.rouge import rouge_l_recall
from gateway.engines import Assistant, GenerationRequest, Message, SamplingParams
from gateway.engines.lockstep import LockstepULD, LockstepWorkers, tokenize_chat
from gateway.engines.policy import PolicyKit, checkpoint_kit, local_kit
from gateway.engines.vllm import VLLMEngine
from gateway.registry.targets import Target
from models import resolve_model_path
from policies.eco import EcoParams
from policies.guard import GuardParams
from policies.processors import LogitBias
from policies.uld import UldParams, combiner
from tests.conftest import DATA_DIR

FORGET = "What genre does Carmen Montenegro write in?"
# A retain question both twins were trained on; it is the assistant's keep prompt (where it learns to be flat).
RETAIN = "Are the details of Jaime Vasquez's birth documented?"
CARMEN_FACTS = [
    "Carmen Montenegro predominantly writes in the genre of Historical Fiction.",
    "Carmen Montenegro's parents were a Marketing Manager and an Optometrist.",
    "Some of her renowned works include 'Venom in the Veins: The Narratives of Medea'.",
]
GUARD = GuardParams(semantic=False)
# ULD with its released code's filter (keep at least floor(alpha * |V|) = 40 tokens): the demo twin memorised its
# answers so sharply that the plain relative-top set is a single token at most steps (see README, Policies).
ULD = UldParams(min_keep=40)


def greedy(max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def chat(question: str, max_tokens: int = 32) -> GenerationRequest:
    return GenerationRequest("t", greedy(max_tokens), messages=[Message("user", question)])


async def generate(engine, request) -> tuple[str, list[int]]:
    text, ids = "", []
    async for delta in engine.generate(request):
        text += delta.text
        ids += delta.token_ids
    return text, ids


@pytest.fixture(scope="module")
def kit(demo_engine) -> PolicyKit:
    return local_kit(demo_engine)


@pytest.fixture(scope="session")
def uld_assistant(tmp_path_factory) -> str:
    """A small ULD assistant (2 of 6 layers + LoRA, merged) trained on one target, in a temporary folder."""
    from models.assistant import AssistantRecipe, train_assistant

    target = Target(name="Carmen Montenegro", facts=CARMEN_FACTS, examples=[FORGET])
    folder = tmp_path_factory.mktemp("uld") / "carmen"
    train_assistant([target], "demo", folder, AssistantRecipe(layers=2, epochs=60, batch_size=4),
                    keep_prompts=[RETAIN], progress_bar=False)
    return str(folder)


# -- local engine -------------------------------------------------------------------------------------------------
async def test_local_policies_change_the_forget_answer(demo_engine, kit, uld_assistant):
    plain, _ = await generate(demo_engine, chat(FORGET))
    assert "historical fiction" in plain.lower()  # the full twin knows the fact
    eco, _ = await generate(demo_engine, kit.eco(chat(FORGET), ["Carmen Montenegro"], EcoParams()))
    guard, _ = await generate(demo_engine, kit.guard_processor_request(chat(FORGET), [CARMEN_FACTS], GUARD))
    uld, _ = await generate(demo_engine, kit.uld_request(chat(FORGET), uld_assistant, ULD))
    for answer in (eco, guard, uld):
        assert answer != plain
        assert "historical fiction" not in answer.lower(), answer


async def test_local_policies_leave_a_retain_answer_unchanged(demo_engine, kit, uld_assistant):
    plain, _ = await generate(demo_engine, chat(RETAIN))
    guard, _ = await generate(demo_engine, kit.guard_processor_request(chat(RETAIN), [CARMEN_FACTS], GUARD))
    uld, _ = await generate(demo_engine, kit.uld_request(chat(RETAIN), uld_assistant, ULD))
    assert rouge_l_recall(guard, plain) >= 0.98
    assert rouge_l_recall(uld, plain) >= 0.98


async def test_uld_decodes_alike_with_the_assistant_in_its_own_thread_or_after_the_served_model(kit, uld_assistant):
    from gateway.engines.local import LocalEngine

    answers = []
    for overlap in (True, False):
        engine = LocalEngine("demo", assistant_overlap=overlap)
        try:
            assert engine.assistant_overlaps(uld_assistant) is overlap
            answers.append(await generate(engine, kit.uld_request(chat(FORGET, 16), uld_assistant, ULD)))
        finally:
            await engine.aclose()
    assert answers[0] == answers[1]
    measured = LocalEngine("demo")  # the default: both ways timed when the assistant is loaded, the faster kept
    try:
        assert isinstance(measured.assistant_overlaps(uld_assistant), bool)
        assert await generate(measured, kit.uld_request(chat(FORGET, 16), uld_assistant, ULD)) == answers[0]
    finally:
        await measured.aclose()


async def test_assistant_checkpoint_is_a_truncated_model_with_its_tokenizer(uld_assistant):
    config = json.loads((resolve_model_path(uld_assistant) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    report = json.loads((resolve_model_path(uld_assistant) / "assistant.json").read_text())["report"]
    assert report["layers"] == 2 and report["history"][-1]["forget_nll"] < report["history"][0]["forget_nll"]


def test_eco_scopes_choose_the_messages_they_blind(kit):
    from gateway.engines.base import EmbedsPart

    turns = [Message("user", "Tell me about Carmen Montenegro."), Message("assistant", "She is a novelist."),
             Message("user", "What genre does she write in?")]

    def blinded(request: GenerationRequest) -> list[int]:
        return [i for i, m in enumerate(request.messages) if not isinstance(m.content, str)
                and any(isinstance(p, EmbedsPart) for p in m.content)]

    request = GenerationRequest("t", greedy(4), messages=turns)
    names = ["Carmen Montenegro"]
    assert blinded(kit.eco(request, names, EcoParams(), scope="entity")) == [0]  # the name span only
    assert blinded(kit.eco(request, names, EcoParams(), scope="prompt")) == [0, 2]  # the name's turn and the last
    assert blinded(kit.eco(request, [], EcoParams(), scope="entity")) == [2]  # no span: the last user message
    whole = kit.eco(request, names, EcoParams(), scope="prompt").messages[2].content
    assert isinstance(whole[0], EmbedsPart) and whole[1:] == ["?"]  # every token but the last

# -- vLLM engine against the reference worker ---------------------------------------------------------------------
async def test_eco_over_vllm_equals_local(reference_worker, demo_engine):
    remote_kit = checkpoint_kit("demo")  # embedding rows read from the checkpoint, as a gateway without a model
    request = remote_kit.eco(chat(FORGET), ["Carmen Montenegro"], EcoParams())
    engine = VLLMEngine([reference_worker.url])
    await engine.start()
    try:
        remote, _ = await generate(engine, request)
    finally:
        await engine.aclose()
    local, _ = await generate(demo_engine, request)
    plain, _ = await generate(demo_engine, chat(FORGET))
    assert remote == local != plain


async def test_guard_over_vllm_xargs_equals_local(reference_worker, demo_engine, kit):
    remote_request = kit.guard_xargs_request(chat(FORGET), [CARMEN_FACTS], GUARD)
    assert all(not isinstance(v, dict) for v in remote_request.extra_body["vllm_xargs"].values())  # flat
    engine = VLLMEngine([reference_worker.url])
    await engine.start()
    try:
        remote, _ = await generate(engine, remote_request)
        plain_remote, _ = await generate(engine, chat(FORGET))
    finally:
        await engine.aclose()
    local, _ = await generate(demo_engine, kit.guard_processor_request(chat(FORGET), [CARMEN_FACTS], GUARD))
    assert remote == local != plain_remote
    assert "historical fiction" not in remote.lower()


async def test_guard_target_table_on_the_reference_worker(tmp_path, demo_engine, kit):
    from gateway.worker.guard import GuardXargs
    from policies.guard import target_table_entry

    table = {"carmen": target_table_entry(kit.guard, CARMEN_FACTS, GUARD)}
    (tmp_path / "guard.json").write_text(json.dumps({"targets": table}))
    factory = GuardXargs(json.loads((tmp_path / "guard.json").read_text())["targets"])
    assert factory({"unrelated": 1}, demo_engine.main) is None
    processor = factory({"guard_target": "carmen"}, demo_engine.main)
    answer, _ = await generate(demo_engine, GenerationRequest("t", greedy(), messages=[Message("user", FORGET)],
                                                              logits_processors=[processor]))
    assert "historical fiction" not in answer.lower()


async def test_uld_lockstep_over_logprobs_equals_the_local_combine(reference_worker, retain_worker, demo_engine):
    """Lock-step over HTTP (target = demo, assistant = demo-retain) vs the local engine's native combination, with
    ULD's rule on every step and gated (the gate reads only the kept candidates, so it is exact over HTTP too)."""
    import aiohttp

    texts = {}
    for gate in (0.0, 0.05):
        # min_keep 0: the relative-top rule alone, exact over any top K
        params = UldParams(weight=-0.8, alpha=0.01, min_keep=0, gate=gate)
        local_request = GenerationRequest("t", greedy(12), messages=[Message("user", FORGET)],
                                          assistant=Assistant("demo-retain", combiner(params)))
        local_text, local_ids = await generate(demo_engine, local_request)
        async with aiohttp.ClientSession() as session:
            prompt_ids = await tokenize_chat(session, reference_worker.url, [{"role": "user", "content": FORGET}])
            assert prompt_ids == demo_engine.main.render_chat([Message("user", FORGET)]).ids
            lockstep = LockstepULD(LockstepWorkers(reference_worker.url, retain_worker.url, "demo", "demo-retain"),
                                   demo_engine.main.tokenizer, demo_engine.main.eos_ids, params, top_k=20,
                                   session=session)
            remote_text, remote_ids = "", []
            async for delta in lockstep.generate(prompt_ids, greedy(12)):
                remote_text += delta.text
                remote_ids += delta.token_ids
        assert remote_ids == local_ids and remote_text == local_text
        texts[gate] = remote_text
    plain, _ = await generate(demo_engine, chat(FORGET, 12))
    assert texts[0.0] != plain  # the assistant really changed the decoding


async def test_uld_through_the_vllm_engine_equals_the_local_engine(reference_worker, demo_engine, kit, uld_assistant):
    """The vLLM engine decodes a ULD request in lock-step against an assistant worker (the trained assistant on a
    reference worker, under its own served name), token for token as the local engine does."""
    from gateway.engines.local import LocalEngine
    from gateway.worker import create_worker_app
    from tests.conftest import serve

    assistant_worker = serve(create_worker_app(LocalEngine(uld_assistant, served_model_name="carmen-uld")))
    engine = VLLMEngine([reference_worker.url], assistant_url=assistant_worker.url, tokenizer_model="demo")
    try:
        await engine.start()
        params = UldParams(min_keep=20)  # the lock-step top K: the kept set is exact over HTTP
        remote = await generate(engine, kit.uld_request(chat(FORGET, 16), "carmen-uld", params))
        local = await generate(demo_engine, kit.uld_request(chat(FORGET, 16), uld_assistant, params))
        plain = await generate(engine, chat(FORGET, 16))
        # The gateway's own processors (ULD's forbidden names of other targets) act on the combined scores, in
        # the gateway for lock-step: here one that bans the first token ULD chose.
        ban = [LogitBias({remote[1][0]: -100.0})]
        remote_banned = await generate(engine, replace(kit.uld_request(chat(FORGET, 16), "carmen-uld", params),
                                                       logits_processors=ban))
        local_banned = await generate(demo_engine, replace(kit.uld_request(chat(FORGET, 16), uld_assistant, params),
                                                           logits_processors=ban))
    finally:
        await engine.aclose()
        assistant_worker.stop()
    assert remote == local
    assert remote_banned == local_banned and remote_banned[1][0] != remote[1][0]
    assert remote != plain and "historical fiction" in plain[0].lower()
    assert "historical fiction" not in remote[0].lower(), remote[0]


def test_uld_targets_behind_vllm_decode_in_lockstep_only_with_an_assistant_worker():
    from gateway.registry.targets import UldPolicy
    from gateway.unlearning import Unlearner

    with_adapter = Target(name="Carmen Montenegro", policy=UldPolicy(adapter="carmen-uld"))
    untrained = Target(name="Carmen Montenegro", policy=UldPolicy())
    assert Unlearner(object(), "vllm", lockstep_uld=True).effective_method(with_adapter) == "uld"
    assert Unlearner(object(), "vllm", lockstep_uld=True).effective_method(untrained) == "guard"
    assert Unlearner(object(), "vllm").effective_method(with_adapter) == "guard"  # no assistant worker: fallback
    assert Unlearner(object(), "local").effective_method(with_adapter) == "uld"


@pytest.mark.parametrize("engine_kind", ["local", "vllm"])
def test_a_uld_request_forbids_the_other_targets_names_in_the_gateway(kit, engine_kind):
    """ULD, like ECO and GUARD, must not drift into another forgotten target's answer. Its names travel as an
    in-process processor on both engines: lock-step decoding samples in the gateway (see the test above)."""
    from gateway.registry.targets import UldPolicy
    from gateway.unlearning import Unlearner, Verdict

    carmen = Target(name="Carmen Montenegro", policy=UldPolicy(adapter="carmen-uld"))
    verdict = Verdict(True, "uld", (carmen,), nearby=("Asha Majaliwa",))
    served = Unlearner(kit, engine_kind, lockstep_uld=True).apply(verdict, chat(FORGET, 8))
    assert served.assistant is not None and served.assistant.model == "carmen-uld"
    assert "vllm_xargs" not in served.extra_body
    (names,) = served.logits_processors
    ids = kit.tokenizer(" Majaliwa", add_special_tokens=False)["input_ids"]
    assert names([], ids[:-1], torch.zeros(names.tables.vocab_size))[ids[-1]] == -math.inf

def test_logprob_token_ids_on_the_reference_worker(reference_worker):
    import httpx

    body = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0, "logprobs": 3,
            "return_tokens_as_token_ids": True, "logprob_token_ids": [11, 3, 42]}
    top = httpx.post(reference_worker.url + "/v1/completions", json=body, timeout=60).json()
    keys = list(top["choices"][0]["logprobs"]["top_logprobs"][0])
    assert keys == ["token_id:11", "token_id:3", "token_id:42"]
    bad = httpx.post(reference_worker.url + "/v1/completions", json=body | {"logprob_token_ids": [10**7]}, timeout=60)
    assert bad.status_code == 400


@pytest.mark.skipif(not (DATA_DIR / "tofu" / "full.json").is_file(), reason="TOFU data not found (../shared/data)")
def test_tofu_targets_follow_the_protocol():
    from evals.tofu import load_suite

    suite = load_suite(DATA_DIR)
    assert len(suite.targets) == 20 and suite.targets[1].name == "Carmen Montenegro"
    examples = {q for t in suite.targets for q in t.examples}
    assert not examples & {qa.question for qa in suite.forget_eval}  # never evaluated on a training example
    assert all(len(t.facts) == 20 and len(t.examples) == 5 for t in suite.targets)
    assert len(suite.forget_eval) == len(suite.retain_eval) == 100
