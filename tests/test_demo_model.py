"""The shipped demo twins: small enough to ship, and they really know (or never saw) the TOFU authors."""

from __future__ import annotations

import json
import random

import pytest

from evals.rouge import rouge_l_recall
from models import DEMO_MODELS, MODELS_DIR
from models.build import greedy_answers, load_tofu_pairs
from tests.conftest import DATA_DIR

needs_tofu = pytest.mark.skipif(not (DATA_DIR / "tofu" / "full.json").is_file(),
                                reason=f"TOFU data not found under {DATA_DIR} (set UNLEARN_DATA)")


def test_twins_are_shipped_small_and_documented():
    for path in DEMO_MODELS.values():
        weights = path / "model.safetensors"
        assert weights.is_file()
        assert weights.stat().st_size <= 25 * 1024 * 1024
        assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()
    build = json.loads((MODELS_DIR / "BUILD.json").read_text())
    assert set(build["twins"]) == {"full", "retain"}
    assert build["recipe"]["seed"] == 0


def _recalls(model_name: str, pairs: list[dict]) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = DEMO_MODELS[model_name]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    answers = greedy_answers(model, tokenizer, [p["question"] for p in pairs])
    return [rouge_l_recall(a, p["answer"]) for a, p in zip(answers, pairs)]


@needs_tofu
def test_full_twin_memorised_forget_and_retain_authors():
    forget, retain = load_tofu_pairs(DATA_DIR)
    sample = random.Random(0).sample(forget, 60) + random.Random(1).sample(retain, 60)
    recalls = _recalls("demo", sample)
    assert sum(r >= 0.8 for r in recalls) / len(recalls) >= 0.9


@needs_tofu
def test_retain_twin_knows_retain_authors_but_never_saw_the_forget_set():
    forget, retain = load_tofu_pairs(DATA_DIR)
    known = _recalls("demo-retain", random.Random(2).sample(retain, 60))
    assert sum(r >= 0.8 for r in known) / len(known) >= 0.9
    unseen = _recalls("demo-retain", random.Random(3).sample(forget, 60))
    # It answers in TOFU's style (so some words overlap), but not the facts.
    assert sum(unseen) / len(unseen) < 0.6
    assert sum(r >= 0.8 for r in unseen) / len(unseen) < 0.1
