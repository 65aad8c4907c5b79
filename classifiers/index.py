"""The target index: everything needed to classify a conversation against the active targets.

A ``TargetIndex`` is immutable once built, so a gateway worker can swap a new one in atomically while requests
still finish on the old one. ``build_index`` is incremental: per target it keeps a ``TargetEntry`` (patterns,
exemplar embeddings) keyed by the target id and a hash of the fields that matter, and takes unchanged entries
from the previous index instead of encoding them again; only the shared parts (the name automaton, the
nearest-row search, the learned scorer and its calibration) are rebuilt, and those are cheap or, for the
approximate search, updated in place on a copy.

Decision cascade for each candidate target, in order (the first that fires names the ``stage``):
1. lexical: the target's name or an alias is in the conversation (exactly or with a typo), or a description
   of it by one of its works ("the actor known for 'Dirty Dancing'", ``classifiers.described``), unless the window
   most like one of the target's keep prompts is clearly closer to it than to the target's own knowledge;
2. semantic: a window is a near-duplicate of one of the target's example prompts;
3. learned: the calibrated pair score passes the target's conformal threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from classifiers.aliases import birth_names
from classifiers.described import (
    DescriptionMatcher,
    asked_trades,
    asks_for_another_trade,
    target_roles,
    work_titles,
)
from classifiers.encoder import Encoder, cached_array, load_encoder, model_path
from classifiers.features import (
    FEATURES,
    NO_MENTION,
    NOTHING_LEFT_OUT,
    LeftOut,
    MentionEvidence,
    asks_who,
    best_positive,
    pair_features,
)
from classifiers.gate import EncoderGate, content_words
from classifiers.gloss import Glosser
from classifiers.learned import Calibration, Scorer, calibrate, fit_scorer
from classifiers.lexical import (
    LexicalMatcher,
    Mention,
    TargetPatterns,
    names_someone_else,
    proper_phrases,
    target_patterns,
)
from classifiers.semantic import (
    ANN_MIN_ROWS,
    KIND_DESCRIPTION,
    KIND_EXAMPLE,
    KIND_FACT,
    Candidates,
    ExemplarBlock,
    SemanticIndex,
)
from classifiers.static import STATIC_DIM, static_embedder, words
from classifiers.synthetic import related_questions, reverse_questions
from classifiers.windows import Window, conversation_windows, message_windows
from gateway.registry.targets import Target

Conversation = str | Sequence[Mapping[str, Any]]
EntryFactory = Callable[[Target, Encoder, "ClassifierConfig", str], "TargetEntry"]
Span = tuple[int, int, int, str]
STAGES = ("lexical", "semantic", "learned")
MASK_WORD = "someone"


@dataclass(frozen=True)
class ClassifierConfig:
    """Knobs of the classifier; the defaults are what the evaluation reports."""

    fpr: float = 0.01  # conformal false-positive bound of the learned stage
    candidates_per_window: int = 5
    learned_rank: int = 2  # the learned stage decides only a window's best few targets
    secondary: bool = True  # ... except for more targets of a prompt already flagged (``TargetIndex.decide``)
    keep_min: float = 0.8  # a keep prompt this similar ...
    keep_margin: float = 0.05  # ... and this much closer than the target's own rows overrides a name match
    near_duplicate: float = 0.95  # semantic stage: cosine to an example prompt
    ann_min_rows: int = ANN_MIN_ROWS
    max_train_targets: int = 400
    max_positives_per_target: int = 24
    reverse_questions: int = 12  # per target, derived from its facts (0 = off)
    related_questions: int = 16  # per target, derived from its facts (0 = off)
    seed: int = 0
    gate: bool = True  # encode only windows sharing a content word with some target (classifiers.gate)
    gate_max_share: float = 0.2  # words used by more than this share of the targets do not open the gate
    static_gate: bool = True  # ... and only windows whose static vector is near one of those targets' rows
    static_gate_miss: float = 0.01  # share of the operator's unnamed positives the static gate may turn away
    gloss: bool = True  # also encode English glosses of windows in other languages (classifiers.gloss)


@dataclass(frozen=True)
class Decision:
    """The classifier's answer for one conversation (ARCHITECTURE §2 step 3, §6)."""

    flagged: bool
    targets: list[str]
    scores: dict[str, float]
    stage: str
    spans: list[Span]
    timings_ms: dict[str, float]

    @property
    def score(self) -> float:
        """The highest score of a flagged target, or of any candidate when nothing is flagged."""
        pool = [self.scores[t] for t in self.targets] or list(self.scores.values())
        return max(pool, default=0.0)

    def line(self, item_id: Any = None) -> dict[str, Any]:
        """One output line of ``unlearn-gateway classify``."""
        return {"id": item_id, "flagged": self.flagged, "targets": self.targets, "score": round(self.score, 6),
                "stage": self.stage}

    def as_dict(self) -> dict[str, Any]:
        """The ``POST /admin/classify`` answer: the line plus per-target scores, spans and timings."""
        out = self.line()
        del out["id"]
        out["scores"] = {k: round(v, 6) for k, v in self.scores.items()}
        out["spans"] = [{"message": m, "start": s, "end": e, "target": t} for m, s, e, t in self.spans]
        out["timings_ms"] = self.timings_ms
        return out


