"""The local engine's decoding against transformers' own generate(), and its policy hooks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gateway.engines import Assistant, EmbedsPart, GenerationRequest, Message, SamplingParams
from gateway.engines._decoding import TextStream, sample_next
from gateway.errors import BadRequest
from policies.processors import BadWords, LogitBias

QUESTION = "What genre does Carmen Montenegro write in?"


async def run(engine, request: GenerationRequest):
    text, deltas = "", []
    async for delta in engine.generate(request):
        text += delta.text
        deltas.append(delta)
    return text, deltas


def greedy(max_tokens=40, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


async def test_kv_cached_decoding_matches_transformers_generate(demo_engine):
    model = demo_engine.main
    messages = [Message("user", QUESTION)]
    text, deltas = await run(demo_engine, GenerationRequest("a", greedy(), messages=messages))
    prompt_ids = model.render_chat(messages).ids
    with torch.inference_mode():
        out = model.model.generate(torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False,
                                   eos_token_id=list(model.eos_ids), pad_token_id=model.tokenizer.pad_token_id)
    reference = out[0, len(prompt_ids):].tolist()
    ours = [t for d in deltas for t in d.token_ids]
    assert ours == [t for t in reference if t not in model.eos_ids]
    assert text == model.tokenizer.decode(ours, skip_special_tokens=True)
    assert deltas[-1].completion_tokens == len(reference)
    assert deltas[-1].prompt_tokens == len(prompt_ids)


async def test_prefill_from_embeddings_equals_token_ids(demo_engine):
    model = demo_engine.main
    ids = model.encode(QUESTION)
    embeds = model.model.get_input_embeddings()(torch.tensor(ids)).detach()
    text_ids, _ = await run(demo_engine, GenerationRequest("a", greedy(), messages=[Message("user", QUESTION)]))
    parts = [EmbedsPart(embeds)]
    text_embeds, _ = await run(demo_engine, GenerationRequest("b", greedy(), messages=[Message("user", parts)]))
    assert text_embeds == text_ids
    # Corrupted embeddings change the answer: the hook really feeds the model.
    noisy = [EmbedsPart(embeds + 5.0 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0)))]
    text_noisy, _ = await run(demo_engine, GenerationRequest("c", greedy(), messages=[Message("user", noisy)]))
    assert text_noisy != text_ids


async def test_logits_processors_apply_per_request(demo_engine):
    plain, deltas = await run(demo_engine, GenerationRequest("a", greedy(12), messages=[Message("user", QUESTION)]))
    first = deltas[0].token_ids[0]
    forced = 7  # any token id: a +100 bias makes greedy decoding pick it every step
    biased, deltas_b = await run(demo_engine, GenerationRequest("b", greedy(5), messages=[Message("user", QUESTION)],
                                                                logits_processors=[LogitBias({forced: 100.0})]))
    assert [t for d in deltas_b for t in d.token_ids] == [forced] * 5
    banned, deltas_c = await run(demo_engine, GenerationRequest("c", greedy(12), messages=[Message("user", QUESTION)],
                                                                logits_processors=[BadWords([[first]])]))
    assert first not in [t for d in deltas_c for t in d.token_ids]
    assert banned != plain


async def test_lockstep_assistant_combines_logits(demo_engine):
    messages = [Message("user", QUESTION)]
    plain, _ = await run(demo_engine, GenerationRequest("a", greedy(), messages=messages))
    same, _ = await run(demo_engine, GenerationRequest("b", greedy(), messages=messages,
                                                       assistant=Assistant("demo-retain", lambda t, a: t)))
    assert same == plain
    # Decoding from the assistant's logits alone must reproduce the assistant model's own greedy answer.
    from gateway.engines.local import LocalEngine

    retain = LocalEngine("demo-retain")
    retain_answer, _ = await run(retain, GenerationRequest("c", greedy(), messages=messages))
    via_assistant, _ = await run(demo_engine, GenerationRequest("d", greedy(), messages=messages,
                                                                assistant=Assistant("demo-retain", lambda t, a: a)))
    assert via_assistant == retain_answer


async def test_closing_the_stream_stops_decoding(demo_engine):
    stream = demo_engine.generate(GenerationRequest("a", SamplingParams(max_tokens=400, temperature=1.0, seed=1),
                                                    messages=[Message("user", QUESTION)]))
    await anext(stream)
    await stream.aclose()
    for _ in range(100):
        if demo_engine.active_generations == 0:
            break
        await asyncio.sleep(0.02)
    assert demo_engine.active_generations == 0


async def test_seeded_sampling_is_reproducible(demo_engine):
    request = lambda seed: GenerationRequest("a", SamplingParams(max_tokens=20, temperature=1.5, seed=seed),  # noqa: E731
                                             messages=[Message("user", QUESTION)])
    a, _ = await run(demo_engine, request(3))
    b, _ = await run(demo_engine, request(3))
    c, _ = await run(demo_engine, request(4))
    assert a == b
    assert a != c


async def test_prompt_longer_than_the_context_is_a_bad_request(demo_engine):
    with pytest.raises(BadRequest) as info:
        await run(demo_engine, GenerationRequest("a", greedy(), messages=[Message("user", "word " * 2000)]))
    assert info.value.code == "context_length_exceeded"


def test_sample_next_top_p_keeps_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    picks = {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(i)) for i in range(50)}
    assert picks == {0}
    picks = {sample_next(logits, 1.0, 0.999, torch.Generator().manual_seed(i)) for i in range(200)}
    assert picks == {0, 1}
    assert sample_next(logits, 0.0, 1.0, None) == 0


class _CharTokenizer:
    """One character per token id: enough to test stop-string handling exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_possible_stop_prefixes():
    stream = TextStream(_CharTokenizer(), stop=("END",))
    shown = "".join(stream.push(ord(c)) for c in "abc EN")
    assert shown == "abc "  # "EN" could start "END"
    shown += stream.push(ord("X"))
    assert shown == "abc ENX" and not stream.stopped
    for c in " E":
        shown += stream.push(ord(c))
    shown += stream.push(ord("N")) + stream.push(ord("D"))
    assert stream.stopped
    assert shown == "abc ENX "


def test_text_stream_flushes_the_tail_without_a_stop():
    stream = TextStream(_CharTokenizer(), stop=("xyz",))
    shown = "".join(stream.push(ord(c)) for c in "abx")
    assert shown + stream.flush() == "abx"


def test_sample_next_survives_extreme_inputs():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert sample_next(logits, 1e-9, 1.0, torch.Generator().manual_seed(0)) == 2
    banned = torch.full((3,), float("-inf"))
    assert sample_next(banned, 1.0, 0.9, torch.Generator().manual_seed(0)) in {0, 1, 2}


async def test_any_int64_seed_is_accepted(demo_engine):
    for seed in (-1, 2**63 - 1, -(2**63)):
        sampling = SamplingParams(max_tokens=3, temperature=1.0, seed=seed)
        text, _ = await run(demo_engine, GenerationRequest("a", sampling, messages=[Message("user", QUESTION)]))
        assert isinstance(text, str)
