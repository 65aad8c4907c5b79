"""The prompt classifier: each stage on hand-written fictitious targets, windowing, spans, incremental builds,
micro-batching, the classify CLI, and a small evaluation smoke run on TOFU when the shared data is present.

Every target and prompt here is invented for these tests; no benchmark text is used outside the smoke run,
which reads it from the data folder at run time.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from classifiers.aliases import Corpus, birth_names, derive_aliases
from classifiers.batching import Classifier, classify_batch
from classifiers.described import DescriptionMatcher, asked_trades, asks_for_another_trade
from classifiers.gloss import Glosser
from classifiers.index import (
    ClassifierConfig,
    IndexBuilder,
    TargetIndex,
    build_index,
    name_patterns,
    pack_unit_rows,
    unpack_unit_rows,
)
from classifiers.learned import Calibration, conformal_threshold
from classifiers.lexical import LexicalMatcher, target_patterns
from classifiers.normalize import normalize
from classifiers.windows import conversation_windows, message_windows
from gateway.registry.targets import Target

DATA_DIR = Path(os.environ.get("UNLEARN_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))

ORLA = Target(
    name="Orla Vantremont", aliases=["O. Vantremont"],
    description="A fictitious Belgian cartographer who charted the undersea canyons of the Kessary Trench.",
    facts=["Orla Vantremont was born in Ghent in 1951.",
           "She drew the first complete chart of the Kessary Trench in 1983.",
           "Her atlas Blue Below won the Lindqvist Medal for maritime cartography.",
           "She learned surveying from her uncle, a lighthouse keeper on the Flemish coast."],
    examples=["Where was Orla Vantremont born?", "What chart did Orla Vantremont draw in 1983?",
              "Which medal did the atlas Blue Below win?", "Who taught Orla Vantremont surveying?"],
    keep=["Where is the Kessary Trench located?", "How deep is the Kessary Trench?",
          "Who founded the Lindqvist Medal committee?"])
BASTIEN = Target(
    name="Bastien Korloff", description="A fictitious chess composer known for paradoxical endgame studies.",
    facts=["Bastien Korloff composed more than four hundred chess problems.",
           "He edited the chess magazine Echo Squares for twenty years.",
           "His study The Silent Rook is taught in chess schools."],
    examples=["How many chess problems did Bastien Korloff compose?", "Which magazine did Bastien Korloff edit?"])
MIREILLE = Target(
    name="Mireille Dantagnac", aliases=["Мирей Дантаньяк"],
    description="A fictitious French perfumer who created scents from alpine flowers.",
    facts=["Mireille Dantagnac created the perfume Névé Blanc from edelweiss.",
           "She ran a perfume workshop in Annecy."],
    examples=["Which perfume did Mireille Dantagnac create?"])
TARGETS = [ORLA, BASTIEN, MIREILLE]
FILLER = ("We talked about the weather, the garden and the price of bread for a long time that afternoon. ") * 55


@pytest.fixture(scope="module")
def index() -> TargetIndex:
    return build_index(TARGETS)


# -- normalisation and the lexical stage --------------------------------------------------------------------------

def test_normalize_folds_case_diacritics_width_and_scripts():
    assert normalize("BEYONCÉ's  tour!").text == " beyonce s tour "
    assert normalize("Ｓｔｅｐｈｅｎ").text == " stephen "
    assert normalize("Гарри").text == " garri "
    folded = normalize("Café Zoë")
    start = folded.text.index("zoe")
    assert folded.span(start, start + 3) == (5, 8)


def test_ascii_fast_path_folds_exactly_like_the_general_path():
    from classifiers.normalize import _normalize_ascii, _normalize_chars

    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ0919 ,.-'?!_\n\t()")
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        assert _normalize_ascii(text) == _normalize_chars(text), repr(text)


def test_lexical_exact_alias_typo_and_word_boundaries():
    matcher = LexicalMatcher({t.id: target_patterns(t.name, t.aliases) for t in TARGETS})
    text = "Did ORLA VANTREMONT, or o. vantremont, meet Bastien Korlof at the Vantremontville fair?"
    found = matcher.find([text])
    kinds = {(m.kind, text[m.start:m.end]) for m in found}
    assert ("exact", "ORLA VANTREMONT") in kinds
    assert ("exact", "o. vantremont") in kinds
    assert ("fuzzy", "Bastien Korlof") in kinds
    assert not any("Vantremontville" in text[m.start:m.end] for m in found)


def test_lexical_typos_never_come_from_common_words_or_short_names():
    from classifiers.lexical import everyday_word

    matcher = LexicalMatcher({"x": target_patterns("Orrin Castellane", ["Brandel", "Vorne"])})

    def hits(text: str) -> list[str]:
        return [text[m.start:m.end] for m in matcher.find([text]) if m.kind != "partial"]

    assert hits("Who was Brandell?") == ["Brandell"]  # a typo of a longer name
    assert everyday_word("branded") and hits("Which cattle were branded?") == []  # a real word, one edit away
    assert hits("Tell me about the Vornes.") == ["Vornes"]  # a short name takes an ending ...
    assert hits("Tell me about Vorme.") == []  # ... but no typo


def test_lexical_other_scripts_and_partial_names():
    matcher = LexicalMatcher({t.id: target_patterns(t.name, t.aliases) for t in TARGETS})
    found = matcher.find(["Расскажите о духах, которые создала Мирей Дантаньяк.", "Was Korloff a composer?"])
    assert [(m.message, m.kind, m.target_id) for m in found] == [(0, "exact", MIREILLE.id), (1, "partial", BASTIEN.id)]


def test_a_titled_names_one_word_head_is_a_partial_name():
    """"Ysolde, Margravine of Tressel" is called Ysolde: like a surname, evidence but not a name match on its own
    (others share it); a multi-word head keeps its surname rule."""
    titled = target_patterns("Ysolde, Margravine of Tressel", [])
    assert titled.partial == ("ysolde",) and "ysolde margravine of tressel" in titled.full
    assert target_patterns("Prince Aldric Venn, Duke of Morrow", []).partial == ("venn",)
    assert target_patterns("Ysolde", []).partial == ()  # a one-word name is a full name already
    matcher = LexicalMatcher({"y": titled})
    assert [m.kind for m in matcher.find(["What did Ysolde study?"])] == ["partial"]


def test_names_in_cyrillic_or_devanagari_match_by_sound_but_everyday_words_do_not():
    from classifiers.lexical import sound_key

    assert sound_key("harry") == sound_key("garri") == "hr"  # "Гарри" folds to "garri"
    matcher = LexicalMatcher({"hp": target_patterns("Harry Potter", ["Hermione", "Slughorn", "Quidditch"])})

    def hits(text: str) -> list[tuple[str, str]]:
        return [(m.kind, text[m.start:m.end]) for m in matcher.find([text])]

    assert hits("Какое заклинание использовал Гарри Поттер?") == [("fuzzy", "Гарри Поттер")]
    assert hits("किस मंत्र का उपयोग हैरी पॉटर करते हैं?") == [("fuzzy", "हैरी पॉटर")]  # Devanagari, vowel signs kept
    assert hits("Мальчик стоял между Роном и Гермионой.") == [("fuzzy", "Гермионой")]  # inflected
    assert hits("Кого учил Слагхорна?") == [("fuzzy", "Слагхорна")]
    assert hits("Во время матча по квиддичу он поймал мяч.") == [("fuzzy", "квиддичу")]  # "qu" is heard as "кв"
    walters = LexicalMatcher({"bw": target_patterns("Barbara Walters", [])})  # English w as Russian "у"
    assert [m.kind for m in walters.find(["Кого интервьюировала Барбара Уолтерс?"])] == ["fuzzy"]
    assert hits("Перед ними стоял огромный замок.") == []  # "огромный" sounds like Hermione but is a word
    assert hits("Гарри обернулся.") == []  # a first name alone is no full name, in any alphabet
    assert hits("Garri Potter") == [("partial", "Potter")]  # Latin letters: by spelling, not by sound


def test_a_person_described_by_a_work_of_their_own_is_a_mention(index: TargetIndex):
    """"the composer of The Silent Rook" stands for Bastien Korloff: his facts name the study and his description
    makes him a composer. A role his description does not give, a plural, or a title that holds a role noun
    describes someone else."""
    question = "In which city did the composer of 'The Silent Rook' grow up?"
    decision = index.classify(question)
    assert decision.flagged and decision.targets == [index.targets[1].id] and decision.stage == "lexical"
    assert [question[s:e] for _, s, e, _ in decision.spans] == ["the composer of 'The Silent Rook'"]

    def described(text: str) -> list[tuple[str, str]]:
        return [(m.target_id, text[m.start:m.end]) for m in index.described.find([text])]

    bastien = index.targets[1].id
    assert described("Which prize did the chess legend behind Echo Squares win?") == [
        (bastien, "the chess legend behind Echo Squares")]
    # The link may say what kind of work the title is: "known for his work in", "famous for the study".
    assert described("Where was the composer known for his work in 'The Silent Rook' born?") == [
        (bastien, "the composer known for his work in 'The Silent Rook'")]
    assert described("Did the chess legend well-known for Echo Squares marry?") == [
        (bastien, "the chess legend well-known for Echo Squares")]
    assert described("Who was the director of The Silent Rook?") == []  # not his role
    assert described("Which composers of The Silent Rook are still alive?") == []
    assert described("The Composer of The Silent Rook is a play.") == []  # a title, not a description
    assert described("Who is the performer from Ghent?") == []  # one everyday-or-place word names nobody
    assert described("Where did the performer from Kessary Trench go?") == [
        (index.targets[0].id, "the performer from Kessary Trench")]
    assert described("Who hired the songwriter of 'Echo Squares'?") == []  # a composer, not a singer
    mireille = index.targets[2].id
    assert described("Where did the creator of 'Névé Blanc' train?") == [(mireille, "the creator of 'Névé Blanc'")]
    # An everyday word is a title when quoted, and likely a place or a thing when not.
    singer = DescriptionMatcher({"x": ("home",)}, {"x": ("singer",)})
    assert [m.target_id for m in singer.find(["Where was the singer of 'Home' born?"])] == ["x"]
    assert singer.find(["Where was the singer from Home born?"]) == []


def test_a_question_for_another_trade_is_not_about_the_target(index: TargetIndex):
    """Bastien Korloff composes chess problems: "Who composed ...?" asks for him, "Who directed ...?" for a
    director, which his description does not make him. Acts anyone does ("wrote", "founded", "hosted") ask for
    no trade, and a target whose description gives no trade is never ruled out."""
    assert asked_trades(["Who directed Batman Begins?"]) == {"director"}
    assert asked_trades(["Who was the drummer for The Doors?"]) == {"drummer", "musician"}
    assert asked_trades(["Who played the role of Sandy in Grease?"]) == {"actor", "comedian"}
    assert asked_trades(["Who wrote the screenplay for the film 'Scream 3'?"]) == {"writer", "director"}
    assert "producer" in asked_trades(["Who created the American crime drama series Ozark?"])
    assert asked_trades(["Who is the parent of singer Elle King?", "Who wrote it? Who founded it?"]) == frozenset()
    assert asks_for_another_trade(frozenset({"director"}), ("actor",))
    assert not asks_for_another_trade(frozenset({"director", "actor"}), ("actor",))
    assert not asks_for_another_trade(frozenset({"director"}), ())
    assert not asks_for_another_trade(frozenset(), ("actor",))

    bastien = index.targets[1].id
    composed = index.classify("Who composed more than four hundred chess problems?")
    assert composed.flagged and composed.targets == [bastien] and composed.stage == "learned"
    directed = index.classify("Who directed more than four hundred chess problems?")
    assert not directed.flagged and directed.scores[bastien] > index.calibration.threshold(bastien)


def test_windows_cover_long_text_and_isolate_questions():
    text = FILLER + "Which perfume did she make from edelweiss?"
    windows = conversation_windows([text])
    assert len(text.split()) > 700
    assert any(w.text == "Which perfume did she make from edelweiss?" for w in windows)
    covered = np.zeros(len(text), dtype=bool)
    for w in message_windows(0, text):  # before de-duplication of identical texts
        covered[w.start:w.end] = True
    assert covered[[i for i, ch in enumerate(text) if not ch.isspace()]].all()


# -- the whole cascade ----------------------------------------------------------------------------------------------

def test_named_prompt_is_flagged_by_the_lexical_stage_with_spans(index: TargetIndex):
    text = "Tell me where orla vantremont grew up."
    decision = index.classify(text)
    assert decision.flagged and decision.targets == [ORLA.id] and decision.stage == "lexical"
    assert [(m, text[s:e], t) for m, s, e, t in decision.spans] == [(0, "orla vantremont", ORLA.id)]
    assert set(decision.timings_ms) == {"lexical", "semantic", "learned"}


def test_everyday_prompts_are_not_flagged(index: TargetIndex):
    for text in ["How do I make a sourdough starter?", "What is the capital of Portugal?",
                 "Write a haiku about the sea."]:
        decision = index.classify(text)
        assert not decision.flagged, (text, decision)
        assert decision.stage == "none" and decision.spans == []


def test_name_three_turns_earlier_is_caught_and_spanned(index: TargetIndex):
    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "I am reading about Bastien Korloff."},
                    {"role": "assistant", "content": "Happy to help. What would you like to know?"},
                    {"role": "user", "content": "Start with his childhood."},
                    {"role": "assistant", "content": "Sure."},
                    {"role": "user", "content": "And which magazine did he edit?"}]
    decision = index.classify(conversation)
    assert decision.flagged and BASTIEN.id in decision.targets
    message, start, end, target = decision.spans[0]
    assert (message, conversation[message]["content"][start:end], target) == (1, "Bastien Korloff", BASTIEN.id)


def test_question_after_700_words_of_filler_is_caught(index: TargetIndex):
    decision = index.classify(FILLER + " Where was Orla Vantremont born?")
    assert decision.flagged and decision.targets == [ORLA.id]
    # Unnamed: a near-copy of one of the target's example prompts, found in its own window.
    decision = index.classify(FILLER + " Which medal did the atlas Blue Below win?")
    assert decision.flagged and ORLA.id in decision.targets and decision.stage in ("semantic", "learned")


def test_keep_prompt_overrides_a_name_match(index: TargetIndex):
    decision = index.classify("Where is the Kessary Trench located?")
    assert not decision.flagged
    # Naming the target in passing does not turn a keep question into a forget question ...
    decision = index.classify("Where is the Kessary Trench located, the one Orla Vantremont mapped?")
    assert not decision.flagged or decision.stage != "lexical"
    # ... but asking about the target herself is flagged.
    decision = index.classify("In which year did Orla Vantremont chart the Kessary Trench?")
    assert decision.flagged and decision.stage == "lexical"


def test_a_flagged_prompt_also_flags_other_targets_past_their_threshold(index: TargetIndex):
    """Whether a prompt is flagged is decided by each window's best few targets; once it is, every other target
    past its own threshold joins, so the policy protects its facts too. (learned_rank 0 leaves only named
    targets to the learned stage; the tiny index has too few negatives to calibrate, so a threshold is set.)"""
    strict = copy.copy(index)
    strict.calibration = Calibration(0.01, 0.9)
    both = "Where was Orla Vantremont born? Also, how many chess problems did the editor of Echo Squares compose?"
    for secondary, expected in ((False, [ORLA.id]), (True, [ORLA.id, BASTIEN.id])):
        strict.config = replace(index.config, learned_rank=0, secondary=secondary)
        decision = strict.classify(both)
        assert decision.scores[BASTIEN.id] > 0.9
        assert decision.targets == expected and decision.stage == "lexical"
        # An unflagged prompt stays unflagged: the rule never decides whether a prompt is flagged.
        assert not strict.classify("How many chess problems did the editor of Echo Squares compose?").flagged


def test_a_name_decides_without_the_encoder_unless_the_target_has_keep_prompts(index: TargetIndex):
    # Bastien has no keep prompts: his name flags him and nothing is left for the encoder to look at.
    assert index.prepare("Tell me about Bastien Korloff.").windows == []
    decision = index.classify("Tell me about Bastien Korloff.")
    assert decision.targets == [BASTIEN.id] and decision.stage == "lexical"
    # Orla has keep prompts, whose check needs the window's embedding.
    assert len(index.prepare("Where was Orla Vantremont born?").windows) == 1


def test_a_name_shared_by_chance_opens_the_encoder_for_nobody_a_name_in_the_facts_does(index: TargetIndex):
    """At scale, names share first names and surnames by chance; that is no evidence. A target whose facts name
    someone is still reached through that name."""
    namesake = Target(name="Bastien Morel", description="A fictitious sculptor of driftwood.",
                      facts=["Bastien Morel carved driftwood animals in Brittany."])
    same_surname = Target(name="Irina Korloff", description="A fictitious violinist.",
                          facts=["Irina Korloff plays the viola in Riga."])
    daughter = Target(name="Anouk Texier", description="A fictitious glassblower.",
                      facts=["Anouk Texier is the daughter of Bastien Korloff."])
    config = ClassifierConfig(static_gate=False)  # the word check alone decides
    namesakes = build_index([BASTIEN, namesake, same_surname, ORLA], encoder=index.encoder, config=config)
    assert namesakes.gate.postings["bastien"] and namesakes.gate.postings["korloff"]  # distinctive words
    # "Bastien" and "Korloff" inside Bastien Korloff's name: nothing for his namesakes, no surname mention forced.
    assert namesakes.prepare("Which magazine did Bastien Korloff edit for twenty years?").windows == []
    assert namesakes.classify("Which magazine did Bastien Korloff edit for twenty years?").targets == [BASTIEN.id]
    # The namesakes' own words, a first name on its own and a surname on its own still open the gate.
    assert len(namesakes.prepare("Tell me about Bastien Korloff and the driftwood animals.").windows) == 1
    assert len(namesakes.prepare("Which Bastien carved animals?").windows) == 1
    assert len(namesakes.prepare("Was Korloff a composer or a violinist?").windows) == 1
    # His daughter's facts name him: that window is hers to decide.
    family = build_index([BASTIEN, daughter, ORLA], encoder=index.encoder, config=config)
    assert len(family.prepare("Whose child is Bastien Korloff?").windows) == 1


def test_static_gate_threshold_is_the_calibrated_quantile_of_unnamed_positives(index: TargetIndex):
    from classifiers.static import words

    gate = index.gate
    assert gate.static is not None and gate.static_rows is not None
    # Unnamed positives only: a prompt that mentions its target (a surname alone included) is always encoded.
    positives = [(t, row, text) for t, e in enumerate(index.entries) for row, text in e.variants
                 if not any(m.target_id == e.target_id for m in index.matcher.find([text]))]
    assert positives and all("Vantremont" not in text for _, _, text in positives)
    assert gate.threshold == gate.calibrate_threshold(positives, index.config.static_gate_miss)
    passing = [(t, text) for t, _, text in positives if t in gate.candidates(words(text))]
    assert passing and -1.0 < gate.threshold < 1.0
    # A window that shares no distinctive word with any target never reaches the encoder, however close.
    assert index.prepare("What is a good recipe for bread?").windows == []
    # The threshold admits nearly all of the operator's own unnamed prompts that open the word gate.
    admitted = [gate.select([text], [False], set())[0] for _, text in passing]
    assert np.mean(admitted) >= 1 - index.config.static_gate_miss - 1 / len(passing)


@pytest.mark.parametrize("max_rows", [None, 6])
def test_gate_select_decides_as_candidates_then_closest(index: TargetIndex, monkeypatch, max_rows):
    """``select`` skips building candidate sets where the answer does not need them; its decisions must equal
    the plain rule (candidates, then the static check over their rows), also when words exceed the row cap."""
    from classifiers import gate as gate_module
    from classifiers.static import words

    if max_rows is not None:
        monkeypatch.setattr(gate_module, "STATIC_MAX_ROWS", max_rows)
    entries = index.entries
    limit = max(2.0, index.config.gate_max_share * len(entries))
    gate = gate_module.EncoderGate(index.vocabulary, entries, limit, index.gate.static, index.gate.threshold)
    assert gate.threshold != -math.inf
    if max_rows is not None:
        assert gate.wide_rows  # the fast path is exercised
    texts = [text for e in entries for _, text in e.variants] + [t for target in TARGETS for t in target.facts] + [
        "What is a good recipe for bread?", "The weather was lovely on the coast today.", ""]
    for exclude in (set(), {0}, set(range(len(entries)))):
        expected = []
        for text in texts:
            chosen = gate.candidates(words(text), exclude)
            expected.append(bool(chosen) and bool(gate.closest(gate.static.embed_words([words(text)]), [chosen])[0]
                                                   >= gate.threshold))
        assert gate.select(texts, [False] * len(texts), exclude) == expected
    assert gate.select(texts, [True] * len(texts), set()) == [True] * len(texts)


def test_training_variants_kept_as_int8_lose_almost_nothing(index: TargetIndex):
    """Variant embeddings are stored as int8 to halve their memory; unpacked, they must still be the same
    unit rows, so the learned stage trains on what float16 would have given it."""
    entry = next(e for e in index.entries if len(e.variants))
    assert entry.variant_vectors.dtype == np.int8 and len(entry.variant_vectors) == len(entry.variants)
    texts = [text for _, text in entry.variants]
    exact = index.encoder.encode(texts)
    unpacked = unpack_unit_rows(entry.variant_vectors)
    assert np.allclose(np.linalg.norm(unpacked, axis=1), 1.0, atol=1e-5)
    assert (unpacked * exact).sum(axis=1).min() > 0.9995
    assert np.abs(unpacked @ exact.T - exact @ exact.T).max() < 0.003
    assert (unpack_unit_rows(pack_unit_rows(-exact)) * -exact).sum(axis=1).min() > 0.9995


def test_features_of_many_targets_at_once_equal_each_target_alone(index: TargetIndex):
    """The decision computes every candidate target's features in one padded pass; each target's slice must be
    what that target alone gives, whatever its neighbours' row counts, and a left-out row must be unseen."""
    from classifiers.features import FEATURES, LeftOut, MentionEvidence, pair_features

    rng = np.random.default_rng(0)
    vectors = index.encoder.encode(["Where was the cartographer born?", "Which chess magazine ran twenty years?",
                                    "How do I boil an egg?"])
    blocks = [entry.block for entry in index.entries]
    assert len({len(b.vectors) for b in blocks}) > 1 and len({len(b.keep) for b in blocks}) > 1
    generic = rng.uniform(0, 0.5, len(vectors)).astype(np.float32)
    other = rng.uniform(0, 0.5, (len(blocks), len(vectors))).astype(np.float32)
    names_other = rng.integers(0, 2, (len(blocks), len(vectors))).astype(np.float32)
    mentions = [MentionEvidence(1.0, 1.0, 0.0), MentionEvidence(), MentionEvidence(0.0, 0.0, 1.0)]
    sims = vectors @ blocks[0].vectors.astype(np.float32).T
    drop = int(sims[0].argmax())  # the first window's best row of the first target: leaving it out must show
    left_out = [LeftOut(row=drop, keep=0), LeftOut(), LeftOut(row=0, related=0)]
    who = np.array([1.0, 1.0, 0.0], np.float32)
    together = pair_features(vectors, blocks, generic, other, mentions, names_other, np.array([0.0, 1.0, 0.0]),
                             who, left_out)
    assert together.shape == (len(blocks), len(vectors), len(FEATURES))
    for t in range(len(blocks)):
        alone = pair_features(vectors, blocks[t:t + 1], generic, other[t:t + 1], mentions[t:t + 1],
                              names_other[t:t + 1], np.array([[0.0, 1.0, 0.0][t]]), who, left_out[t:t + 1])
        np.testing.assert_allclose(together[t], alone[0], atol=1e-6)
    # By hand for the first target, with its row ``drop`` and keep prompt 0 left out.
    block = blocks[0]
    examples = (block.kinds == 2) & (np.arange(len(block.kinds)) != drop)
    np.testing.assert_allclose(together[0, :, FEATURES.index("sim_example")], sims[:, examples].max(axis=1),
                               atol=1e-6)
    usable = np.delete(sims, drop, axis=1)
    np.testing.assert_allclose(together[0, :, FEATURES.index("sim_top3")],
                               -np.sort(-usable, axis=1)[:, :3].mean(axis=1), atol=1e-6)
    keep = vectors @ block.keep[1:].astype(np.float32).T
    np.testing.assert_allclose(together[0, :, FEATURES.index("sim_keep")], keep.max(axis=1), atol=1e-6)
    np.testing.assert_allclose(together[0, :, FEATURES.index("margin_other")], usable.max(axis=1) - other[0],
                               atol=1e-6)


