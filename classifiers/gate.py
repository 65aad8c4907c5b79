"""Which windows are worth the sentence encoder.

Why: the encoder is the classifier's whole cost (about 4 ms for even a one-line window on two cores), while
most of a long prompt is text that has nothing to do with any target: pasted documents, small talk, code. Three
checks, cheapest first, each costing the same at 10 or 100,000 targets:
1. a target named in the conversation is decided by its name (the lexical stage), so its words open nothing -
   unless it has keep prompts, whose check needs the window's embedding;
2. a window must share a distinctive word with some target's name, description, facts or examples (function
   words and words a large share of the targets use are not distinctive; a word written only inside someone's
   full name does not count for a target whose own name merely shares it);
3. its static vector (``classifiers.static``, a table look-up per word) must come within a calibrated threshold
   of one of those targets' exemplar rows. The threshold is the ``static_gate_miss`` quantile of the operator's
   own unnamed positives (masked example prompts, reverse questions) against their target's *other* rows.

Trade-off, measured in the README: a paraphrase that replaces every content word of the target's material
(and any language the facts are not written in) is only seen by the lexical stage. ``ClassifierConfig.gate``
turns the gate off, ``ClassifierConfig.static_gate`` its third check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from classifiers.static import StaticEmbedder, words

# Our own list of English function words and very common verbs (no distinctive content).
STOPWORDS = frozenset("""
    a as about above after again against all also am an and any are at be because been before being below
    between both but by can could did do does doing done down during each else ever every few for from further
    get gets got had has have having he her here hers herself him himself his how however i if in into is it its
    itself just know known let like made make many may me might more most much must my myself near never new no
    nor not now of off often on once one only or other our ours ourselves out over own please same say says she
    should so some such tell than that the their theirs them themselves then there these they this those through
    to too under until up upon us use used very was we were what when where which while who whom whose why will
    with within without would yes yet you your yours yourself yourselves name named called first last well way
    two three