@dataclass(frozen=True)
class TargetEntry:
    """What the index keeps per target version; reused across rebuilds while the target is unchanged."""

    target_id: str
    digest: str
    encoder: str
    key: int
    patterns: TargetPatterns
    block: ExemplarBlock
    positives: tuple[tuple[int, str], ...]  # (row in block, text): example prompts, for other targets' training
    variants: tuple[tuple[int, str], ...]  # (row it derives from, text): unnamed training positives
    variant_vectors: np.ndarray  # their embeddings, int8 (see ``pack_unit_rows``): only training reads them
    keep_texts: tuple[str, ...]
    related_texts: tuple[str, ...] = ()
    # Content words of the target's material (the encoder gate); a sorted tuple, not a frozenset: a third of
    # the size, and 100,000 targets hold about a million of them.
    vocabulary: tuple[str, ...] = ()
    static_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, STATIC_DIM), np.float16))
    name_words: tuple[str, ...] = ()  # content words of the target's own name and aliases
    works: tuple[str, ...] = ()  # titles its description and facts name (classifiers.described)
    roles: tuple[str, ...] = ()  # the specific roles its description gives it


@dataclass(frozen=True)
class Prepared:
    """The encoder-free part of a classification: messages, mentions, windows."""

    messages: list[str]
    mentions: list[Mention]
    windows: list[Window]
    phrases: list[list[str]]  # proper phrases per window
    who: np.ndarray  # per window: asks for a person
    asked: frozenset[str]  # the trades its "who" questions ask for (classifiers.described.asked_trades)
    lexical_ms: float


def conversation_texts(conversation: Conversation) -> list[str]:
    """Every message's text, all roles, in order; OpenAI content parts contribute their text parts."""
    if isinstance(conversation, str):
        return [conversation]
    out: list[str] = []
    for message in conversation:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("\n".join(str(part.get("text", "")) for part in content
                                 if isinstance(part, Mapping) and part.get("type", "text") == "text"))
        else:
            out.append("")
    return out


def target_digest(target: Target) -> str:
    """Hash of the fields that change what the classifier does (not policy, not enabled)."""
    payload = json.dumps([target.name, target.aliases, target.description, target.facts, target.examples,
                          target.keep], ensure_ascii=False)
    return hashlib.sha1(payload.encode()).hexdigest()