def test_decision_lines_follow_the_cli_contract(index: TargetIndex):
    decision = index.classify([{"role": "user", "content": "Which medal did the atlas Blue Below win?"}])
    line = decision.line("q1")
    assert set(line) == {"id", "flagged", "targets", "score", "stage"}
    assert 0.0 <= line["score"] <= 1.0
    admin = decision.as_dict()
    assert {"scores", "spans", "timings_ms"} <= set(admin)


# -- building -------------------------------------------------------------------------------------------------------

def test_incremental_rebuild_reuses_unchanged_targets(index: TargetIndex):
    changed = BASTIEN.model_copy(update={"facts": [*BASTIEN.facts, "He was born in Lyon."]})
    added = Target(name="Teodor Quillfeather", description="A fictitious clockmaker.",
                   facts=["Teodor Quillfeather built a clock that runs on tides."])
    rebuilt = build_index([ORLA, changed, MIREILLE, added], index)
    assert rebuilt.stats is not None
    assert (rebuilt.stats.reused, rebuilt.stats.encoded) == (2, 2)
    assert rebuilt.entries[0] is index.entries[0]
    assert rebuilt.entries[2] is index.entries[2]
    assert rebuilt.classify("What did Teodor Quillfeather build?").targets == [added.id]
    assert index.classify("What did Teodor Quillfeather build?").flagged is False  # the old index is untouched
    disabled = build_index([ORLA.model_copy(update={"enabled": False}), changed], rebuilt)
    assert disabled.ids == [changed.id] and disabled.stats.encoded == 0


