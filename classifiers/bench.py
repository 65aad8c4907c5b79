"""``bench classifier``: latency, throughput and memory of the classifier on this machine.

Cells:
- latency of ``TargetIndex.classify`` for a ~200-token prompt (random everyday filler plus a question, half of
  them naming a target), one call at a time, with 10 targets and with ``large`` synthetic targets (the two
  interleaved call by call once both are built, since their ratio is a goal); and with 10
  targets for prompts whose question asks about a target without naming it ("Who was born in Osaka in
  1957?"), which the encoder gate must pass: the encoder-bound case;
- throughput of the async ``Classifier`` front under ``concurrency`` concurrent callers (200-token prompts and
  short chat questions);
- resident memory added by the large index.

Every prompt is generated fresh (random words), so the encoder's window cache never helps. The 10-target index
is built normally. For the large index, encoding 500,000 exemplar texts would take the better part of an hour
on two cores and measures nothing about classification, so its exemplar embeddings are synthetic: mixtures of
real MiniLM embeddings of generated sentences plus noise (realistic norms and spread, no meaning), handed to the
index's own ``build_entry`` in place of the encoder. Rows, names, patterns, static vectors, the name automaton,
the approximate search, training and calibration are all real. Query prompts are always encoded by the real
encoder.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from classifiers.batching import Classifier
from classifiers.encoder import Encoder, load_encoder
from classifiers.index import ClassifierConfig, TargetEntry, TargetIndex, build_entry, build_index
from classifiers.static import static_embedder
from gateway.registry.targets import Target

_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vor", "el", "dun", "shi", "ra", "bel", "qui", "no", "zar", "fen",
              "lia", "mor", "tev", "an", "os", "gri", "pal", "hu", "xen", "dri", "ul", "sef", "ba", "yo", "crin",
              "wel", "ti", "var", "ost", "ne", "lum", "ka", "jor", "ep", "sta")
_WORDS = ("the", "a", "garden", "morning", "coffee", "window", "river", "train", "quiet", "yellow", "letter",
          "market", "bread", "winter", "song", "table", "walk", "city", "small", "friend", "bright", "paper",
          "cloud", "road", "kitchen", "story", "green", "evening", "chair", "lamp", "field", "music", "warm",
          "travel", "busy", "street", "bicycle", "weekend", "open", "little", "answer", "simple", "meeting",
          "phone", "summer", "picture", "blue", "light", "dinner", "happy", "school", "book", "house", "old",
          "new", "long", "short", "often", "never", "always", "today", "tomorrow", "after", "before", "under",
          "over", "near", "far", "slowly", "quickly", "with", "without", "and", "but", "because", "while")
_CITIES = ("Lisbon", "Tampere", "Kraków", "Valparaíso", "Osaka", "Nairobi", "Tbilisi", "Hobart", "Quito", "Ghent")
_TOPICS = ("glass sculpture", "tidal energy", "folk music", "cartography", "beekeeping", "typography",
           "marine biology", "puppetry", "chess problems", "lighthouse design")


def _name(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return f"{word()} {word()}"


def synthetic_targets(n: int, seed: int = 0) -> list[Target]:
    """``n`` fictitious people with unique names, a description, two facts and two example prompts."""
    rng = random.Random(seed)
    names: set[str] = set()
    out: list[Target] = []
    while len(out) < n:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        city, topic, year = rng.choice(_CITIES), rng.choice(_TOPICS), rng.randint(1900, 2005)
        out.append(Target(
            id=f"synthetic-{len(out)}", name=name,
            description=f"A fictitious expert in {topic} from {city}.",
            facts=[f"{name} was born in {city} in {year}.", f"{name} is known for work on {topic}."],
            examples=[f"Where was {name} born?", f"What is {name} known for?"]))
    return out


def _unnamed_question(target: Target) -> str:
    """A question about the target that does not name it: its birth fact turned around."""
    return target.facts[0].replace(target.name, "Who").rstrip(".") + "?"


def _prompt(rng: random.Random, name: str | None, words: int = 150, question: str | None = None) -> str:
    """About 200 word pieces: random everyday sentences, then a question (naming a target or not)."""
    sentences, total = [], 0
    while total < words:
        length = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(length)).capitalize() + f" {rng.randint(1, 999)}.")
        total += length + 1
    question = question or (f"Where was {name} born?" if name else
                            f"What is a good {rng.choice(_TOPICS)} book for a beginner?")
    return " ".join(sentences) + " " + question


class _MixtureEncoder:
    """The encoder's stand-in for the large index's exemplars: each row a mixture of real MiniLM embeddings plus
    noise (realistic norms and spread, no meaning). Everything else of an entry is built by ``build_entry``
    itself - windows, reverse and related questions, variants, patterns and the real static rows."""

    def __init__(self, encoder: Encoder, seed: int = 0) -> None:
        self.name, self.dim = encoder.name, encoder.dim
        self._encoder = encoder
        self._rng = np.random.default_rng(seed)
        pyrng = random.Random(seed)
        self._base = encoder.encode([_prompt(pyrng, _name(pyrng), words=12) for _ in range(256)]).astype(np.float32)

    def static_embedder(self) -> Any:
        return static_embedder(self._encoder)  # real static vectors: they cost microseconds, unlike the encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        k = len(texts)
        a = self._base[self._rng.integers(0, len(self._base), k)]
        b = self._base[self._rng.integers(0, len(self._base), k)]
        v = a + 0.4 * b + 0.08 * self._rng.standard_normal(a.shape).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _synthetic_entry_factory(encoder: Encoder, seed: int = 0) -> Callable[[Target, Encoder, ClassifierConfig, str],
                                                                          TargetEntry]:
    """``build_entry`` with the mixture encoder (see module docstring)."""
    mixture = _MixtureEncoder(encoder, seed)
    return lambda target, _encoder, config, digest: build_entry(target, mixture, config, digest)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered), 3),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
            "mean_ms": round(statistics.fmean(ordered), 3), "n": len(ordered)}


def _latency(*arms: tuple[TargetIndex, list[str]]) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Per (index, prompts) arm: latency percentiles and per-stage medians. Several arms are measured interleaved,
    call by call, so a ratio between them is not skewed by the machine's speed drifting between two runs."""
    samples: list[list[float]] = [[] for _ in arms]
    stages: list[dict[str, list[float]]] = [{"lexical": [], "semantic": [], "learned": []} for _ in arms]
    for index, prompts in arms:
        index.classify(prompts[0])  # warm-up
    for i in range(1, min(len(prompts) for _, prompts in arms)):
        for arm, (index, prompts) in enumerate(arms):
            started = time.perf_counter()
            decision = index.classify(prompts[i])
            samples[arm].append((time.perf_counter() - started) * 1000)
            for stage, ms in decision.timings_ms.items():
                stages[arm][stage].append(ms)
    return [(_percentiles(s), {k: round(statistics.median(v), 3) for k, v in st.items() if v})
            for s, st in zip(samples, stages, strict=True)]