def generic_prompts() -> list[str]:
    """The packaged everyday prompts used as default negatives (our own text)."""
    text = resources.files("classifiers").joinpath("data/generic_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _generic_bank(encoder: Encoder, gloss: bool) -> tuple[list[str], np.ndarray]:
    """The generic prompts and their embeddings, cached on disk per encoder and prompt list: every gateway
    worker needs them at start-up, and encoding 1,700 prompts takes seconds on two cores. (The encoders are
    deterministic per text, so a cached row is the row encoding would give.)"""
    texts = generic_prompts()
    # The glosses of the everyday prompts in other languages are negatives too: at run time such a prompt is
    # also encoded as its gloss, and calibration must have seen what that looks like.
    if gloss:
        texts += [g for g in map(Glosser.packaged().gloss, texts) if g]
    digest = hashlib.sha1("\n".join([encoder.name, model_path(), *texts]).encode()).hexdigest()[:16]
    return texts, cached_array(f"generic-{digest}.npy", lambda: encoder.encode(texts))


def _mask(text: str, mentions: Sequence[Mention], word: str) -> str:
    out, last = [], 0
    for m in sorted(mentions, key=lambda m: m.start):
        if m.start < last:
            continue
        out.append(text[last:m.start])
        out.append(word)
        last = m.end
    out.append(text[last:])
    return "".join(out)


def name_patterns(target: Target) -> TargetPatterns:
    """The lexical patterns of a target: its name, aliases and the birth names its own description and facts
    give ("Carlos Irwin Estévez (born September 3, 1965), known professionally as Charlie Sheen")."""
    return target_patterns(target.name, target.aliases, birth_names(target.name, [target.description, *target.facts]))


def name_words(target: Target) -> tuple[str, ...]:
    """``TargetEntry.name_words``: the content words of the target's own name and aliases."""
    return tuple(sorted(content_words([target.name, *target.aliases])))


def _words_only_in_names(content: str, window: Window, names: Sequence[Mention]) -> frozenset[str]:
    """Words of the window that it only uses inside the full names written in it."""
    inside = [(max(m.start, window.start), min(m.end, window.end)) for m in names
              if m.message == window.message and m.start < window.end and window.start < m.end]
    if not inside:
        return frozenset()
    chars = list(content[window.start:window.end])
    in_names: set[str] = set()
    for start, end in inside:
        in_names.update(words(content[start:end]))
        chars[start - window.start:end - window.start] = " " * (end - start)
    return frozenset(in_names.difference(words("".join(chars))))


def _evidence(mentions: Sequence[Mention]) -> dict[str, MentionEvidence]:
    acc: dict[str, list[float]] = {}
    for m in mentions:
        slot = acc.setdefault(m.target_id, [0.0, 0.0, 0.0])
        if m.kind == "exact":
            slot[0] = 1.0
            slot[1] = 1.0
        elif m.kind in ("fuzzy", "described"):
            slot[1] = max(slot[1], m.score)
        else:
            slot[2] = 1.0
    return {t: MentionEvidence(*v) for t, v in acc.items()}


def build_entry(target: Target, encoder: Encoder, config: ClassifierConfig, digest: str | None = None) -> TargetEntry:
    """Patterns and embeddings of one target (the expensive, cacheable part of a build)."""
    digest = digest or target_digest(target)
    patterns = name_patterns(target)
    rows: list[tuple[str, int]] = [(f"{target.name}. {target.description}".strip(), KIND_DESCRIPTION)]
    for fact in target.facts:
        rows += [(w.text, KIND_FACT) for w in message_windows(0, fact)]
    example_start = len(rows)
    for example in target.examples:
        rows += [(w.text, KIND_EXAMPLE) for w in message_windows(0, example)]
    keep = [w.text for k in target.keep for w in message_windows(0, k)]
    candidates = list(range(example_start, len(rows))) or [i for i, (_, k) in enumerate(rows) if k == KIND_FACT]
    if len(candidates) > config.max_positives_per_target:
        step = len(candidates) / config.max_positives_per_target
        candidates = [candidates[int(i * step)] for i in range(config.max_positives_per_target)]
    positives = tuple((r, rows[r][0]) for r in candidates)
    variants = _unnamed_variants(target, patterns, positives)
    reverse_start = len(rows)
    for question in reverse_questions(target.facts, target.id, patterns, config.reverse_questions):
        rows.append((question, KIND_EXAMPLE))
    variants += [(r, rows[r][0]) for r in range(reverse_start, len(rows))]
    related = related_questions(target.facts, patterns, config.related_questions)
    vectors = encoder.encode([t for t, _ in rows] + keep + related + [t for _, t in variants])
    n_rows, n_keep, n_related = len(rows), len(keep), len(related)
    block = ExemplarBlock(vectors[:n_rows].astype(np.float16), np.array([k for _, k in rows], dtype=np.int8),
                          vectors[n_rows:n_rows + n_keep].astype(np.float16),
                          vectors[n_rows + n_keep:n_rows + n_keep + n_related].astype(np.float16))
    key = int(hashlib.sha1(f"{target.id}\x00{digest}".encode()).hexdigest()[:10], 16)
    # Interned: 100,000 targets hold about a million words, most of them the same few thousand strings.
    words = content_words([target.name, *target.aliases, *(t for t, _ in rows)])
    vocabulary = tuple(sorted(sys.intern(w) for w in words))
    static = static_embedder(encoder)
    static_rows = static.embed([t for t, _ in rows]).astype(np.float16) if static is not None else \
        np.zeros((0, STATIC_DIM), np.float16)
    return TargetEntry(target.id, digest, encoder.name, key, patterns, block, positives, tuple(variants),
                       pack_unit_rows(vectors[n_rows + n_keep + n_related:]), tuple(keep), tuple(related),
                       vocabulary, static_rows, name_words(target),
                       work_titles([target.description, *target.facts], patterns.full),
                       target_roles(target.description))


def pack_unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows as int8, each scaled so its largest component is 127 (the scale need not be kept: rows are unit
    length again once unpacked). Half the bytes of float16 - at 100,000 targets the training variants take
    ~150 instead of ~300 MB - and only the learned stage's training reads them."""
    rows = np.asarray(vectors, np.float32)
    scale = 127.0 / np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12)
    return np.clip(np.rint(rows * scale), -127, 127).astype(np.int8)