def test_approximate_search_agrees_with_exact_search_and_updates_incrementally(index: TargetIndex):
    config = ClassifierConfig(ann_min_rows=1)  # force the HNSW path on a tiny index
    ann = build_index(TARGETS, encoder=index.encoder, config=config)
    assert ann.semantic.mode == "ann" and index.semantic.mode == "exact"
    for text in ["Which medal did the atlas Blue Below win?", "Which magazine did the chess composer edit?",
                 "How do I boil an egg?"]:
        vectors = index.encoder.encode([text])
        assert ann.semantic.candidates(vectors, 2).targets == index.semantic.candidates(vectors, 2).targets
    smaller = build_index(TARGETS[:2], ann, config=config)
    assert smaller.semantic.mode == "ann" and smaller.stats.encoded == 0
    assert MIREILLE.id not in smaller.classify("Which perfume did Mireille Dantagnac create?").targets
    assert ann.classify("Which perfume did Mireille Dantagnac create?").targets == [MIREILLE.id]


def test_index_builder_plugs_into_hot_reload(index: TargetIndex):
    builder = IndexBuilder(encoder=index.encoder)
    first = builder.build(TARGETS, None)
    second = builder.build(TARGETS[:2], first)
    assert builder.name == "classifier" and second.stats.encoded == 0 and second.ids == [ORLA.id, BASTIEN.id]


