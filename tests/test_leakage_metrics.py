"""The leakage evaluation's answer metrics (pure functions; the full run is `unlearn-gateway eval leakage`).
Names and answers here are invented."""

from __future__ import annotations

from evals.leakage import names_another_target, novel_recall, word_validity

NAMES = ["Ilse Varnholt", "Tomasz Ebrecht", "Ilse Morrow"]


def test_an_answer_naming_another_target_is_counted_its_own_name_is_not():
    assert names_another_target("Some of TOMASZ EBRECHT's works include 'Salt Roads'.", "Ilse Varnholt", NAMES)
    assert not names_another_target("Ilse Varnholt's works include 'Salt Roads'.", "Ilse Varnholt", NAMES)
    # A shared first name, or a name inside a longer word, is not another target's full name.
    assert not names_another_target("Ilse wrote about Morrowind.", "Ilse Varnholt", NAMES)
    assert not names_another_target("", "Ilse Varnholt", NAMES)


def test_novel_recall_counts_what_the_answer_adds_not_the_echoed_question():
    question = "What genre does Ilse Varnholt write in?"
    gold = "Ilse Varnholt writes in the genre of maritime mystery."
    # What the gold adds to its question: "writes", "maritime", "mystery" (names, "genre" and stopwords are asked).
    assert novel_recall("Ilse Varnholt writes in the genre of poetry.", gold, question) == 1 / 3
    assert novel_recall("She writes maritime mystery novels.", gold, question) == 1.0
    assert novel_recall("Ilse Varnholt, genre?", gold, question) == 0.0


def test_word_validity_tells_sub_word_salad_from_fluent_text():
    question = "Where does Ilse Varnholt live?"
    assert word_validity("Ilse Varnholt lives in a quiet harbour town.", question) == 1.0  # her name is asked
    # Of "Varnholtenen", "harbourded", "quiet", "ly" and "towna", only "quiet" and "ly" are words.
    assert word_validity("Varnholtenen harbourded quiet3ly towna", question) == 2 / 5
    # Digits and punctuation are no words either way; an answer without letters has no score.
    assert word_validity("1957, 2001.", question) is None
