"""Output guard: check generated text against the active targets' facts (defence in depth).

Why: every policy above depends on the classifier flagging the request; a miss means the model answers freely.
The output guard looks at what actually comes out instead, so a fact that slips through is still caught before
(``hold``) or while (``window``) it streams. It is beyond the papers; it is a product safety net.

Lexical check: the fact's *novel* content words (not function words, and not words the user's prompt already
contains: echoing the question leaks nothing) are looked for in overlapping windows of the output; a window hits
when it recalls at least ``lexical_threshold`` of a fact's novel n-grams (and at least ``min_matched`` of them).
Optional semantic check: sentence-embedding cosine of each window against each fact.

Cost: ``FactIndex`` is built once per target set (the gateway rebuilds it on hot reload) and maps every content
n-gram to the facts that hold it (numpy arrays), so checking a window counts matches with one concatenate and one
``np.bincount`` over the postings of its n-grams, and scores every fact in a few vector operations. A request adds
only its prompt's words (``OutputGuard``).

Stream modes (``StreamGuard``): ``hold`` buffers the whole answer and checks once at the end (nothing leaks, first
byte late); ``window`` holds at most ``every_tokens`` tokens, checks them together with the tail of what was already
released, and releases them only if clean. A fact cut by a release boundary is caught once its second part comes,
so its first few words may be out before the stream ends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from evals.rouge import tokens as words_of
from policies.guard import STOPWORDS, SentenceEncode

StreamMode = Literal["hold", "window"]
Gram = tuple[str, ...]
_WORD_SPAN = re.compile(r"\S+")


@dataclass(frozen=True)
class OutputGuardParams:
    ngram: int = 1
    lexical_threshold: float = 0.5
    min_matched: int = 2  # or every novel n-gram of a fact that has fewer
    window_words: int = 40
    stride_words: int = 20
    semantic_threshold: float | None = None  # e.g. 0.8; None = lexical only


@dataclass(frozen=True)
class Hit:
    target_id: str
    fact: str
    score: float
    kind: Literal["lexical", "semantic"]
    window: str


def content_grams(words: Sequence[str], n: int) -> set[Gram]:
    """n-grams over the content words (function words dropped first, on facts and outputs alike)."""
    content = [w for w in words if w not in STOPWORDS]
    return {tuple(content[i:i + n]) for i in range(len(content) - n + 1)}


def windows(words: Sequence[str], size: int, stride: int) -> list[list[str]]:
    """Overlapping word windows covering all of ``words`` (one window when shorter than ``size``)."""
    if len(words) <= size:
        return [list(words)]
    starts = list(range(0, len(words) - size + 1, max(1, stride)))
    if starts[-1] + size < len(words):
        starts.append(len(words) - size)
    return [list(words[s:s + size]) for s in starts]


@dataclass(frozen=True)
class FactIndex:
    """Facts prepared for checking outputs, independent of any prompt. ``semantic`` holds each fact's embedding
    row and its cosine threshold (inf where the fact's target has no semantic check), when any target has one."""

    facts: tuple[tuple[str, str], ...]  # (target_id, fact)
    grams: tuple[frozenset[Gram], ...]
    sizes: np.ndarray  # (facts,) number of content n-grams of each fact
    postings: Mapping[Gram, np.ndarray]  # n-gram -> indices of the facts holding it
    word_postings: Mapping[str, tuple[int, ...]]  # word -> indices of the facts whose n-grams use it
    ngram: int = 1
    semantic: tuple[torch.Tensor, torch.Tensor] | None = None  # (facts, dim) unit rows, (facts,) thresholds

    @classmethod
    def build(cls, facts_by_target: Mapping[str, Sequence[str]], ngram: int = 1,
              encode: SentenceEncode | None = None,
              semantic_thresholds: Mapping[str, float | None] | None = None) -> FactIndex:
        facts: list[tuple[str, str]] = []
        grams: list[frozenset[Gram]] = []
        for target_id, texts in facts_by_target.items():
            for fact in texts:
                fact_grams = frozenset(content_grams(words_of(fact), ngram))
                if fact_grams:
                    facts.append((target_id, fact))
                    grams.append(fact_grams)
        postings: dict[Gram, list[int]] = {}
        word_postings: dict[str, list[int]] = {}
        for i, fact_grams in enumerate(grams):
            for gram in fact_grams:
                postings.setdefault(gram, []).append(i)
            for word in {w for gram in fact_grams for w in gram}:
                word_postings.setdefault(word, []).append(i)
        semantic = None
        thresholds = semantic_thresholds or {}
        if encode is not None and facts and any(thresholds.get(t) is not None for t, _ in facts):
            limits = [thresholds.get(t) for t, _ in facts]
            semantic = (encode([f for _, f in facts]),
                        torch.tensor([float("inf") if x is None else x for x in limits], dtype=torch.float32))
        return cls(tuple(facts), tuple(grams), np.array([len(g) for g in grams], dtype=np.int64),
                   {g: np.array(v, dtype=np.int64) for g, v in postings.items()},
                   {w: tuple(v) for w, v in word_postings.items()}, ngram, semantic)


class OutputGuard:
    """The facts of a ``FactIndex`` (or a plain mapping target id -> facts) as seen by one request whose user
    said ``prompt``: n-grams using a word of the prompt are not novel and never count."""

    def __init__(self, facts: FactIndex | Mapping[str, Sequence[str]], params: OutputGuardParams | None = None,
                 prompt: str = "", encode: SentenceEncode | None = None):
        self.params = params or OutputGuardParams()
        self.index = facts if isinstance(facts, FactIndex) else FactIndex.build(facts, self.params.ngram)
        self.encode = encode
        self._said = frozenset(words_of(prompt))
        # Novel n-grams per fact; only facts that share a word with the prompt lose any.
        self._novel = self.index.sizes
        touched = {i for word in self._said for i in self.index.word_postings.get(word, ())}
        if touched:
            self._novel = self._novel.copy()
            for i in touched:
                self._novel[i] = sum(1 for g in self.index.grams[i] if self._said.isdisjoint(g))
        self._fact_matrix: torch.Tensor | None = None

    def _lexical(self, window: list[str]) -> Hit | None:
        lists = [self.index.postings[g] for g in content_grams(window, self.index.ngram)
                 if g in self.index.postings and self._said.isdisjoint(g)]
        if not lists:
            return None
        counts = np.bincount(np.concatenate(lists), minlength=len(self.index.facts))
        novel = self._novel  # >= counts: a matched n-gram is novel by construction
        scores = counts / np.maximum(novel, 1)
        passing = (scores >= self.params.lexical_threshold) & (counts >= np.minimum(self.params.min_matched, novel))
        passing &= counts > 0
        if not passing.any():
            return None
        best = int(np.argmax(np.where(passing, scores, -1.0)))
        target_id, fact = self.index.facts[best]
        return Hit(target_id, fact, float(scores[best]), "lexical", " ".join(window))

    def _semantic(self, texts: list[str]) -> Hit | None:
        if self.encode is None or not self.index.facts or not texts:
            return None
        if self.index.semantic is not None:
            matrix, limits = self.index.semantic
        elif self.params.semantic_threshold is not None:
            if self._fact_matrix is None:
                self._fact_matrix = self.encode([f for _, f in self.index.facts])
            matrix, limits = self._fact_matrix, torch.full((len(self.index.facts),), self.params.semantic_threshold)
        else:
            return None
        sims = self.encode(texts) @ matrix.T  # [windows, facts]
        margin = sims - limits[None, :]
        value, flat = margin.flatten().max(dim=0)
        if float(value) < 0:
            return None
        w, f = divmod(int(flat), sims.shape[1])
        target_id, fact = self.index.facts[f]
        return Hit(target_id, fact, float(sims[w, f]), "semantic", texts[w])

    def check(self, text: str) -> Hit | None:
        """The first lexical hit over the windows of ``text``, else the strongest semantic one, or None."""
        chunks = windows(words_of(text), self.params.window_words, self.params.stride_words)
        for chunk in chunks:
            if hit := self._lexical(chunk):
                return hit
        return self._semantic([" ".join(c) for c in chunks if c])


class StreamGuard:
    """Applies an ``OutputGuard`` to a stream of text deltas (one per token) in ``hold`` or ``window`` mode.

    ``push`` returns the text that may be released now; ``finish`` checks what is left and returns the rest.
    ``hit`` is set once a check fails, after which nothing more is released (the caller ends the stream with an
    error frame or the refusal). Released text always ends at a word boundary, so no word is ever split between
    a released part and a checked part.
    """

    def __init__(self, guard: OutputGuard, mode: StreamMode = "window", every_tokens: int = 16):
        self.guard = guard
        self.mode = mode
        self.every_tokens = max(1, every_tokens)
        self.hit: Hit | None = None
        self._text = ""
        self._released = 0  # characters of _text already released
        self._released_words: list[int] = []  # start offsets of the released words (the overlap's source)
        self._pending_tokens = 0

    def push(self, delta: str) -> str:
        if self.hit is not None or not delta:
            return ""
        self._text += delta
        self._pending_tokens += 1
        if self.mode == "hold" or self._pending_tokens < self.every_tokens:
            return ""
        self._pending_tokens = 0
        boundary = self._last_boundary()
        return self._checked(boundary) if boundary > self._released else ""

    def finish(self) -> str:
        """Final check over what was not released yet (with the released tail as context)."""
        if self.hit is not None:
            return ""
        return self._checked(len(self._text))

    def _last_boundary(self) -> int:
        """End of the last whole word: text after it may still grow into a longer word."""
        cut = max(self._text.rfind(" "), self._text.rfind("\n"))
        return cut + 1 if cut >= 0 else 0

    def _checked(self, until: int) -> str:
        """Check ``_text[:until]`` from the start of the overlap (the last ``window_words`` released words) and
        release the unreleased part of it if clean."""
        overlap = self.guard.params.window_words
        start = self._released_words[-overlap] if len(self._released_words) >= overlap else 0
        if (hit := self.guard.check(self._text[start:until])) is not None:
            self.hit = hit
            return ""
        out = self._text[self._released:until]
        self._released_words += [m.start() for m in _WORD_SPAN.finditer(self._text, self._released, until)]
        del self._released_words[:-overlap]
        self._released = until
        return out


__all__ = ["FactIndex", "Hit", "OutputGuard", "OutputGuardParams", "StreamGuard", "StreamMode", "content_grams",
           "windows"]