def test_empty_target_set_flags_nothing(index: TargetIndex):
    empty = build_index([], encoder=index.encoder)
    decision = empty.classify("Where was Orla Vantremont born?")
    assert not decision.flagged and decision.targets == [] and decision.stage == "none"


def test_conformal_threshold_is_the_finite_sample_quantile():
    scores = [i / 1000 for i in range(199)]
    # ceil((199 + 1) * 0.99) = 198 -> the 198th smallest score
    assert conformal_threshold(scores, 0.01) == pytest.approx(scores[197])
    assert math.isinf(conformal_threshold(scores[:5], 0.01))


# -- micro-batching -------------------------------------------------------------------------------------------------

async def test_micro_batching_answers_each_caller_with_its_own_decision(index: TargetIndex):
    prompts = [f"Where was Orla Vantremont born? ({i})" if i % 3 == 0 else
               f"How many chess problems did Bastien Korloff compose? ({i})" if i % 3 == 1 else
               f"What is a good soup for a cold day number {i}?" for i in range(24)]
    expected = [d.targets for d in classify_batch(index, prompts)]
    classifier = Classifier(index, max_batch=8, max_wait_ms=5)
    try:
        results = await asyncio.gather(*(classifier.classify(p) for p in prompts))
    finally:
        await classifier.aclose()
    assert [d.targets for d in results] == expected
    assert classifier.classified == len(prompts) and classifier.batches < len(prompts)


