"""TOFU for the leakage suite: forget10 targets built as ARCHITECTURE §7 prescribes, and the evaluation splits.

A target is built only from what an operator would have: the author's name (read from the first answer of the
author's block, where TOFU states it), facts = the author's 20 answers, examples = the author's first 5 questions;
keep = the first 5 questions of every retain author the demo model was trained on, spread over the targets.
Evaluation uses the *other* questions only (never the examples), so nothing is tuned on what is measured.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.registry.targets import Target

AUTHOR_QUESTIONS = 20
EXAMPLES_PER_AUTHOR = 5
FORGET10_START = 3600
RETAIN_AUTHORS = 20  # the retain authors both demo twins were trained on (models/build.py)

_NAME_RUN = re.compile(r"(?:[A-Z][\w'\-]*\.?\s+){1,4}[A-Z][\w'\-]*")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def author_name(block: list[dict]) -> str:
    """The author's name: the capitalised run of the first answer that recurs most across the block's QAs."""
    first = block[0]["answer"]
    text = " ".join(f"{r['question']} {r['answer']}" for r in block)
    candidates = [m.group(0).strip().rstrip(".") for m in _NAME_RUN.finditer(first)]
    candidates = [c.removeprefix("The ").strip() for c in candidates]
    candidates = [c for c in candidates if len(c.split()) >= 2]
    if not candidates:
        raise ValueError(f"no author name in {first!r}")
    return max(candidates, key=lambda c: (text.count(c), len(c)))


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    author: int  # index of the author block (forget: 0..19 within forget10; retain: 0..19)
    paraphrased_answer: str = ""
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str = ""


@dataclass(frozen=True)
class TofuSuite:
    targets: list[Target]
    forget_eval: list[QA]  # non-example questions of forget authors
    retain_eval: list[QA]  # non-keep questions of the trained retain authors
    keep: list[QA]  # the keep questions (first 5 of each trained retain author)
    real_authors: list[QA]
    world_facts: list[QA]


def _perturbed_index(rows: list[dict]) -> dict[str, dict]:
    return {r["question"]: r for r in rows}


def _qa(row: dict, author: int, extra: dict | None) -> QA:
    extra = extra or {}
    return QA(row["question"], str(row["answer"]), author, extra.get("paraphrased_answer", ""),
              tuple(extra.get("perturbed_answer", ())), extra.get("paraphrased_question", ""))


def load_suite(data_dir: Path, policy: dict | None = None, per_author: int = 5) -> TofuSuite:
    """The tofu-mini suite: 20 targets; ``per_author`` evaluation questions per forget and per retain author."""
    tofu = data_dir / "tofu"
    full = read_jsonl(tofu / "full.json")
    forget_rows = full[FORGET10_START:]
    retain_rows = full[: RETAIN_AUTHORS * AUTHOR_QUESTIONS]
    perturbed = _perturbed_index(read_jsonl(tofu / "forget10_perturbed.json"))
    retain_perturbed = _perturbed_index(read_jsonl(tofu / "retain_perturbed.json"))
    n_authors = len(forget_rows) // AUTHOR_QUESTIONS
    keep_all = [retain_rows[a * AUTHOR_QUESTIONS + i]["question"] for a in range(RETAIN_AUTHORS)
                for i in range(EXAMPLES_PER_AUTHOR)]
    targets, forget_eval = [], []
    for a in range(n_authors):
        block = forget_rows[a * AUTHOR_QUESTIONS:(a + 1) * AUTHOR_QUESTIONS]
        name = author_name(block)
        keep = keep_all[a::n_authors]
        targets.append(Target.model_validate({
            "name": name, "facts": [str(r["answer"]) for r in block],
            "examples": [r["question"] for r in block[:EXAMPLES_PER_AUTHOR]], "keep": keep,
            "description": "Fictitious author from the TOFU benchmark (forget10).",
            **({"policy": policy} if policy else {})}))
        held_out = block[EXAMPLES_PER_AUTHOR:]
        forget_eval += [_qa(r, a, perturbed.get(r["question"])) for r in held_out[:per_author]]
    retain_eval = []
    for a in range(RETAIN_AUTHORS):
        block = retain_rows[a * AUTHOR_QUESTIONS:(a + 1) * AUTHOR_QUESTIONS]
        rows = [r for r in block[EXAMPLES_PER_AUTHOR:] if r["question"] in retain_perturbed]
        retain_eval += [_qa(r, a, retain_perturbed[r["question"]]) for r in rows[:per_author]]
    keep_qas = [_qa(retain_rows[a * AUTHOR_QUESTIONS + i], a, None) for a in range(RETAIN_AUTHORS)
                for i in range(EXAMPLES_PER_AUTHOR)]

    def extra_set(name: str) -> list[QA]:
        base = read_jsonl(tofu / f"{name}.json")
        pert = _perturbed_index(read_jsonl(tofu / f"{name}_perturbed.json"))
        return [_qa(r, -1, pert.get(r["question"])) for r in base if r["question"] in pert]

    return TofuSuite(targets, forget_eval, retain_eval, keep_qas, extra_set("real_authors"),
                     extra_set("world_facts"))


__all__ = ["QA", "TofuSuite", "author_name", "load_suite", "read_jsonl"]
