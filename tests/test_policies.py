"""The policies' pure functions on real tensors (and the demo model's real tokenizer)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gateway.engines.base import EmbedsPart
from policies.eco import EcoParams, corrupt_positions, corrupt_rows, corrupted_content, name_spans, positions_for_spans
from policies.guard import (
    HISTORY_PAD,
    GuardBuilder,
    GuardParams,
    GuardProcessor,
    apply_guard,
    compile_tables,
    extract_forbidden,
    fact_ngrams,
    generic_words,
    history_window,
    naive_guard,
    tables_from_xargs,
    target_table_entry,
    validate_xargs,
    xargs_for,
)
from policies.output_guard import OutputGuard, StreamGuard
from policies.refuse import refusal
from policies.uld import combine, combine_top_logprobs, relative_top_mask, scores_tensor

FACT = "Carmen Montenegro predominantly writes in the genre of Historical Fiction."
QUESTION = "What genre does Carmen Montenegro write in?"


@pytest.fixture(scope="module")
def tokenizer(demo_engine):
    return demo_engine.main.tokenizer


# -- ECO ----------------------------------------------------------------------------------------------------------
def test_eco_corrupts_exactly_the_given_positions_and_is_seeded():
    embeds = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    params = EcoParams("gaussian", sigma=1.0, seed=7)
    out = corrupt_positions(embeds, [2, 3, 7], params)
    changed = (out != embeds).any(dim=1).nonzero()[:, 0].tolist()
    assert changed == [2, 3, 7]
    assert torch.equal(out, corrupt_positions(embeds, [7, 3, 2], params))  # deterministic, order-free
    assert not torch.equal(out, corrupt_positions(embeds, [2, 3, 7], EcoParams("gaussian", sigma=1.0, seed=8)))
    first_k = corrupt_positions(embeds, [0], EcoParams("gaussian", sigma=1.0, dims=4, seed=0))
    assert (first_k[0, :4] != embeds[0, :4]).all() and torch.equal(first_k[0, 4:], embeds[0, 4:])


def test_eco_zero_and_flip_hit_the_top_k_dims():
    row = torch.tensor([[0.1, -5.0, 0.3, 4.0, -0.2]])
    zeroed = corrupt_rows(row, EcoParams("zero", dims=2))
    assert torch.equal(zeroed, torch.tensor([[0.1, 0.0, 0.3, 0.0, -0.2]]))
    flipped = corrupt_rows(row, EcoParams("flip", dims=2))
    assert torch.equal(flipped, torch.tensor([[0.1, 5.0, 0.3, -4.0, -0.2]]))
    assert torch.equal(corrupt_rows(row, EcoParams("flip")), -row)  # all dims: e -> -e


def test_spans_map_to_token_positions_by_offsets(tokenizer):
    spans = name_spans(QUESTION, ["carmen montenegro"])
    assert [QUESTION[s:e] for s, e in spans] == ["Carmen Montenegro"]
    encoded = tokenizer(QUESTION, add_special_tokens=False, return_offsets_mapping=True)
    positions = positions_for_spans(encoded["offset_mapping"], spans)
    covered = tokenizer.decode([encoded["input_ids"][p] for p in positions])
    assert covered.strip() == "Carmen Montenegro"


def test_corrupted_content_splits_at_token_boundaries(tokenizer, demo_engine):
    weight = demo_engine.main.model.get_input_embeddings().weight.detach()

    def embed(ids):
        return weight[torch.tensor(list(ids))]

    parts = corrupted_content(QUESTION, name_spans(QUESTION, ["Carmen Montenegro"]), tokenizer, embed, EcoParams())
    assert [type(p) for p in parts] == [str, EmbedsPart, str]
    before, run, after = parts
    name_ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"][len(tokenizer(before)["input_ids"]):]
    assert run.embeds.shape == (len(tokenizer(QUESTION[len(before):len(QUESTION) - len(after)])["input_ids"]),
                                weight.shape[1])
    clean = embed(name_ids[: run.embeds.shape[0]])
    assert (run.embeds != clean).any(dim=1).all()  # every row of the run is corrupted
    # No span: every token but the last (ECO's fallback).
    fallback = corrupted_content(QUESTION, [], tokenizer, embed, EcoParams())
    assert isinstance(fallback[0], EmbedsPart) and isinstance(fallback[-1], str)


# -- GUARD --------------------------------------------------------------------------------------------------------
def test_guard_blocks_a_phrase_continuation_and_softly_its_first_token():
    tables = compile_tables(10, tokens=[7], phrases=[[1, 2, 3]], token_penalty=math.inf, first_token_penalty=2.0)
    logits = torch.zeros(1, 10)
    fresh = apply_guard(logits.clone(), torch.tensor([history_window([5], tables.window)]), tables)[0]
    assert fresh[1] == -2.0 and fresh[7] == -math.inf and fresh[2] == 0 and fresh[3] == 0
    after_1 = apply_guard(logits.clone(), torch.tensor([history_window([5, 1], tables.window)]), tables)[0]
    assert after_1[2] == -math.inf and after_1[3] == 0
    after_12 = apply_guard(logits.clone(), torch.tensor([history_window([1, 2], tables.window)]), tables)[0]
    assert after_12[3] == -math.inf and after_12[2] == 0


@pytest.mark.parametrize("gather", [True, False])  # the CPU's candidate gather and the accelerators' dense match
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_vectorised_guard_equals_the_naive_reference(mode, gather):
    rng = random.Random(0)
    vocab = 50
    for trial in range(25):
        tokens = rng.sample(range(vocab), rng.randint(0, 8))
        phrases = [[rng.randrange(vocab) for _ in range(rng.randint(2, 5))] for _ in range(rng.randint(0, 12))]
        ngrams = []
        for _ in range(rng.randint(0, 12)):
            ids = tuple(rng.randrange(vocab) for _ in range(rng.randint(2, 7)))
            hard = rng.randint(1, len(ids) - 1)
            ngrams.append((ids, rng.randint(1, hard), hard))
        token_pen = math.inf if mode == "hard" else 4.0
        cont_pen = math.inf if mode == "hard" else 6.0
        tables = compile_tables(vocab, tokens, phrases, token_pen, 1.5, cont_pen, ngrams=ngrams, ngram_penalty=2.5)
        rows, histories = [], []
        for _ in range(4):
            history = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            spans = phrases + [ids for ids, _, _ in ngrams]
            if spans and rng.random() < 0.6:  # end the history inside a phrase or n-gram, so prefixes really match
                phrase = rng.choice(spans)
                history += phrase[: rng.randint(1, len(phrase) - 1)]
            histories.append(history)
            rows.append(history_window(history, tables.window))
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(trial))
        fast = apply_guard(logits.clone(), torch.tensor(rows), tables, gather=gather)
        for r, history in enumerate(histories):
            slow = naive_guard(logits[r], history, tokens, phrases, token_pen, 1.5, cont_pen, ngrams, 2.5)
            assert torch.equal(fast[r], slow), (trial, r)


def test_forbidden_words_skip_the_prompts_ordinary_words_and_generic_words_but_never_its_entities():
    forbidden = extract_forbidden([FACT], QUESTION)
    assert "Historical" in forbidden.words and "predominantly" in forbidden.words
    assert not {"genre", "write", "the", "in"} & set(forbidden.words)  # the user's ordinary words may be echoed
    # The name is the key the memorised facts hang on: forbidden although the prompt says it.
    assert {"Carmen", "Montenegro"} <= set(forbidden.words)
    assert {"Historical Fiction", "Carmen Montenegro"} <= set(forbidden.phrases)
    # A capitalised word inside a sentence is an entity; one that opens a sentence is not.
    said = "Where does the author of the book live? Readers ask about Santiago."
    facts = ["Readers love her. She lives in Santiago."]
    assert set(extract_forbidden(facts, said).words) == {"love", "lives", "Santiago"}
    assert "Carmen Montenegro" not in extract_forbidden([FACT], QUESTION, frozenset({"carmen", "montenegro"})).phrases
    # The parts of a hyphenated name are forbidden on their own too, even when the prompt says the name.
    hyphenated = extract_forbidden(["Hsiao Yun-Hwa studied civil engineering."], "Who is Hsiao Yun-Hwa?")
    assert {"Yun-Hwa", "Yun", "Hwa"} <= set(hyphenated.words)
    groups = [[f"{name} writes in the genre of mystery."] for name in "abcdefgh"] + [[FACT]]
    assert "writes" in generic_words(groups) and "historical" not in generic_words(groups)


def test_guard_builder_variants_cover_case_and_leading_space(tokenizer):
    builder = GuardBuilder(tokenizer)
    tables = builder.tables(QUESTION, [[FACT]], GuardParams(semantic=False))
    logits = torch.zeros(1, len(tokenizer))
    out = apply_guard(logits, torch.full((1, tables.window), HISTORY_PAD), tables)[0]
    for variant in (" Historical", "Historical", " historical"):
        ids = builder.encode(variant)
        assert out[ids[0]] < 0, variant  # single token: forbidden; multi-token: first token penalised
    assert out[builder.encode(" genre")[0]] == 0  # the user's ordinary words stay free
    assert out[builder.encode(" Carmen")[0]] == -math.inf  # the target's name does not, though the user said it


def test_guard_without_its_semantic_table_still_bans_the_facts(tokenizer, caplog):
    """A vocabulary table that cannot be made costs GUARD its soft semantic penalties, logged once; the request
    is still served with every hard ban (a failure here must not turn flagged requests into server errors)."""
    import torch

    attempts = []

    def broken_table():
        attempts.append(1)
        raise MemoryError("no room for the table")

    def encode(texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1)

    with_table = GuardBuilder(tokenizer, encode)
    broken = GuardBuilder(tokenizer, encode, vocabulary=broken_table)
    params = GuardParams(ngram=0)
    for _ in range(2):
        tables = broken.tables(QUESTION, [[FACT]], params)
    expected = with_table.tables(QUESTION, [[FACT]], GuardParams(ngram=0, semantic=False))
    assert torch.equal(tables.static, expected.static) and torch.isinf(tables.static).any()
    assert len(attempts) == 1 and "semantic-neighbour table could not be made" in caplog.text


def test_fact_ngrams_keep_the_verbatim_run_and_its_bare_words():
    grams = fact_ngrams(["Montenegro's work, which won."], 3)
    assert ("Montenegro's", "Montenegro's work,", "Montenegro's work, which") in grams
    assert ("Montenegro's", "Montenegro's work", "Montenegro's work which") in grams
    assert ("work", "work, which", "work, which won") in grams
    assert fact_ngrams(["Two words."], 3) == set() and fact_ngrams(["a b c"], 1) == set()


def _guarded(tables, history, logits=None):
    logits = torch.zeros(tables.vocab_size) if logits is None else logits
    return apply_guard(logits[None], torch.tensor([history_window(history, tables.window)]), tables)[0]


def test_a_facts_three_word_run_cannot_be_generated_while_other_text_is_untouched(tokenizer):
    builder = GuardBuilder(tokenizer)
    tables = builder.tables(QUESTION, [[FACT]], GuardParams(semantic=False))
    assert tables.n_ngrams > 0
    # Every spelling of "in the genre" (the fact's run; its words are ordinary, the user's own even): its first
    # word is free, its second softly penalised after the first, its third blocked after the first two.
    for run in ("in the genre", "In the genre"):
        for space in ("", " "):
            first, second, third = (builder.encode(space + run.split()[0]), builder.encode(space + run)[1:2],
                                    builder.encode(space + run)[2:])
            lead = first + second
            assert _guarded(tables, [])[first[0]] == 0
            assert _guarded(tables, first)[second[0]] == -GuardParams().ngram_penalty
            assert _guarded(tables, lead)[third[0]] == -math.inf, space + run
    # Greedy decoding that wants to recite the fact word for word cannot write any three-word run of it.
    fact_ids = builder.encode(" " + FACT)
    history: list[int] = []
    for _ in range(len(fact_ids)):
        logits = torch.zeros(len(tokenizer))
        logits[fact_ids[len(history)] if len(history) < len(fact_ids) else 0] = 20.0  # the memorised next token
        logits[builder.encode(" something")[0]] = 10.0  # the model's second choice
        history.append(int(_guarded(tables, history, logits).argmax()))
    written = tokenizer.decode(history).lower().split()
    said = FACT.lower().rstrip(".").split()
    runs = {tuple(said[i:i + 3]) for i in range(len(said) - 2)}
    assert not runs & {tuple(written[i:i + 3]) for i in range(len(written) - 2)}, written
    # Text that shares no two-word run with the facts: each of its tokens scores exactly as with n-grams off.
    off = builder.tables(QUESTION, [[FACT]], GuardParams(semantic=False, ngram=0))
    assert off.n_ngrams == 0
    other = builder.encode(" The weather in Paris was mild, and the trains ran on time.")
    for k, token in enumerate(other):
        assert _guarded(tables, other[:k])[token] == _guarded(off, other[:k])[token], tokenizer.decode(other[:k + 1])


def test_guard_ngram_setting_comes_from_the_registry_policy():
    from pydantic import ValidationError

    from gateway.registry.targets import GuardPolicy

    assert GuardParams.from_policy(GuardPolicy()).ngram == 3
    assert GuardParams.from_policy(GuardPolicy(ngram=0, ngram_facts="nearest")).ngram_facts == "nearest"
    with pytest.raises(ValidationError):
        GuardPolicy(ngram=1)  # single words are the forbidden tokens' job


def test_guard_xargs_round_trip_and_validation():
    params = GuardParams(mode="soft", penalty=3.0)
    xargs = xargs_for({4, 9}, {(1, 2, 3)}, params)
    assert all(isinstance(v, (str, int, float)) or all(isinstance(x, str) for x in v) for v in xargs.values())
    tables = tables_from_xargs(xargs, 12)
    direct = compile_tables(12, [4, 9], [[1, 2, 3]], 3.0, params.first_token_penalty, 3.0)
    assert torch.equal(tables.static, direct.static) and torch.equal(tables.prefixes, direct.prefixes)
    assert tables_from_xargs({"other": 1}, 12) is None
    with pytest.raises(ValueError):
        validate_xargs({"guard_mode": "loud"})
    with pytest.raises(ValueError):
        validate_xargs({"guard_bogus": 1})
    with pytest.raises(ValueError):
        validate_xargs({"guard_target": "nobody"}, {"somebody": {}})
    table = {"t": {"tokens": [5], "phrases": [[6, 7]], "mode": "hard"}}
    resolved = tables_from_xargs({"guard_target": "t"}, 12, table)
    assert resolved.static[5] == math.inf and resolved.n_phrases == 1
    # Fact n-grams travel as "first word|inner words|last word" and compile to the same rows.
    ngrams = {((1, 2, 3, 4), 1, 3), ((5, 6), 1, 1)}
    xargs = xargs_for(set(), set(), GuardParams(ngram_penalty=2.0), ngrams)
    assert xargs["guard_ngrams"] == ["1|2,3|4", "5||6"]
    tables = tables_from_xargs(xargs, 12)
    direct = compile_tables(12, ngrams=ngrams, ngram_penalty=2.0)
    assert torch.equal(tables.prefixes, direct.prefixes) and torch.equal(tables.continuation, direct.continuation)
    with pytest.raises(ValueError):
        validate_xargs({"guard_ngrams": ["1,2|3"]})


def test_guard_target_table_entry_carries_the_fact_ngrams(tokenizer):
    builder = GuardBuilder(tokenizer)
    entry = target_table_entry(builder, [FACT], GuardParams())
    tables = tables_from_xargs({"guard_target": "carmen"}, len(tokenizer), {"carmen": entry})
    lead = builder.encode(" in the")
    assert tables.n_ngrams == len(entry["ngrams"]) > 0
    assert _guarded(tables, lead)[builder.encode(" in the genre")[2]] == -math.inf


def test_guard_processor_uses_output_history_only():
    tables = compile_tables(10, phrases=[[1, 2]])
    processor = GuardProcessor(tables)
    assert processor([1], [], torch.zeros(10))[2] == 0  # the phrase "began" in the prompt: not blocked
    assert processor([1], [1], torch.zeros(10))[2] == -math.inf
    assert GuardProcessor(tables, include_prompt=True)([1], [], torch.zeros(10))[2] == -math.inf


# -- ULD ----------------------------------------------------------------------------------------------------------
def test_uld_combine_matches_the_formula_and_the_filter():
    z_t = torch.tensor([5.0, 4.0, 1.0, -3.0])
    z_a = torch.tensor([2.0, -1.0, 7.0, 0.5])
    keep = relative_top_mask(z_t, 0.1)
    p = torch.softmax(z_t, dim=0)
    assert keep.tolist() == (p >= 0.1 * p.max()).tolist() == [True, True, False, False]
    out = combine(z_t, z_a, weight=-0.8, alpha=0.1)
    assert torch.allclose(out[:2], z_t[:2] - 0.8 * z_a[:2])
    assert torch.isinf(out[2:]).all() and (out[2:] < 0).all()
    scoring = combine(z_t, z_a, weight=-0.8, alpha=0.1, exclude_outside=False)
    assert torch.equal(scoring[2:], z_t[2:])  # the assistant is ignored outside the set


def test_uld_gate_leaves_steps_the_assistant_does_not_recognise_alone():
    z_t = torch.tensor([[5.0, 4.0, 1.0, -3.0], [5.0, 4.0, 1.0, -3.0]])
    z_a = torch.tensor([[6.0, 0.0, 0.0, 0.0],  # recognises the target's top candidate (p ~0.98)
                        [0.0, 0.0, 9.0, 0.0]])  # sure only of a token the target's filter drops: not a fact here
    out = combine(z_t, z_a, weight=-1.5, alpha=0.1, gate=0.5)
    assert torch.allclose(out[0, :2], z_t[0, :2] - 1.5 * z_a[0, :2]) and torch.isinf(out[0, 2:]).all()
    assert torch.equal(out[1], z_t[1])  # unrecognised: the target's own logits, unfiltered
    assert torch.equal(combine(z_t, z_a, weight=-1.5, alpha=0.1, gate=0.0)[1, :2], z_t[1, :2])  # z_a = 0 there
    assert int(out[0].argmax()) == 1 and int(out[1].argmax()) == 0


def test_uld_over_top_logprobs_equals_the_full_combine():
    generator = torch.Generator().manual_seed(3)
    recognised = {0.0: 0, 0.3: 0}
    for gate in (0.0, 0.3):
        for _ in range(20):
            z_t, z_a = torch.randn(64, generator=generator) * 3, torch.randn(64, generator=generator) * 3
            full = combine(z_t, z_a, -0.8, 0.05, gate=gate)
            lp_t, lp_a = torch.log_softmax(z_t, 0), torch.log_softmax(z_a, 0)
            top = dict(zip(*[x.tolist() for x in reversed(lp_t.topk(20))]))
            sparse = combine_top_logprobs(top, {i: float(lp_a[i]) for i in top}, -0.8, 0.05, gate=gate)
            dense = scores_tensor(sparse, 64)
            ids = torch.tensor(list(top))
            assert int(dense.argmax()) == int(full.argmax())
            # Over the top K the two agree up to a constant (ungated rows keep the target's whole distribution
            # locally, only its top K over HTTP).
            assert torch.allclose(torch.softmax(dense[ids], 0), torch.softmax(full[ids], 0), atol=1e-5)
            recognised[gate] += bool(torch.isinf(full).any())
    assert recognised[0.0] == 20 and 0 < recognised[0.3] < 20  # the gate acted on some steps, not all


# -- REFUSE and the output guard ----------------------------------------------------------------------------------
def test_refusal_template():
    assert refusal(["Carmen Montenegro"]) == "I'm sorry, but I don't have any information about Carmen Montenegro."
    assert refusal(["A", "B"], "No: {names}. {other}") == "No: A or B. {other}"


def test_output_guard_catches_the_fact_not_the_echo():
    guard = OutputGuard({"carmen-montenegro": [FACT]}, prompt=QUESTION)
    hit = guard.check("She is best known for historical fiction, which she writes predominantly.")
    assert hit is not None and hit.target_id == "carmen-montenegro"
    assert guard.check("Carmen Montenegro writes in the genre of romance.") is None
    streamed = StreamGuard(guard, "window", every_tokens=3)
    words = ["Her", "books", "are", "predominantly", "Historical", "Fiction", "novels"]
    out = "".join(streamed.push(w + " ") for w in words)
    assert streamed.hit is not None and "Fiction novels" not in out
    held = StreamGuard(guard, "hold")
    assert held.push("Carmen Montenegro writes romance.") == "" and held.finish() == "Carmen Montenegro writes romance."


def test_uld_default_filter_keeps_uld_codes_floor_of_alpha_times_vocab():
    from gateway.registry.targets import UldPolicy
    from policies.uld import UldParams, lockstep_threshold, uld_params

    peaked = torch.full((1000,), -20.0)
    peaked[7] = 20.0  # a memorised token: the relative-top rule alone keeps only it
    assert int(relative_top_mask(peaked, 0.01, 0).sum()) == 1
    assert int(relative_top_mask(peaked, 0.01, None).sum()) >= 10  # floor(0.01 * 1000)
    assert UldParams.from_policy(UldPolicy()).min_keep is None
    assert UldParams.from_policy(UldPolicy()) == UldParams()  # the registry's defaults are what is served
    assert uld_params(UldPolicy(), 4096).min_keep == 40 and uld_params(UldPolicy(min_keep=0), 4096).min_keep == 0
    # Over HTTP only the top K is known: the floor keeps all K reported candidates.
    top = {1: -0.001, 2: -9.0, 3: -12.0}
    assert lockstep_threshold(top, 0.01, None) == -12.0 and lockstep_threshold(top, 0.01, 0) > -9.0
    # With the floor, a memorising assistant can overturn the target's choice; the plain rule cannot.
    assistant = torch.zeros(1000)
    assistant[7] = 60.0
    assert int(combine(peaked, assistant, -0.8, 0.01, min_keep=0).argmax()) == 7
    assert int(combine(peaked, assistant, -0.8, 0.01, min_keep=None).argmax()) != 7


def test_names_only_sets_are_cached_and_do_not_depend_on_the_prompt(tokenizer):
    """ECO and ULD forbid the other targets' names on every flagged request; the set is the same whatever the
    prompt says (names are entities, forbidden even when the user writes them), so it is built once per list."""
    builder = GuardBuilder(tokenizer)
    names = ["Ilse Drummond", "Tomas Verhoeven"]
    params = GuardParams(semantic=False, first_token_penalty=0.0)
    tables = builder.names_tables(names, params)
    assert builder.names_tables(list(names), params) is tables
    for prompt in ("", "Did Ilse Drummond ever meet Tomas Verhoeven?", QUESTION):
        built = builder.tables(prompt, [[name] for name in names], params)
        for field in ("static", "prefixes", "care", "next_tokens", "continuation"):
            assert torch.equal(getattr(built, field), getattr(tables, field)), (prompt, field)
    xargs = builder.names_xargs(names, params)
    assert xargs == builder.xargs(QUESTION, [[name] for name in names], params)
    xargs["guard_mode"] = "soft"  # a caller's copy: the cache is untouched
    assert builder.names_xargs(names, params)["guard_mode"] == "hard"