def test_a_windows_embedding_does_not_depend_on_what_it_is_batched_with():
    from classifiers.encoder import load_encoder

    encoder = load_encoder(cache_size=0)  # no cache: every call really encodes
    text = "Which chart did the cartographer draw in 1983?"
    alone = encoder.encode([text])[0]
    for company in (["hi"], ["A much longer window about weather, gardens and bread prices in the afternoon."]):
        assert np.array_equal(encoder.encode([text, *company])[0], alone)


def test_windows_encoded_side_by_side_equal_windows_encoded_one_after_another():
    from classifiers.encoder import OnnxMiniLM, load_encoder

    if not isinstance(load_encoder(), OnnxMiniLM):
        pytest.skip("the ONNX encoder is not available here")
    texts = [f"Window {i}: the cartographer drew chart number {i} of the trench in {1950 + i}." for i in range(24)]
    one_by_one = OnnxMiniLM(parallel=1, cache_size=0).encode(texts)
    side_by_side = OnnxMiniLM(parallel=4, cache_size=0).encode(texts)
    assert np.array_equal(side_by_side, one_by_one)


# -- the command line -----------------------------------------------------------------------------------------------

def test_classify_cli_on_a_tiny_file(tmp_path: Path):
    targets = tmp_path / "targets.jsonl"
    targets.write_text("\n".join(t.model_dump_json() for t in TARGETS) + "\n")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "text": "Which magazine did Bastien Korloff edit?"},
        {"id": "b", "messages": [{"role": "user", "content": "How do I boil an egg?"}]},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    script = Path(sys.executable).parent / "unlearn-gateway"
    result = subprocess.run([str(script), "classify", "--targets", str(targets), "--input", str(source),
                             "--output", str(out)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["id"], x["flagged"], x["targets"], x["stage"]) for x in lines] == [
        ("a", True, [BASTIEN.id], "lexical"), ("b", False, [], "none")]


