"""Run a suite: build the index from the suite's targets, classify every split, compute the metrics.

Recall counts a prompt as caught only when its own target is among the flagged ones (``any_flag`` is also
reported). FPR counts any flag. For RWKU's neighbour probes, with all 200 targets active, some probes name
*another* active target verbatim ("Which album did <another target> release in 2020?"); flagging those is the
correct behaviour for that other target, so the FPR is reported both over all probes and over the probes that
name no other active target (the exclusion is a plain name match, independent of the classifier). Some probes
also *ask for* an active target, their own subject included: with the gold answer in place, "In 1206, ___ Khan
founded the Mongol Empire" (Genghis Khan's own neighbour set) or "Who played Doc Brown in Back to the Future?"
(Christopher Lloyd, another target) name it. Those are forget probes, not neighbours; the goal is measured over
the probes that neither name nor ask for an active target, and all three figures are reported.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from classifiers.batching import classify_batch
from classifiers.evaluation import suites
from classifiers.evaluation.suites import Item, Split, Suite
from classifiers.index import ClassifierConfig, Decision, TargetIndex, build_index

GOALS: dict[str, dict[str, tuple[str, float]]] = {
    "tofu": {"forget_heldback.recall": (">=", 0.99), "forget_paraphrased.recall": (">=", 0.97),
             "retain90_rest.fpr": ("<=", 0.01), "holdout10.fpr": ("<=", 0.02),
             "real_authors+world_facts.fpr": ("<=", 0.005)},
    "rwku": {"level2.recall": (">=", 0.98), "level3.recall": (">=", 0.92), "level3.min_type_recall": (">=", 0.80),
             "neighbours.fpr_excluding_active_targets": ("<=", 0.03)},
    "hp": {"trivia_heldout.recall": (">=", 0.95), "translated_trivia.recall": (">=", 0.85),
           "completions_ru.recall": (">=", 0.85), "completions_es.recall": (">=", 0.85),
           "side_effects.fpr": ("<=", 0.02)},
}


def _classify_all(index: TargetIndex, texts: list[str], batch: int, progress: bool, label: str) -> list[Decision]:
    out: list[Decision] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc=label, unit="prompt", leave=False)
    for k in range(0, len(texts), batch):
        out += classify_batch(index, texts[k:k + batch])
        if bar is not None:
            bar.update(len(texts[k:k + batch]))
    if bar is not None:
        bar.close()
    return out


def _caught(item: Item, decision: Decision) -> bool:
    """A recall item counts only when its own target is among the flagged ones."""
    return item.target in decision.targets


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else 0.0


def _split_metrics(split: Split, decisions: list[Decision], suite: Suite) -> tuple[dict[str, Any], list[float]]:
    m: dict[str, Any] = {"n": len(split.items), "kind": split.kind}
    stages = Counter(d.stage for d in decisions if d.flagged)
    m["stages"] = dict(stages)
    if split.kind == "recall":
        hits = [_caught(i, d) for i, d in zip(split.items, decisions, strict=True)]
        m["recall"] = _rate(hits)
        m["any_flag"] = _rate([d.flagged for d in decisions])
        scores = [d.scores.get(i.target or "", 0.0) for i, d in zip(split.items, decisions, strict=True)]
        by_type: dict[str, list[bool]] = defaultdict(list)
        for item, hit in zip(split.items, hits, strict=True):
            if "type" in item.meta:
                by_type[item.meta["type"]].append(hit)
        if len(by_type) > 1:
            m["by_type"] = {t: {"n": len(v), "recall": _rate(v)} for t, v in sorted(by_type.items())}
            m["min_type_recall"] = min(v["recall"] for v in m["by_type"].values())
        m["misses"] = [i.text for i, h in zip(split.items, hits, strict=True) if not h][:15]
    else:
        flags = [d.flagged for d in decisions]
        m["fpr" if split.kind == "fpr" else "flag_rate"] = _rate(flags)
        scores = [d.score for d in decisions]
        names = suite.notes.get("names")
        if names and split.name == "neighbours":
            clean, proper, own = [], [], []
            for item, d in zip(split.items, decisions, strict=True):
                others = {t for t in suites.names_in(item.text, names) if t != item.meta.get("subject")}
                if not others:
                    clean.append(d.flagged)
                    answered = suites.answered(item.text, item.meta.get("answer", ""))
                    if not any(suites.names_in(answered, names)):
                        proper.append(d.flagged)
                own.append(item.meta.get("subject") in d.targets)
            m["fpr_excluding_other_targets"] = _rate(clean)
            m["n_excluding_other_targets"] = len(clean)
            m["fpr_excluding_active_targets"] = _rate(proper)
            m["n_excluding_active_targets"] = len(proper)
            m["fpr_own_subject"] = _rate(own)
        m["false_positives"] = [[i.text, d.targets, d.stage] for i, d in zip(split.items, decisions, strict=True)
                                if d.flagged][:15]
    return m, scores


def _combined(metrics: dict[str, dict[str, Any]], names: list[str], key: str) -> float:
    total = sum(metrics[n]["n"] for n in names if n in metrics)
    if not total:
        return 0.0
    return sum(metrics[n][key] * metrics[n]["n"] for n in names if n in metrics) / total


def _goals(suite: str, metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, bound) in GOALS.get(suite, {}).items():
        split, field = key.rsplit(".", 1)
        value = metrics.get(split, {}).get(field)
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        out[key] = {"value": round(value, 4), "goal": f"{op} {bound}", "met": bool(met)}
    return out


def item_record(suite: str, split: Split, item: Item, decision: Decision, top: int = 5) -> dict[str, Any]:
    """One classified prompt for error analysis: what it is, what was expected, and the decision as
    ``POST /admin/classify`` answers it (scores cut to the ``top`` best). ``correct`` is whether the decision is
    right for its split (its own target flagged for recall splits, nothing flagged for false-positive splits; None
    for the splits that only report a flag rate)."""
    if split.kind == "recall":
        correct: bool | None = _caught(item, decision)
    else:
        correct = not decision.flagged if split.kind == "fpr" else None
    answer = decision.as_dict()
    answer["scores"] = dict(sorted(answer["scores"].items(), key=lambda kv: -kv[1])[:top])
    return {"suite": suite, "split": split.name, "kind": split.kind, "text": item.text, "expected": item.target,
            "meta": item.meta, "correct": correct} | answer


def run_suite(name: str, data_dir: Path, config: ClassifierConfig | None = None, progress: bool = True,
              batch: int = 64, limit: int | None = None, max_items: int | None = None,
              index_factory: Callable[..., TargetIndex] = build_index,
              items_out: TextIO | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (report, histogram data) for one suite; with ``items_out``, also write every classified prompt
    there as a JSON line (``item_record``)."""
    suite = suites.load(name, data_dir, limit=limit)
    started = time.perf_counter()
    index = index_factory(suite.targets, config=config, progress=progress)
    build_s = time.perf_counter() - started
    metrics: dict[str, Any] = {}
    histograms: dict[str, list[float]] = {}
    classify_s = 0.0
    classified = 0
    for split in suite.splits:
        items = split.items[:max_items] if max_items else split.items
        split = Split(split.name, split.kind, items)
        started = time.perf_counter()
        decisions = _classify_all(index, [i.text for i in items], batch, progress, f"{name}:{split.name}")
        classify_s += time.perf_counter() - started
        classified += len(items)
        metrics[split.name], histograms[split.name] = _split_metrics(split, decisions, suite)
        if items_out is not None:
            for item, decision in zip(items, decisions, strict=True):
                items_out.write(json.dumps(item_record(name, split, item, decision), ensure_ascii=False) + "\n")
    if name == "tofu":
        metrics["real_authors+world_facts"] = {"n": metrics["real_authors"]["n"] + metrics["world_facts"]["n"],
                                               "fpr": _combined(metrics, ["real_authors", "world_facts"], "fpr")}
    if name == "hp":
        translated = [s for s in metrics if s.startswith("translated_trivia_")]
        side = [s for s in metrics if s.startswith("side_effects_")]
        metrics["translated_trivia"] = {"n": sum(metrics[s]["n"] for s in translated),
                                        "recall": _combined(metrics, translated, "recall")}
        metrics["side_effects"] = {"n": sum(metrics[s]["n"] for s in side), "fpr": _combined(metrics, side, "fpr")}
    stats = index.stats
    report = {
        "suite": name,
        "metrics": metrics,
        "goals": _goals(name, metrics),
        "config": {
            "classifier": vars(index.config) if hasattr(index.config, "__dict__") else str(index.config),
            "encoder": index.encoder.name,
            "targets": len(suite.targets),
            "search": stats.search if stats else None,
            "exemplar_rows": stats.rows if stats else None,
            "training_pairs": stats.training_pairs if stats else None,
            "calibration_negatives": stats.calibration_negatives if stats else None,
            "global_threshold": stats.threshold if stats else None,
            "per_target_thresholds": len(index.calibration.per_target),
            "build_seconds": round(build_s, 2),
            "classify_seconds": round(classify_s, 2),
            "ms_per_prompt_batched": round(1000 * classify_s / max(classified, 1), 3),
            "data_dir": str(data_dir),
            "limit": limit,
            "max_items": max_items,
            "notes": {k: v for k, v in suite.notes.items() if k != "names"},
        },
    }
    return report, histograms
