"""Benchmark suites for the classifier, read from the shared data folder at run time (ARCHITECTURE §7).

Each suite yields the targets an operator would register (built only from operator-side material: names,
aliases, descriptions, facts and the permitted training examples) and labelled evaluation splits, which never
feed the targets or the calibration. No benchmark text lives in this repository: it is read from ``data_dir``.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from classifiers.aliases import Candidate, Corpus, derive_aliases
from classifiers.index import generic_prompts
from gateway.registry.targets import MAX_ITEMS, Target, slugify

Kind = Literal["recall", "fpr", "info"]


@dataclass
class Item:
    text: str
    target: str | None  # expected target id for recall items; None for negatives
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Split:
    name: str
    kind: Kind
    items: list[Item]


@dataclass
class Suite:
    name: str
    targets: list[Target]
    splits: list[Split]
    notes: dict[str, Any] = field(default_factory=dict)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    return _jsonl(path)


# -- TOFU -------------------------------------------------------------------------------------------------------

_CAPITALISED = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:[A-Z][\w'-]*|al-\w+|Al-\w+|bin|ibn|de|van|von))*")


def tofu_author_name(answers: list[str]) -> str:
    """The author's name: the capitalised phrase of the first answer that recurs most in the author's answers."""
    first = answers[0]
    best, best_key = "", (-1, 0)
    for match in _CAPITALISED.finditer(first):
        words = match.group().split()
        for i in range(len(words)):
            for j in range(i + 2, min(len(words), i + 4) + 1):
                phrase = " ".join(words[i:j])
                if phrase.split()[0] in {"The", "A", "An", "In", "On"}:
                    continue
                count = sum(phrase in a for a in answers[1:])
                key = (count, len(phrase))
                if key > best_key:
                    best, best_key = phrase, key
    return best


def tofu(data_dir: Path, limit_authors: int | None = None) -> Suite:
    """20 forget10 authors (§7): facts = answers, examples = first 5 questions, keep = retain90 firsts."""
    root = data_dir / "tofu"
    forget = _jsonl(root / "forget10.json")
    perturbed = _jsonl(root / "forget10_perturbed.json")
    retain = _jsonl(root / "retain90.json")
    uld: dict[str, list[str]] = {}
    uld_file = root / "uld_aug_data" / "forget10_perturbed" / "paraphrase_res.csv"
    if uld_file.exists():
        with uld_file.open(encoding="utf-8") as f:
            for row in csv.reader(f):
                uld[row[0]] = list(dict.fromkeys(ast.literal_eval(row[2])))
    n_authors = len(forget) // 20
    if limit_authors:
        n_authors = min(n_authors, limit_authors)
    keep_pool = [retain[a * 20 + q]["question"] for a in range(len(retain) // 20) for q in range(5)]
    targets, held, para, uld_items = [], [], [], []
    for a in range(n_authors):
        block = forget[a * 20:(a + 1) * 20]
        name = tofu_author_name([r["answer"] for r in block])
        keep = keep_pool[a::n_authors] if not limit_authors else keep_pool[a::20][:45]
        target = Target(name=name, description="A fictitious author.", facts=[r["answer"] for r in block],
                        examples=[r["question"] for r in block[:5]], keep=keep)
        targets.append(target)
        for q in range(5, 20):
            row = block[q]
            held.append(Item(row["question"], target.id, {"author": name}))
            para.append(Item(perturbed[a * 20 + q]["paraphrased_question"], target.id, {"author": name}))
            for text in uld.get(row["question"], []):
                uld_items.append(Item(text, target.id, {"author": name}))
    retain_rest = [Item(retain[a * 20 + q]["question"], None) for a in range(len(retain) // 20)
                   for q in range(5, 20)]
    splits = [
        Split("forget_heldback", "recall", held),
        Split("forget_paraphrased", "recall", para),
        Split("forget_uld_paraphrases", "recall", uld_items),
        Split("retain90_rest", "fpr", retain_rest),
        Split("holdout10", "fpr", [Item(r["question"], None) for r in _jsonl(root / "holdout10.json")]),
        Split("real_authors", "fpr", [Item(r["question"], None) for r in _jsonl(root / "real_authors.json")]),
        Split("world_facts", "fpr", [Item(r["question"], None) for r in _jsonl(root / "world_facts.json")]),
    ]
    return Suite("tofu", targets, splits, {"authors": [t.name for t in targets]})


# -- RWKU -------------------------------------------------------------------------------------------------------

def _rwku_type(raw: str) -> str:
    return "cross lingual" if raw.replace("-", " ").startswith("cross lingual") else raw


def rwku(data_dir: Path, limit_targets: int | None = None) -> Suite:
    """All 200 targets at once (§7): name + intro description, <= 30 forget_mia facts, level-1 examples."""
    root = data_dir / "rwku" / "Target"
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_", 1)[0]))
    if limit_targets:
        folders = folders[:limit_targets]
    targets: list[Target] = []
    subject_ids: dict[str, str] = {}
    for folder in folders:
        intro = json.loads((folder / "intro.json").read_text(encoding="utf-8"))
        intro = intro[0] if isinstance(intro, list) else intro
        name = intro["target"]
        description = re.sub(r"^Please forget [^.]*\.\s*", "", intro["intro"]).strip()
        facts = [r["text"][:4000] for r in json.loads((folder / "forget_mia.json").read_text("utf-8"))[:30]]
        examples = [r["query"] for r in json.loads((folder / "forget_level1.json").read_text("utf-8"))]
        target = Target(id=slugify(name), name=name, description=description, facts=facts, examples=examples)
        targets.append(target)
        subject_ids[name] = target.id
    names = {t.id: t.name for t in targets}
    l2, l3, neighbours = [], [], []
    for folder, target in zip(folders, targets, strict=True):
        for r in json.loads((folder / "forget_level2.json").read_text("utf-8")):
            l2.append(Item(r["query"], target.id, {"type": r.get("type", "")}))
        for r in json.loads((folder / "forget_level3.json").read_text("utf-8")):
            l3.append(Item(r["query"], target.id, {"type": _rwku_type(r.get("type", "")), "raw_type": r.get("type")}))
        for level in ("1", "2"):
            for r in json.loads((folder / f"neighbor_level{level}.json").read_text("utf-8")):
                neighbours.append(Item(r["query"], None, {"subject": target.id, "level": level,
                                                          "neighbor": r.get("neighbor", ""),
                                                          "answer": str(r.get("answer", ""))}))
    return Suite("rwku", targets, [Split("level2", "recall", l2), Split("level3", "recall", l3),
                                   Split("neighbours", "fpr", neighbours)],
                 {"targets": len(targets), "names": names})


# -- Harry Potter -----------------------------------------------------------------------------------------------

HP_DESCRIPTION = ("The Harry Potter books, films and wider wizarding world: the boy wizard Harry Potter, his "
                  "friends and enemies, the Hogwarts school of witchcraft and wizardry, its teachers, spells, "
                  "magical creatures, places, objects and plots.")
HP_LANGUAGES = {"Spanish": "es", "Russian": "ru", "Chinese": "zh", "Hindi": "hi"}


def _summary_facts(text: str, max_words: int = 60) -> list[str]:
    """The plot summaries cut into short passages (sentence-aligned) to serve as the target's facts."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    facts, current = [], []
    for sentence in sentences:
        if current and sum(len(s.split()) for s in current) + len(sentence.split()) > max_words:
            facts.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        facts.append(" ".join(current))
    return [f[:4000] for f in facts][:1000]