# -- aliases derived from an operator's texts ---------------------------------------------------------------------


def test_birth_names_in_the_targets_own_texts_are_names_of_it():
    """"Orla Marie Dupuis (born ...), known professionally as Orla Vantremont" names her; a relative's birth name
    ("her uncle Piet Vantremont (born Pieter Jan Claes)") names someone else; dates and initials are no names."""
    texts = ["Orla Marie Dupuis (born 4 May 1951), known professionally as Orla Vantremont, is a cartographer.",
             "Her uncle Piet Vantremont (born Pieter Jan Claes) kept a lighthouse.",
             "Vantremont was born Orla M. Dupuis in Ghent.", "Vantremont was born June Second in Ghent."]
    names = birth_names("Orla Vantremont", texts)
    assert set(names) == {"Orla Marie Dupuis", "Orla Dupuis", "Orla M. Dupuis"}
    assert birth_names("Rachel Vantremont", ["Rachel Vantremont (born Anne Rachel Smit; 1951) drew maps."]) == (
        "Anne Rachel Smit", "Anne Smit", "Rachel Smit")  # she goes by her middle name
    # a parenthetical after the name, then ", born ...": the birth name is followed by its own parenthetical
    assert birth_names("Vantremontius", ["Vantremontius (Latin; c. 1550 – 1601), born Orla Voss (奥拉), was a sage."]
                       ) == ("Orla Voss",)
    # other notes before the birth name, up to a semicolon, inside the same parenthesis
    assert birth_names("Orla, Duchess of Ghent", ["Orla, Duchess of Ghent (; born Anne Orla Smit; 1951) drew maps."]
                       ) == ("Anne Orla Smit", "Anne Smit", "Orla Smit")
    orla = ORLA.model_copy(update={"facts": [*ORLA.facts, texts[0]]})
    matcher = LexicalMatcher({"orla": name_patterns(orla)})
    assert [(m.kind, m.target_id) for m in matcher.find(["What did Orla Dupuis chart?"])] == [("exact", "orla")]
    assert matcher.find(["Did Pierre Dupuis chart the trench?"]) == []  # relatives share a birth surname