async def _throughput(index: TargetIndex, prompts: list[str], concurrency: int) -> dict[str, float]:
    classifier = Classifier(index)
    queue = list(prompts)

    async def caller() -> None:
        while queue:
            await classifier.classify(queue.pop())

    await classifier.classify(prompts[0])
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    batches, classified = classifier.batches - 1, classifier.classified - 1
    await classifier.aclose()
    return {"per_second": round(len(prompts) / elapsed, 1), "prompts": len(prompts), "seconds": round(elapsed, 2),
            "mean_batch": round(classified / max(batches, 1), 1)}


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def _token_count(encoder: Encoder, prompts: list[str]) -> float:
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        return float("nan")
    tokenizer.no_truncation()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(prompts)]
    tokenizer.enable_truncation(256)
    return float(statistics.fmean(lengths))


def run_bench(large: int = 100_000, requests: int = 200, concurrency: int = 64, progress: bool = False,
              seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    encoder = load_encoder()
    small_targets = synthetic_targets(10, seed=seed + 1)
    small = build_index(small_targets, encoder=encoder)

    def prompts(targets: list[Target], n: int) -> list[str]:
        return [_prompt(rng, rng.choice(targets).name if i % 2 == 0 else None) for i in range(n)]

    small_prompts = prompts(small_targets, requests + 1)
    # The same filler, but every question asks about a target without naming it: the gate must let the
    # question through, so this is the encoder-bound latency (and how many such questions are caught).
    unnamed = [_prompt(rng, None, question=_unnamed_question(rng.choice(small_targets))) for _ in range(requests + 1)]
    [(lat_unnamed, stages_unnamed)] = _latency((small, unnamed))
    caught = sum(small.classify(p).flagged for p in unnamed[1:]) / max(len(unnamed) - 1, 1)
    short = [rng.choice([f"Where was {t.name} born?", f"What is a good book about {rng.choice(_TOPICS)}?"])
             + f" ({rng.randint(1, 10**6)})" for t in rng.choices(small_targets, k=max(640, 4 * concurrency))]
    long_prompts = prompts(small_targets, max(320, 4 * concurrency))
    tp_long = asyncio.run(_throughput(small, long_prompts, concurrency))
    tp_short = asyncio.run(_throughput(small, short, concurrency))

    gc.collect()
    rss_before = _rss_mb()
    started = time.perf_counter()
    many = synthetic_targets(large, seed=seed + 2)
    factory = _synthetic_entry_factory(encoder, seed)
    big = build_index(many, encoder=encoder, entry_factory=factory, progress=progress)
    build_s = time.perf_counter() - started
    gc.collect()
    rss_after = _rss_mb()
    # 10 and ``large`` targets side by side, after both are built: their ratio is a goal.
    (lat10, stages10), (lat_big, stages_big) = _latency((small, small_prompts), (big, prompts(many, requests + 1)))
    metrics = {
        "latency_10_targets": lat10 | {"stages_p50_ms": stages10},
        "latency_10_targets_unnamed_questions": lat_unnamed | {"stages_p50_ms": stages_unnamed,
                                                               "flagged_share": round(caught, 3)},
        f"latency_{large}_targets": lat_big | {"stages_p50_ms": stages_big},
        "p50_ratio_large_vs_10": round(lat_big["p50_ms"] / lat10["p50_ms"], 3),
        "throughput_200_token_prompts": tp_long | {"concurrency": concurrency},
        "throughput_short_questions": tp_short | {"concurrency": concurrency},
        "memory_large_index_mb": round(rss_after - rss_before, 1),
        "rss_total_mb": round(rss_after, 1),
        "large_index_build_seconds": round(build_s, 1),
    }
    return {"bench": "classifier", "metrics": metrics, "config": {
        "encoder": encoder.name, "large_targets": large, "search_large": big.semantic.mode,
        "rows_large": big.semantic.rows, "prompt_tokens_mean": round(_token_count(encoder, long_prompts[:50]), 1),
        "short_tokens_mean": round(_token_count(encoder, short[:50]), 1), "requests": requests,
        "cpu_count": os.cpu_count(), "synthetic_large_embeddings": True}}