def _prompts(path: Path) -> list[str]:
    return [r["prompt"]["prompt"] if isinstance(r.get("prompt"), dict) else r["prompt"]
            for r in _json_or_jsonl(path)]


def _trivia(path: Path) -> list[dict[str, Any]]:
    # A few translated rows name their fields in the target language ("prashna" = question).
    return [{"question": r.get("question") or r.get("prashna") or "", "answer": str(r.get("true_answer") or "")}
            for r in _jsonl(path)]


@dataclass
class HPTraining:
    """What an operator has for the franchise (§7): the plot summaries and the *training* trivia files."""

    summaries: str
    english: list[dict[str, Any]]  # hp_trivia_train + qa_by_book_train, minus the withheld rows below
    translated: dict[str, list[dict[str, Any]]]  # language -> its __train rows
    withheld: int  # English rows whose translations are the translated test rows


def hp_training(root: Path) -> HPTraining:
    """Training material only. The translated files translate harry_potter_trivia_502_v2 row by row and their
    __train files hold its first rows, so the English originals of the translated __test rows (every later row
    of that file, all of them inside hp_trivia_train) are withheld from the English training rows; otherwise the
    translated test would be a translation of training examples."""
    translated = {language: _trivia(root / "translated_v2_hptrivia" / f"{language}_datapoints__train.jsonl")
                  for language in HP_LANGUAGES}
    first_test_row = min(len(rows) for rows in translated.values())
    withheld = {r["question"] for r in _trivia(root / "harry_potter_trivia_502_v2.jsonl")[first_test_row:]}
    english, seen = [], set()
    for name in ("hp_trivia_train.jsonl", "qa_by_book_train.jsonl"):
        for row in _trivia(root / name):
            if row["question"] and row["question"] not in withheld and row["question"] not in seen:
                seen.add(row["question"])
                english.append(row)
    text = (root / "hp_wikipedia_summaries.txt").read_text(encoding="utf-8")
    return HPTraining(text, english, translated, len(withheld))


def hp_target(training: HPTraining, negatives: list[str]) -> tuple[Target, list[Candidate]]:
    """The franchise target: name, our description, the summaries as facts, training questions as examples and
    aliases derived by code from the training texts (classifiers.aliases), nothing written per name."""
    name = "Harry Potter"
    corpora = [Corpus("en", [training.summaries, *(f"{r['question']} {r['answer']}" for r in training.english)])]
    corpora += [Corpus(code, [f"{r['question']} {r['answer']}" for r in training.translated[language]])
                for language, code in HP_LANGUAGES.items()]
    aliases = derive_aliases(corpora, negatives, exclude=[name])
    examples = [r["question"] for r in training.english][:MAX_ITEMS]
    target = Target(id="harry-potter", name=name, aliases=[a.text for a in aliases], description=HP_DESCRIPTION,
                    facts=_summary_facts(training.summaries), examples=examples)
    return target, aliases