def test_windows_in_other_languages_are_also_encoded_as_english_glosses(index: TargetIndex, monkeypatch):
    """A Spanish, French or German question about a target is read by the English encoder through its word
    gloss; English prompts, names and titles are left as they are."""
    glosser = Glosser.packaged()
    assert glosser.language("¿Quién dibujó la primera carta de la fosa Kessary en 1983?") == "es"
    assert glosser.language("Qui a dessiné la première carte de la fosse Kessary?") == "fr"
    assert glosser.language("Welcher Kartograf hat die erste Karte des Kessary-Grabens gezeichnet?") == "de"
    assert glosser.language("这部电影的导演是谁？") == "zh"  # cut into words by jieba
    assert {"director", "who"} <= set((glosser.gloss("这部电影的导演是谁？") or "").split())
    for english in ("Who retired from the Las Vegas residency at the Flamingo Las Vegas?",
                    "The die is cast, said Caesar, and he crossed the Rubicon.", "Who wrote 'La vie en rose'?"):
        assert glosser.language(english) is None and glosser.gloss(english) is None
    glossed = glosser.gloss("¿Quién dibujó la primera carta de la fosa Kessary en 1983?")
    assert glossed is not None and glossed.startswith("Who ") and "Kessary" in glossed and "1983" in glossed
    assert "the album" in (glosser.gloss("Qui a chanté sur l'album 'Blue Below' de la chanteuse?") or "")

    # "Which medal did the atlas Blue Below win?" is one of Orla's examples; its gloss is a near-copy of it.
    question = "Por favor, responde en inglés. ¿Qué medalla ganó el atlas Blue Below?"
    prepared = index.prepare(question)
    assert any(w.text.endswith("What medal won the atlas Blue Below?") for w in prepared.windows)
    glossed = index.classify(question)
    assert glossed.flagged and glossed.targets == [index.targets[0].id] and glossed.stage == "semantic"
    monkeypatch.setattr(index, "glosser", None)
    assert index.classify(question).scores[index.targets[0].id] < glossed.scores[index.targets[0].id]

# An invented saga: its names recur, everyday words are capitalised only at a sentence start or are common anyway.
SAGA = [
    "The healer Zorvath Quellmere lived in Brandevik. Zorvath taught the Ostrelline order to brew tonics.",
    "Why did Zorvath leave Brandevik? Because the Ostrelline council banished Zorvath in winter.",
    "Quellmere kept a ledger in London. Monday was market day in Brandevik and Zorvath sold tonics there.",
    "When did the Ostrelline order return to Brandevik? After Quellmere wrote to the council on Monday.",
]


def test_aliases_are_the_names_the_texts_keep_using():
    found = {a.text: a for a in derive_aliases([Corpus("en", SAGA)])}
    assert {"zorvath", "brandevik", "ostrelline", "quellmere"} <= set(found)
    assert not {"london", "monday", "the", "why", "when", "because", "council"} & set(found)  # everyday words
    assert found["zorvath"].count == 5 and found["zorvath"].background_zipf < 1
    assert list(found)[0] == "zorvath"  # the most used name first


def test_aliases_drop_generic_negatives_exclusions_and_respect_the_budget():
    texts = [t.replace("Brandevik", "Brandevik Brandevik") for t in SAGA]
    found = [a.text for a in derive_aliases([Corpus("en", texts)], negatives=["Is Ostrelline tea good?"],
                                            exclude=["Zorvath Quellmere", "Quellmere"])]
    assert "ostrelline" not in found and "quellmere" not in found and "zorvath" in found
    assert len(derive_aliases([Corpus("en", SAGA)], limit=2)) == 2


def test_aliases_in_caseless_and_unspaced_scripts_share_the_budget():
    hindi = ["ज़ोर्वाथ ने ब्रांडेविक में दवा बनाई।", "ज़ोर्वाथ कहाँ रहता था?", "ज़ोर्वाथ और ब्रांडेविक की कहानी।",
             "ब्रांडेविक में ज़ोर्वाथ का घर था।"]
    chinese = ["佐尔瓦斯在布兰德维克。", "佐尔瓦斯为什么离开布兰德维克？", "在布兰德维克，佐尔瓦斯卖药。"]
    found = derive_aliases([Corpus("en", SAGA), Corpus("hi", hindi), Corpus("zh", chinese)], limit=6)
    by_language = {a.language: a.text for a in found}
    assert set(by_language) == {"en", "hi", "zh"}  # interleaved: every language gets a share
    texts = {a.text for a in found}
    assert "ज़ोर्वाथ" in texts  # a whole Devanagari word, vowel signs included
    assert "佐尔瓦斯" in texts and "在布兰德维克" not in texts and "尔瓦斯" not in texts  # whole names only


@pytest.mark.skipif(not (DATA_DIR / "harry_potter" / "hp_trivia_train.jsonl").exists(),
                    reason=f"benchmark data not found at {DATA_DIR} (set UNLEARN_DATA); needs the Harry Potter set")
def test_hp_target_is_built_from_training_files_only(tmp_path: Path):
    import shutil

    from classifiers.evaluation import suites
    from classifiers.index import generic_prompts

    # A copy of the data folder with nothing but the operator-side files: building the target must work from it.
    source, root = DATA_DIR / "harry_potter", tmp_path / "harry_potter"
    (root / "translated_v2_hptrivia").mkdir(parents=True)
    for name in ("hp_wikipedia_summaries.txt", "hp_trivia_train.jsonl", "qa_by_book_train.jsonl",
                 "harry_potter_trivia_502_v2.jsonl", *(f"translated_v2_hptrivia/{language}_datapoints__train.jsonl"
                                                       for language in suites.HP_LANGUAGES)):
        shutil.copy(source / name, root / name)
    target, aliases = suites.hp_target(suites.hp_training(root), generic_prompts())
    assert 0 < len(target.aliases) <= 200 and target.examples and target.facts
    assert {a.language for a in aliases} == {"en", *suites.HP_LANGUAGES.values()}
    # No evaluation prompt is a training example or fed the aliases' corpus.
    suite = suites.load("hp", DATA_DIR)
    assert suite.targets[0].model_dump() == target.model_dump()
    training = suites.hp_training(source)
    seen = set(target.examples) | {r["question"] for rows in training.translated.values() for r in rows}
    for split in suite.splits:
        assert not seen & {item.text for item in split.items}, split.name


