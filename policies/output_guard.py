"""Output guard: check generated text against the active targets' facts (defence in depth).

Why: every policy above depends on the classifier flagging the request; a miss means the model answers freely.
The output guard looks at what actually comes out instead, so a fact that slips through is still caught before
(``hold``) or while (``window``) it streams. It is beyond the papers; it is a product safety net.

Lexical check: the fact's *novel* content words (not function words, and not words the user's prompt already
contains: echoing the question leaks nothing) are looked for in overlapping windows of the output; a window hits
when it recalls at least ``lexical_threshold`` of a fact's novel n-grams (and at least ``min_matched`` of them).
Optional semantic check: sentence-embedding cosine of each window against each fact.

Stream modes: ``hold`` buffers the whole answer and checks once at the end (nothing leaks, first byte late);
``window`` releases text as it comes and re-checks the last window every ``every_words`` words (a few words of a
fact may be out before the hit ends the stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from evals.rouge import tokens as words_of
from policies.guard import STOPWORDS, SentenceEncode

StreamMode = Literal["hold", "window"]


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


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def windows(words: Sequence[str], size: int, stride: int) -> list[list[str]]:
    """Overlapping word windows covering all of ``words`` (one window when shorter than ``size``)."""
    if len(words) <= size:
        return [list(words)]
    starts = list(range(0, len(words) - size + 1, max(1, stride)))
    if starts[-1] + size < len(words):
        starts.append(len(words) - size)
    return [list(words[s:s + size]) for s in starts]


@dataclass
class OutputGuard:
    """The active targets' facts, prepared for checking outputs of one request (``prompt`` = what the user said)."""

    facts_by_target: Mapping[str, Sequence[str]]
    params: OutputGuardParams = field(default_factory=OutputGuardParams)
    prompt: str = ""
    encode: SentenceEncode | None = None

    def __post_init__(self) -> None:
        said = set(words_of(self.prompt))
        n = self.params.ngram
        self._facts: list[tuple[str, str, set[tuple[str, ...]]]] = []
        for target_id, facts in self.facts_by_target.items():
            for fact in facts:
                novel = [w for w in words_of(fact) if w not in STOPWORDS and w not in said]
                grams = _ngrams(novel, n)
                if grams:
                    self._facts.append((target_id, fact, grams))
        self._fact_matrix: torch.Tensor | None = None

    def _lexical(self, window: list[str]) -> Hit | None:
        grams = _ngrams(window, self.params.ngram)
        if self.params.ngram == 1:  # function words never count; the window keeps them only for n > 1
            grams = {g for g in grams if g[0] not in STOPWORDS}
        best: Hit | None = None
        for target_id, fact, fact_grams in self._facts:
            matched = len(fact_grams & grams)
            score = matched / len(fact_grams)
            if (score >= self.params.lexical_threshold and matched >= min(self.params.min_matched, len(fact_grams))
                    and (best is None or score > best.score)):
                best = Hit(target_id, fact, score, "lexical", " ".join(window))
        return best

    def _semantic(self, texts: list[str]) -> Hit | None:
        if self.encode is None or self.params.semantic_threshold is None or not self._facts or not texts:
            return None
        if self._fact_matrix is None:
            self._fact_matrix = self.encode([f for _, f, _ in self._facts])
        sims = self.encode(texts) @ self._fact_matrix.T  # [windows, facts]
        value, flat = sims.flatten().max(dim=0)
        if float(value) < self.params.semantic_threshold:
            return None
        w, f = divmod(int(flat), sims.shape[1])
        target_id, fact, _ = self._facts[f]
        return Hit(target_id, fact, float(value), "semantic", texts[w])

    def check(self, text: str) -> Hit | None:
        """The strongest hit over the windows of ``text``, or None."""
        chunks = windows(words_of(text), self.params.window_words, self.params.stride_words)
        for chunk in chunks:
            if hit := self._lexical(chunk):
                return hit
        return self._semantic([" ".join(c) for c in chunks if c])


class StreamGuard:
    """Applies an ``OutputGuard`` to a stream of text deltas in ``hold`` or ``window`` mode.

    ``push`` returns the text that may be released now; ``hit`` is set once a check fails, after which nothing
    more is released (the caller ends the stream with an error frame or the refusal).
    """

    def __init__(self, guard: OutputGuard, mode: StreamMode = "window", every_words: int = 8):
        self.guard = guard
        self.mode = mode
        self.every_words = every_words
        self.hit: Hit | None = None
        self._text = ""
        self._released = 0
        self._checked_words = 0

    def push(self, delta: str) -> str:
        if self.hit is not None:
            return ""
        self._text += delta
        if self.mode == "hold":
            return ""
        n_words = len(words_of(self._text))
        if n_words - self._checked_words >= self.every_words:
            self._checked_words = n_words
            tail = " ".join(words_of(self._text)[-self.guard.params.window_words:])
            if (hit := self.guard.check(tail)) is not None:
                self.hit = hit
                return ""
        return self._release()

    def finish(self) -> str:
        """Final check over everything; returns the rest of the text (empty on a hit)."""
        if self.hit is None:
            self.hit = self.guard.check(self._text)
        return "" if self.hit is not None else self._release()

    def _release(self) -> str:
        out = self._text[self._released:]
        self._released = len(self._text)
        return out


__all__ = ["Hit", "OutputGuard", "OutputGuardParams", "StreamGuard", "StreamMode", "windows"]