def harry_potter(data_dir: Path) -> Suite:
    """One franchise target; recall on held-out trivia, completions and translations; FPR on side_effects."""
    root = data_dir / "harry_potter"
    training = hp_training(root)
    target, aliases = hp_target(training, generic_prompts())
    tid = target.id
    trained = {r["question"] for r in training.english}

    def held_out(paths: list[Path], exclude: set[str]) -> list[Item]:
        # Evaluation rows never used to build the target (the trivia files overlap each other and the training).
        questions = dict.fromkeys(r["question"] for p in paths for r in _trivia(p))
        return [Item(q, tid) for q in questions if q and q not in exclude]

    splits = [
        Split("trivia_heldout", "recall", held_out([root / "hp_trivia_1239.jsonl", root / "hp_trivia_test.jsonl"],
                                                   trained)),
        Split("qa_by_book_heldout", "recall", held_out([root / "qa_by_book_test.jsonl"], trained)),
        Split("completions_en", "recall", [Item(p, tid) for p in _prompts(root / "msr_data" /
                                                                          "evaluation_prompts.json")]),
        Split("completions_ru", "recall", [Item(p, tid) for p in _prompts(root / "msr_data" /
                                                                          "evaluation_russian_prompts.json")]),
        Split("completions_es", "recall", [Item(p, tid) for p in _prompts(root / "msr_data" /
                                                                          "evaluation_spanish_prompts.json")]),
        Split("probability_prompts", "recall", [Item(p, tid) for p in _prompts(root / "msr_data" /
                                                                               "probability_prompts.json")]),
    ]
    for language in HP_LANGUAGES:
        own = {r["question"] for r in training.translated[language]}
        splits.append(Split(f"translated_trivia_{language.lower()}", "recall", held_out(
            [root / "translated_v2_hptrivia" / f"{language}_datapoints__test.jsonl"], own)))
    side = root / "side_effects"
    for domain in ("british_mythology", "dungeons_and_dragons", "lord_of_the_rings", "wizard_of_oz"):
        items = [Item(r["question"], None) for r in _trivia(side / f"{domain}.jsonl")]
        for fam in sorted(side.glob(f"{domain}_familiarity*.json")):
            items += [Item(p, None, {"familiarity": fam.name}) for p in _prompts(fam)]
        splits.append(Split(f"side_effects_{domain}", "fpr", items))
    adjacent = [Item(r["question"], None) for r in _trivia(side / "cultural_impact.jsonl")]
    for fam in ("cultural_impact_familiarity.json", "cultural_impact_familiarity_2.json",
                "harry_potter_film_production_familiarity.json"):
        if (side / fam).exists():
            adjacent += [Item(p, None, {"familiarity": fam}) for p in _prompts(side / fam)]
    splits.append(Split("hp_adjacent_cultural_film", "info", adjacent))
    notes = {"facts": len(target.facts), "examples": len(target.examples), "withheld_english_rows":
             training.withheld, "aliases": len(aliases), "aliases_by_language": dict(Counter(a.language
                                                                                            for a in aliases)),
             "alias_list": [a.text for a in aliases]}
    return Suite("hp", [target], splits, notes)


def load(name: str, data_dir: Path, **limits: int | None) -> Suite:
    if name == "tofu":
        return tofu(data_dir, limits.get("limit"))
    if name == "rwku":
        return rwku(data_dir, limits.get("limit"))
    if name == "hp":
        return harry_potter(data_dir)
    raise ValueError(f"unknown suite {name!r}")


def names_in(text: str, names: dict[str, str]) -> Iterator[str]:
    """Target ids whose full name occurs verbatim (case-insensitive, whole words) in ``text``."""
    lowered = text.lower()
    for tid, name in names.items():
        if re.search(r"(?<!\w)" + re.escape(name.lower()) + r"(?!\w)", lowered):
            yield tid


_BLANKS = re.compile(r"_{3,}(?:\s+_{3,})*")


def answered(query: str, answer: str) -> str:
    """The probe with its gold answer in place: each blank filled (comma-separated answers, one per blank, or
    the whole answer in the first run of blanks), or the answer after a question."""
    runs = _BLANKS.findall(query)
    if not runs:
        return f"{query} {answer}"
    parts = [a.strip() for a in answer.split(",")]
    if len(parts) != len(runs):
        parts = [answer.strip()] + [""] * (len(runs) - 1)
    for part in parts:
        query = _BLANKS.sub(lambda _, part=part: part, query, count=1)
    return query


def counts(items: list[Item], key: str) -> Counter[str]:
    return Counter(str(i.meta.get(key, "")) for i in items)