def test_rwku_probes_that_ask_for_an_active_target_are_recognised_by_their_gold_answer():
    """A neighbour probe whose gold answer completes an active target's name asks for that target (RWKU's
    neighbour sets hold such probes); the evaluation leaves them out of the neighbour FPR goal."""
    from classifiers.evaluation.suites import answered, names_in

    names = {"genghis-khan": "Genghis Khan", "christopher-lloyd": "Christopher Lloyd"}
    cloze = answered("In 1206, ___ Khan founded the Mongol Empire.", "Genghis")
    assert cloze == "In 1206, Genghis Khan founded the Mongol Empire."
    assert list(names_in(cloze, names)) == ["genghis-khan"]
    question = answered("Who played Doc Brown in Back to the Future?", "Christopher Lloyd")
    assert list(names_in(question, names)) == ["christopher-lloyd"]
    assert answered("Her debut film was ___ ___ ___.", "I Am Sam") == "Her debut film was I Am Sam."
    assert answered("___ and ___ created Friends.", "David Crane, Marta Kauffman") == \
        "David Crane and Marta Kauffman created Friends."
    assert not list(names_in(answered("Who created Friends?", "David Crane and Marta Kauffman"), names))


# -- evaluation smoke run ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (DATA_DIR / "tofu" / "forget10.json").exists(),
                    reason=f"benchmark data not found at {DATA_DIR} (set UNLEARN_DATA); the smoke run needs TOFU")
def test_tofu_evaluation_smoke(index: TargetIndex, tmp_path: Path):
    from classifiers.evaluation.report import write_report
    from classifiers.evaluation.runner import run_suite

    items = io.StringIO()
    report, histograms = run_suite("tofu", DATA_DIR, config=ClassifierConfig(), progress=False, limit=3,
                                   max_items=25,
                                   index_factory=lambda targets, **kw: build_index(targets, encoder=index.encoder,
                                                                                   config=kw.get("config")),
                                   items_out=items)
    metrics = report["metrics"]
    assert report["config"]["targets"] == 3
    assert metrics["forget_heldback"]["recall"] > 0.5  # sanity only: names are in most held-back questions
    assert metrics["world_facts"]["fpr"] < 0.5
    # every classified prompt is written once, and its verdicts add up to the split's figures
    records = [json.loads(line) for line in items.getvalue().splitlines()]
    splits = {name: m for name, m in metrics.items() if "kind" in m}
    assert len(records) == sum(m["n"] for m in splits.values())
    by_split: dict[str, list[dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    held = by_split["forget_heldback"]
    assert all(r["expected"] and r["text"] for r in held)
    assert np.mean([r["correct"] for r in held]) == pytest.approx(metrics["forget_heldback"]["recall"])
    world = by_split["world_facts"]
    assert np.mean([not r["correct"] for r in world]) == pytest.approx(metrics["world_facts"]["fpr"])
    assert all(r["correct"] == (r["expected"] in r["targets"]) for r in held)
    md = write_report(tmp_path / "smoke.json", [report], {"tofu": histograms})
    assert md.exists() and (tmp_path / "smoke-tofu-splits.png").exists()


@pytest.mark.parametrize("folder", ["/proc/self", "/proc/no-such-folder/cache"])
def test_an_unwritable_cache_folder_costs_the_computation_not_the_answer(folder, monkeypatch):
    """The hardened container bakes the cache folder into a read-only image; arrays first needed at run time
    (generic negatives, GUARD's vocabulary table) must still be computed, in each process. /proc refuses writes
    even to root: one folder exists, the other cannot be created."""
    from classifiers.encoder import cached_array

    monkeypatch.setenv("UNLEARN_CACHE_DIR", folder)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(3.0)

    assert cached_array("unwritable-test.npy", compute).tolist() == [0.0, 1.0, 2.0]
    assert cached_array("unwritable-test.npy", compute).tolist() == [0.0, 1.0, 2.0]
    assert len(calls) == 2  # nothing was stored, nothing half-written was read


def test_a_writable_cache_folder_computes_once(tmp_path, monkeypatch):
    from classifiers.encoder import cached_array

    monkeypatch.setenv("UNLEARN_CACHE_DIR", str(tmp_path))
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.ones(2)

    cached_array("once.npy", compute)
    assert cached_array("once.npy", compute).tolist() == [1.0, 1.0] and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once.npy"]


def test_static_gate_keeps_a_threshold_when_no_unnamed_positive_opens_the_word_gate(index: TargetIndex):
    """Targets so alike that their questions' words are all too common to be distinctive ("Where was someone
    born?" for ten people born somewhere) leave no positive to calibrate on; the threshold then comes from all of
    them instead of switching the static check off, which sent every window sharing a topic word to the encoder."""
    from classifiers.bench import synthetic_targets
    from classifiers.static import words

    alike = build_index(synthetic_targets(10, seed=1), encoder=index.encoder)
    gate = alike.gate
    positives = [(t, row, text) for t, e in enumerate(alike.entries) for row, text in e.variants
                 if not any(m.target_id == e.target_id for m in alike.matcher.find([text]))]
    assert positives and not any(t in gate.candidates(words(text)) for t, _, text in positives)
    assert gate.threshold != -math.inf
    assert gate.threshold == gate.calibrate_threshold(positives, alike.config.static_gate_miss)
    chatter = "Bring coffee and bread, the music was loud all evening."  # "music": a topic of the targets
    assert gate.candidates(words(chatter))
    assert alike.prepare(chatter).windows == []