""".split())


def content_words(texts: Iterable[str]) -> set[str]:
    """Normalised words of three or more characters that are not function words."""
    found: set[str] = set()
    for text in texts:
        found.update(distinctive(words(text)))
    return found


def distinctive(all_words: Iterable[str]) -> set[str]:
    return {word for word in all_words if len(word) >= 3 and word not in STOPWORDS}


STATIC_MAX_ROWS = 20_000  # a static check over more candidate rows costs about as much as encoding the window


class GateEntry(Protocol):
    """What the gate reads of a target entry."""

    vocabulary: Sequence[str]  # distinct words
    name_words: Sequence[str]  # the words of its own name and aliases
    static_rows: np.ndarray  # float16 (rows, STATIC_DIM): static vectors of the target's exemplar rows


class EncoderGate:
    """Which windows of a prompt go to the sentence encoder.

    A window is encoded when it mentions a target whose decision needs the encoder (a surname alone, or a name
    of a target with keep prompts), or when it shares a distinctive word with some target *and* its static
    vector (``classifiers.static``) comes within ``threshold`` of one of those targets' exemplar rows. The
    words of a target named in the window do not count for that target: its name already decides it.

    ``threshold`` is calibrated at build time on the operator's own positives (each target's unnamed prompt
    variants against its other rows), so that a set share of them still passes; see ``calibrate_threshold``.
    """

    def __init__(self, vocabulary: Mapping[str, int], entries: Sequence[GateEntry], limit: float,
                 static: StaticEmbedder | None, threshold: float = -math.inf) -> None:
        postings: dict[str, list[int]] = {}
        for t, entry in enumerate(entries):
            for word in entry.vocabulary:
                if vocabulary.get(word, 0) <= limit:
                    postings.setdefault(word, []).append(t)
        self.postings = {word: tuple(targets) for word, targets in postings.items()}  # tuples: no spare room
        # Per distinctive word, the targets whose own name holds it: a word written inside someone else's full
        # name opens nothing for them (see ``select``).
        name_postings: dict[str, set[int]] = {}
        for t, entry in enumerate(entries):
            for word in entry.name_words:
                if word in self.postings:
                    name_postings.setdefault(word, set()).add(t)
        self.name_postings = {word: frozenset(targets) for word, targets in name_postings.items()}
        self.static = static
        self.threshold = threshold
        # The entries' own arrays, not one concatenated copy: at 100,000 targets a copy would cost 64 MB more.
        self.row_count = np.array([len(e.static_rows) for e in entries], dtype=np.int64)
        usable = static is not None and len(entries) > 0 and bool(self.row_count.all())
        self.static_rows: list[np.ndarray] | None = [e.static_rows for e in entries] if usable else None
        # Static rows behind each word whose targets alone exceed STATIC_MAX_ROWS: a window with such a word is
        # encoded without uniting postings of thousands of targets (most of select's cost at 100,000 targets).
        self.wide_rows: dict[str, int] = {}
        most_rows = int(self.row_count.max(initial=0))
        for word, targets in self.postings.items():
            if len(targets) * most_rows > STATIC_MAX_ROWS:  # cheap bound first: most words have few targets
                rows = int(self.row_count[list(targets)].sum())
                if rows > STATIC_MAX_ROWS:
                    self.wide_rows[word] = rows

    def candidates(self, text_words: Iterable[str], exclude: Iterable[int] = ()) -> set[int]:
        """Targets sharing a distinctive word with a text given as its normalised words."""
        found: set[int] = set()
        for word in distinctive(text_words):
            found.update(self.postings.get(word, ()))
        return found.difference(exclude)

    def closest(self, vectors: np.ndarray, targets: Sequence[set[int]]) -> np.ndarray:
        """Per static window vector, its best similarity to the rows of its candidate targets."""
        assert self.static_rows is not None
        out = np.full(len(vectors), -1.0, np.float32)
        for w, chosen in enumerate(targets):
            if not chosen:
                continue
            ids = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
            if self.row_count[ids].sum() > STATIC_MAX_ROWS:
                out[w] = math.inf  # comparing would cost about what encoding does: let the encoder decide
                continue
            rows = np.concatenate([self.static_rows[t] for t in chosen]).astype(np.float32)
            out[w] = float((rows @ vectors[w]).max())
        return out

    def select(self, texts: Sequence[str], forced: Sequence[bool], exclude: set[int],
               in_names: Sequence[frozenset[str]] | None = None) -> list[bool]:
        """Per window: encode it? ``forced`` windows always are; ``exclude``: targets the names decide;
        ``in_names``: per window, the words it only uses inside full names written in it, which count only for
        targets whose own name does not hold them.

        The same decision as ``candidates`` then ``closest`` per window, without building a candidate set
        where the answer does not need one: with the static check off only "any candidate left?" matters, and a
        word whose targets hold more than ``STATIC_MAX_ROWS`` rows passes the static check anyway."""
        static_check = self.static_rows is not None and self.threshold != -math.inf
        excluded_rows = int(self.row_count[list(exclude)].sum()) if exclude else 0
        keep = list(forced)
        check: list[int] = []
        check_words: list[list[str]] = []
        check_targets: list[set[int]] = []
        for w, (text, f) in enumerate(zip(texts, forced, strict=True)):
            if f:
                continue
            text_words = words(text)
            name_only = in_names[w] if in_names is not None else frozenset()
            hits: list[tuple[str, Sequence[int]]] = []
            for word in distinctive(text_words):
                targets = self.postings.get(word)
                if targets is None:
                    continue
                if word in name_only and word in self.name_postings:
                    owners = self.name_postings[word]
                    targets = [t for t in targets if t not in owners]
                    if not targets:
                        continue
                hits.append((word, targets))
            if not any(len(targets) > len(exclude) or not exclude.issuperset(targets) for _, targets in hits):
                continue  # no candidate target left
            if not static_check or any(word not in name_only and self.wide_rows.get(word, 0) - excluded_rows >
                                       STATIC_MAX_ROWS for word, _ in hits):
                keep[w] = True
                continue
            check.append(w)
            check_words.append(text_words)
            check_targets.append(set().union(*(targets for _, targets in hits)).difference(exclude))
        if check:
            vectors = self.static.embed_words(check_words)  # type: ignore[union-attr]
            for w, sim in zip(check, self.closest(vectors, check_targets), strict=True):
                keep[w] = bool(sim >= self.threshold)
        return keep

    def calibrate_threshold(self, positives: Sequence[tuple[int, int, str]], miss: float) -> float:
        """The ``miss`` quantile of the best static similarity of positives ``(target, source row, text)`` to
        their own target's other rows, over the positives whose words open the gate for their target.

        When none does (targets so alike that the words of their questions are all too common to be
        distinctive), over all of them: a lower threshold, but still one, where -inf would switch the static check
        off and send every window with a shared word to the encoder."""
        if self.static_rows is None:
            return -math.inf
        usable = [(t, row, w) for t, row, text in positives if (w := words(text))]
        kept = [(t, row, w) for t, row, w in usable if t in self.candidates(w)] or usable
        if not kept:
            return -math.inf
        vectors = self.static.embed_words([w for _, _, w in kept], remember=False)  # type: ignore[union-attr]
        sims = []
        for (t, row, _), vector in zip(kept, vectors, strict=True):
            own = self.static_rows[t].astype(np.float32) @ vector
            if 0 <= row < len(own):
                own[row] = -1.0
            sims.append(float(own.max()))
        return float(np.quantile(np.array(sims), miss))