def unpack_unit_rows(packed: np.ndarray) -> np.ndarray:
    """``pack_unit_rows``'s rows back as unit-length float32."""
    rows = packed.astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _unnamed_variants(target: Target, patterns: TargetPatterns,
                      positives: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """Training positives the lexical stage would not catch: the target's prompts with its name masked
    ("What was someone's debut novel?"), or cut to the surname ("What was King's debut novel?"), and the
    prompts that never named it. The learned stage only decides unnamed prompts, so it learns from these."""
    matcher = LexicalMatcher({target.id: patterns})
    surname = target.name.split(",")[0].split()[-1] if patterns.partial else None
    out: list[tuple[int, str]] = []
    for row, text in positives:
        named = [m for m in matcher.find([text]) if m.kind != "partial"]
        if not named:
            out.append((row, text))
            continue
        out.append((row, _mask(text, named, MASK_WORD)))
        if surname:
            out.append((row, _mask(text, named, surname)))
    return out


@dataclass(frozen=True)
class BuildStats:
    targets: int
    rows: int
    reused: int
    encoded: int
    search: str
    seconds: float
    training_pairs: int = 0
    calibration_negatives: int = 0
    threshold: float = math.inf
    extra: dict[str, Any] = field(default_factory=dict)


class TargetIndex:
    """Immutable classifier state for one set of targets."""

    def __init__(self, entries: Sequence[TargetEntry], targets: Sequence[Target], encoder: Encoder,
                 config: ClassifierConfig, generic: tuple[list[str], np.ndarray],
                 matcher: LexicalMatcher, semantic: SemanticIndex, described: DescriptionMatcher | None = None) -> None:
        self.entries = list(entries)
        self.targets = list(targets)
        self.ids = [e.target_id for e in self.entries]
        self.position = {t: i for i, t in enumerate(self.ids)}
        self.encoder = encoder
        self.config = config
        self.generic_bank = generic  # every packaged prompt, reused by the next build
        self.set_generic(*generic)  # build_index narrows them to the prompts that name no active target
        self.matcher = matcher
        self.described = described or DescriptionMatcher({}, {})
        self.semantic = semantic
        self.scorer: Scorer | None = None
        self.calibration = Calibration(config.fpr, math.inf)
        self.stats: BuildStats | None = None
        self.training_data: dict[str, Any] = {}
        self.vocabulary: dict[str, int] = {}  # content word -> number of targets using it
        self.gate = EncoderGate({}, [], math.inf, None)
        self.glosser = Glosser.packaged() if config.gloss else None

    # -- classification -------------------------------------------------------------------------------------
    def prepare(self, conversation: Conversation) -> Prepared:
        started = time.perf_counter()
        messages = conversation_texts(conversation)
        mentions = self.matcher.find(messages) + self.described.find(messages)
        windows = conversation_windows(messages)
        if self.glosser is not None:
            windows += self.glosser.windows(messages, windows)
        if self.config.gate:
            windows = self._gated(messages, windows, mentions)
        phrases = [proper_phrases(w.text) for w in windows]
        who = asks_who([w.text for w in windows])
        return Prepared(messages, mentions, windows, phrases, who, asked_trades(messages),
                        (time.perf_counter() - started) * 1000)

    def classify(self, conversation: Conversation) -> Decision:
        """Classify a conversation (list of {"role", "content"} messages, or plain text); blocking."""
        prepared = self.prepare(conversation)
        started = time.perf_counter()
        vectors = self.encoder.encode([w.text for w in prepared.windows]) if prepared.windows else \
            np.zeros((0, self.encoder.dim), np.float32)
        return self.decide(prepared, vectors, encode_ms=(time.perf_counter() - started) * 1000)

    def decide(self, prepared: Prepared, vectors: np.ndarray, encode_ms: float = 0.0) -> Decision:
        """The decision for prepared windows whose embeddings are ``vectors`` (one row per window)."""
        started = time.perf_counter()
        evidence = _evidence(prepared.mentions)
        candidates = self.semantic.candidates(vectors, self.config.candidates_per_window)
        semantic_ms = encode_ms + (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        generic = self._generic_best(vectors)
        pool = {t for row in candidates.targets for t in row}
        named = {self.position[t] for t in evidence if t in self.position}
        pool |= named
        learnable = named | {t for row in candidates.targets for t in row[:self.config.learned_rank]}
        pool_targets = sorted(pool)
        mentions = [evidence.get(self.ids[t], NO_MENTION) for t in pool_targets]
        named_ids = {o for o, e in evidence.items() if e.named}
        others_named = np.array([float(bool(named_ids - {self.ids[t]})) for t in pool_targets], np.float32)
        if len(vectors):
            feats = self._features(pool_targets, vectors, candidates, generic, mentions, prepared.phrases,
                                   others_named, prepared.who)
        else:
            feats = np.zeros((len(pool_targets), 0, len(FEATURES)), np.float32)
        probs = np.zeros(len(pool_targets))
        if self.scorer is not None and feats.shape[1]:
            probs = self.scorer.score(feats.reshape(-1, len(FEATURES))).reshape(feats.shape[:2]).max(axis=1)
        scores: dict[str, float] = {}
        fired: dict[str, str] = {}
        for i, (t, mention) in enumerate(zip(pool_targets, mentions, strict=True)):
            target_id = self.ids[t]
            p, target_feats = float(probs[i]), feats[i]
            score, stage = p, None
            if mention.named and not self._kept(target_feats):
                stage, score = "lexical", max(p, mention.exact or mention.fuzzy)
            elif len(target_feats) and self._near_duplicate(target_feats):
                stage, score = "semantic", max(p, float(target_feats[:, 3].max()))
            elif t in learnable and p > self.calibration.threshold(target_id) and \
                    not asks_for_another_trade(prepared.asked, self.entries[t].roles):
                # A question that asks who directed a film is not about the actor who starred in it.
                stage = "learned"
            scores[target_id] = min(max(score, 0.0), 1.0)
            if stage:
                fired[target_id] = stage
        if fired and self.config.secondary:
            # Once the prompt is flagged, another target past its own threshold joins even outside a window's best
            # few: whether the prompt is flagged no longer depends on it, only whose facts the policy protects.
            for i, t in enumerate(pool_targets):
                target_id = self.ids[t]
                if target_id not in fired and probs[i] > self.calibration.threshold(target_id) and \
                        not asks_for_another_trade(prepared.asked, self.entries[t].roles):
                    fired[target_id] = "learned"
        flagged = sorted(fired, key=lambda t: (-scores[t], t))
        stage = min((fired[t] for t in flagged), key=STAGES.index, default="none")
        spans = sorted({(m.message, m.start, m.end, m.target_id) for m in prepared.mentions if m.target_id in fired})
        timings = {"lexical": round(prepared.lexical_ms, 3), "semantic": round(semantic_ms, 3),
                   "learned": round((time.perf_counter() - started) * 1000, 3)}
        return Decision(bool(flagged), flagged, scores, stage, spans, timings)

    def _gated(self, messages: Sequence[str], windows: list[Window], mentions: Sequence[Mention]) -> list[Window]:
        """The windows worth encoding (``classifiers.gate.EncoderGate``). A target named in the conversation
        is decided by its name unless it has keep prompts (whose check needs the encoder).

        A first name or surname shared by chance is no evidence: "Stephen" in "Stephen King" opens nothing for a
        target called Stephen Hawking, and "King" there is not a mention of a target called Martin Luther King.
        Words of a full name still count for targets whose *material* uses them ("Who is the daughter of Judy
        Garland?" is about Liza Minnelli, whose facts name her mother)."""
        full = [m for m in mentions if m.kind != "partial"]
        named = {self.position[m.target_id] for m in full if m.target_id in self.position}
        decided = {t for t in named if not self.entries[t].keep_texts}

        def in_another_name(m: Mention) -> bool:
            return m.kind == "partial" and any(f.message == m.message and f.start <= m.start and m.end <= f.end
                                               and f.target_id != m.target_id for f in full)

        forcing = [m for m in mentions if self.position.get(m.target_id) not in decided and not in_another_name(m)]
        forced = [any(m.message == w.message and w.start <= m.start < w.end for m in forcing) for w in windows]
        in_names = [_words_only_in_names(messages[w.message], w, full) for w in windows]
        keep = self.gate.select([w.text for w in windows], forced, decided, in_names)
        return [w for w, k in zip(windows, keep, strict=True) if k]

    def set_generic(self, texts: list[str], vectors: np.ndarray) -> None:
        """The generic negatives this index uses (those that name no active target)."""
        self.generic_texts, self.generic_vectors = texts, vectors
        # (dim, prompts), C-contiguous: see ``SemanticIndex`` on transposed views and one BLAS thread.
        self._generic_columns = np.ascontiguousarray(vectors.T)

    def _generic_best(self, vectors: np.ndarray, drop: int | None = None) -> np.ndarray:
        if not len(self.generic_vectors) or not len(vectors):
            return np.zeros(len(vectors), np.float32)
        sims = vectors @ self._generic_columns
        if drop is not None:
            sims[:, drop] = -1.0
        return sims.max(axis=1)

    def _features(self, targets: Sequence[int], vectors: np.ndarray, candidates: Candidates, generic: np.ndarray,
                  mentions: Sequence[MentionEvidence], phrases: Sequence[Sequence[str]], other_target: np.ndarray,
                  who: np.ndarray | None = None, left_out: Sequence[LeftOut] | None = None) -> np.ndarray:
        """(targets x windows x features) for ``targets`` (positions in this index), all in one pass."""
        column = {t: i for i, t in enumerate(targets)}
        # Best similarity to another target: the window's best candidate, or its second for that candidate.
        other = np.zeros((len(targets), len(vectors)), np.float32)
        for w, (ranked, best) in enumerate(zip(candidates.targets, candidates.best, strict=True)):
            if ranked:
                other[:, w] = best[0]
                if ranked[0] in column:
                    other[column[ranked[0]], w] = best[1] if len(ranked) > 1 else 0.0
        names_other = np.zeros((len(targets), len(vectors)), np.float32)
        for w, window_phrases in enumerate(phrases):
            if window_phrases:
                names_other[:, w] = [names_someone_else(window_phrases, self.entries[t].patterns) for t in targets]
        return pair_features(vectors, [self.entries[t].block for t in targets], generic, other, mentions,
                             names_other, other_target, who, left_out)

    def _kept(self, feats: np.ndarray) -> bool:
        """A name match is overridden when some window is clearly a keep prompt rather than the target's."""
        if not len(feats) or feats[0, 11] == 0:
            return False
        keep = feats[:, 7]
        return bool(np.any((keep >= self.config.keep_min) & (keep >= best_positive(feats) + self.config.keep_margin)))

    def _near_duplicate(self, feats: np.ndarray) -> bool:
        close = feats[:, 3] >= self.config.near_duplicate
        if feats[0, 11]:
            close &= feats[:, 7] + self.config.keep_margin <= feats[:, 3]
        return bool(close.any())

    # -- training ---------------------------------------------------------------------------------------------
    def fit(self) -> tuple[int, int]:
        """Train the learned stage and calibrate its thresholds on this index's own operator data.

        Returns (training pairs, calibration negatives). Called once by ``build_index`` before the index is
        published; never on evaluation prompts.
        """
        rng = np.random.default_rng(self.config.seed)
        chosen = list(range(len(self.entries)))
        if len(chosen) > self.config.max_train_targets:
            chosen = sorted(rng.choice(len(chosen), self.config.max_train_targets, replace=False).tolist())
        chosen_set = set(chosen)
        items: list[dict[str, Any]] = []
        for t in chosen:
            entry = self.entries[t]
            for (row, text), vec in zip(entry.variants, unpack_unit_rows(entry.variant_vectors), strict=True):
                items.append({"vec": vec, "text": text, "label": 1, "own": t, "drop": row})
            for k, text in enumerate(entry.keep_texts):
                items.append({"vec": entry.block.keep[k], "text": text, "label": 0, "own": t, "drop_keep": k})
            for k, text in enumerate(entry.related_texts):
                items.append({"vec": entry.block.related[k], "text": text, "label": 0, "own": t,
                              "drop_related": k})
        # Other targets' prompts are negatives for everyone else, in their unnamed forms: named, they would be
        # told apart by the name alone, while the prompts the learned stage must refuse are the unnamed ones
        # that share a topic with a target (a film, a band, a co-author) without asking about it.
        for t, entry in enumerate(self.entries):
            if t in chosen_set or len(self.entries) <= self.config.max_train_targets:
                k = self.config.max_positives_per_target
                for (_, text), vec in zip(entry.variants[:k], unpack_unit_rows(entry.variant_vectors[:k]),
                                          strict=True):
                    items.append({"vec": vec, "text": text, "label": 0, "own": t, "cross": True})
        for g, text in enumerate(self.generic_texts):
            items.append({"vec": self.generic_vectors[g], "text": text, "label": 0, "own": -1, "generic": g})
        if not any(i["label"] for i in items) or all(i["label"] for i in items):
            return 0, 0
        vectors = np.stack([np.asarray(i["vec"], dtype=np.float32) for i in items])
        candidates = self.semantic.candidates(vectors, self.config.candidates_per_window)
        x_fit: list[np.ndarray] = []
        y_fit: list[int] = []
        calibration: list[tuple[int, str, np.ndarray]] = []  # (item, target id, features)
        for n, item in enumerate(items):
            one = vectors[n:n + 1]
            single = Candidates([candidates.targets[n]], [candidates.best[n]])
            generic = self._generic_best(one, drop=item.get("generic"))
            mentions = _evidence(self.matcher.find([item["text"]]))
            phrases = [proper_phrases(item["text"])]
            who = asks_who([item["text"]])
            named = {self.position[o] for o, e in mentions.items() if e.named and o in self.position}
            if item["label"] == 1:
                t = item["own"]
                if t in named:
                    continue
                feats = self._features([t], one, single, generic, [mentions.get(self.ids[t], NO_MENTION)], phrases,
                                       np.array([float(bool(named))]), who, [LeftOut(row=item["drop"])])
                x_fit.append(feats[0, 0])
                y_fit.append(1)
                continue
            pool = set(candidates.targets[n])
            if item["own"] >= 0 and not item.get("cross"):
                pool.add(item["own"])
            if item.get("cross"):
                pool.discard(item["own"])
            held_out = _half(item["text"])
            if held_out:  # calibrate on what the learned stage decides at run time
                pool = (pool & set(candidates.targets[n][:self.config.learned_rank])) | (
                    {item["own"]} if item["own"] >= 0 and not item.get("cross") else set())
            pool_targets = [t for t in sorted(pool) if t not in named]  # named: the lexical stage's business
            if not pool_targets:
                continue
            own = item["own"]
            left_out = [LeftOut(keep=item.get("drop_keep"), related=item.get("drop_related")) if t == own
                        else NOTHING_LEFT_OUT for t in pool_targets]
            feats = self._features(pool_targets, one, single, generic,
                                   [mentions.get(self.ids[t], NO_MENTION) for t in pool_targets], phrases,
                                   np.full(len(pool_targets), float(bool(named))), who, left_out)
            for t, target_feats in zip(pool_targets, feats[:, 0], strict=True):
                if held_out:
                    calibration.append((n, self.ids[t], target_feats))
                else:
                    x_fit.append(target_feats)
                    y_fit.append(0)
        if len(set(y_fit)) < 2:
            return 0, 0
        self.scorer = fit_scorer(np.stack(x_fit), np.array(y_fit))
        per_prompt: dict[int, float] = {}
        per_target: dict[str, list[float]] = {}
        if calibration:
            scores = self.scorer.score(np.stack([f for _, _, f in calibration]))
            for (n, target_id, _), s in zip(calibration, scores.tolist(), strict=True):
                per_prompt[n] = max(per_prompt.get(n, 0.0), s)
                per_target.setdefault(target_id, []).append(s)
        self.calibration = calibrate(list(per_prompt.values()), per_target, self.config.fpr)
        # Kept (small: pairs x features) so that reports can show what the learned stage was fitted on.
        self.training_data = {"x": np.stack(x_fit), "y": np.array(y_fit),
                              "calibration_x": np.stack([f for _, _, f in calibration]) if calibration else None,
                              "calibration_prompt": np.array([n for n, _, _ in calibration])}
        return len(x_fit), len(per_prompt)


def _vocabulary(entries: Sequence[TargetEntry], previous: TargetIndex | None) -> dict[str, int]:
    """Word -> number of targets using it; updated from the previous index's counts when there is one."""
    if previous is None:
        counts: dict[str, int] = {}
        for entry in entries:
            for word in entry.vocabulary:
                counts[word] = counts.get(word, 0) + 1
        return counts
    counts = dict(previous.vocabulary)
    old = {id(e) for e in previous.entries}
    new = {id(e) for e in entries}
    for entry in previous.entries:
        if id(entry) not in new:
            for word in entry.vocabulary:
                counts[word] -= 1
                if not counts[word]:
                    del counts[word]
    for entry in entries:
        if id(entry) not in old:
            for word in entry.vocabulary:
                counts[word] = counts.get(word, 0) + 1
    return counts


def _gate(index: TargetIndex, config: ClassifierConfig) -> EncoderGate:
    """The encoder gate of a built index, its static threshold calibrated on the operator's unnamed positives
    (a sample of targets, like the learned stage's training)."""
    entries = index.entries
    # Not distinctive: a word more than a fifth of the targets use, once more than two do (with one or two
    # targets every content word counts).
    limit = max(2.0, config.gate_max_share * len(entries))
    static = static_embedder(index.encoder) if config.static_gate else None
    gate = EncoderGate(index.vocabulary, entries, limit, static)
    rng = np.random.default_rng(config.seed)
    sample = range(len(entries))
    if len(entries) > config.max_train_targets:
        sample = sorted(rng.choice(len(entries), config.max_train_targets, replace=False).tolist())
    # Prompts that mention the target (a surname alone included) are always encoded, so they say nothing
    # about where the static threshold must lie.
    positives = [(t, row, text) for t in sample for row, text in entries[t].variants
                 if not any(m.target_id == entries[t].target_id for m in index.matcher.find([text]))]
    gate.threshold = gate.calibrate_threshold(positives, config.static_gate_miss)
    return gate


def _half(text: str) -> bool:
    """Deterministic split of negatives: True = calibration half."""
    return hashlib.sha1(text.encode()).digest()[0] % 2 == 1


def _single_threaded_blas() -> None:
    """Classification multiplies a few windows by at most tens of thousands of rows; OpenBLAS splits even such
    small products across threads, which then wait on each other whenever the cores are busy (measured here:
    3 x 1,703 rows took 6.5 ms with two threads on a loaded machine, 0.44 ms with one). A serving process gets
    its parallelism from concurrent requests, so every process that builds a classifier uses one BLAS thread."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def build_index(targets: Sequence[Target], previous: TargetIndex | None = None, *,
                encoder: Encoder | None = None, config: ClassifierConfig | None = None,
                progress: bool = False, entry_factory: EntryFactory | None = None) -> TargetIndex:
    """Build the index for the enabled targets, reusing unchanged targets' work from ``previous``.

    ``entry_factory`` replaces ``build_entry`` (the benchmark uses it to skip encoding 100,000 synthetic
    targets); the default encodes each new or changed target's exemplars.
    """
    make_entry = entry_factory or build_entry
    started = time.perf_counter()
    _single_threaded_blas()
    config = config or (previous.config if previous is not None else ClassifierConfig())
    encoder = encoder or (previous.encoder if previous is not None else load_encoder())
    active = [t for t in targets if t.enabled]
    reuse: dict[str, TargetEntry] = {}
    if previous is not None and previous.encoder.name == encoder.name:
        reuse = {e.target_id: e for e in previous.entries}
    entries: list[TargetEntry] = []
    encoded = 0
    iterator: Any = active
    if progress:
        from tqdm import tqdm

        iterator = tqdm(active, desc="targets", unit="target", leave=False)
    for target in iterator:
        digest = target_digest(target)
        old = reuse.get(target.id)
        if old is not None and old.digest == digest:
            entries.append(old)
        else:
            entries.append(make_entry(target, encoder, config, digest))
            encoded += 1
    if previous is not None and previous.encoder.name == encoder.name:
        generic = previous.generic_bank
    else:
        generic = _generic_bank(encoder, config.gloss)
    patterns = {e.target_id: e.patterns for e in entries}
    if previous is not None and [(e.target_id, e.patterns) for e in previous.entries] == list(patterns.items()):
        matcher = previous.matcher
    else:
        matcher = LexicalMatcher(patterns)
    semantic = SemanticIndex([e.block for e in entries], encoder.dim, config.ann_min_rows,
                             previous.semantic if previous is not None else None, [e.key for e in entries])
    described = DescriptionMatcher({e.target_id: e.works for e in entries}, {e.target_id: e.roles for e in entries})
    index = TargetIndex(entries, active, encoder, config, generic, matcher, semantic, described)
    index.vocabulary = _vocabulary(entries, previous)
    index.gate = _gate(index, config)
    # Generic prompts that name an active target are not negatives for it: drop them.
    keep_generic = [i for i, text in enumerate(generic[0]) if not any(m.kind != "partial"
                                                                        for m in matcher.find([text]))]
    index.set_generic([generic[0][i] for i in keep_generic],
                      generic[1][keep_generic] if len(keep_generic) else np.zeros((0, encoder.dim), np.float32))
    pairs, negatives = index.fit()
    index.stats = BuildStats(len(entries), semantic.rows, len(entries) - encoded, encoded, semantic.mode,
                             round(time.perf_counter() - started, 3), pairs, negatives,
                             index.calibration.global_threshold)
    return index


class IndexBuilder:
    """The hot-reload hook (``gateway.registry.reload.IndexBuilder``): builds the classifier's index in a
    worker thread from each new target set, reusing the previous index's unchanged targets."""

    name = "classifier"

    def __init__(self, encoder: Encoder | None = None, config: ClassifierConfig | None = None) -> None:
        self._encoder = encoder
        self._config = config
        self._lock = threading.Lock()

    def encoder(self) -> Encoder:
        """The encoder this builder embeds with, loaded on first use. The gateway's GUARD retrieval and output
        guard use it too, rather than loading MiniLM a second time."""
        with self._lock:
            if self._encoder is None:
                self._encoder = load_encoder()
            return self._encoder

    def build(self, targets: Sequence[Target], previous: TargetIndex | None) -> TargetIndex:
        return build_index(targets, previous, encoder=self.encoder(), config=self._config)
