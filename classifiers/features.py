"""Features of one (prompt window, candidate target) pair, shared by training and classification.

Why these: each one answers a question an operator would ask about a borderline prompt.
- Is the target named? exact / typo / surname-only mention anywhere in the conversation (a name given three
  turns earlier still counts for a later window).
- Is the window about the target's knowledge? best cosine to its example prompts, to its facts, to its
  description, and the mean of the three best rows (one lucky row is weaker evidence than several).
- Is it closer to something the operator wants kept? best cosine to the target's keep prompts, and the margin
  of the target's evidence over it ("Who created Friends?" is near a keep prompt, not near Matthew Perry's
  facts about his own life).
- Is it specific to this target? margin over the best *other* target and over generic everyday prompts.
- Is it about something the target's facts merely mention? best cosine to questions about the related entities
  (a film, a spouse, a band) and the margin over it.
- Does it ask for a person ("who ...?", "which author ...?")? The ways of asking for a target without naming it
  mostly do; questions about the things around a target mostly do not.
- Is it about someone else? the window names a person or work that is not this target (a proper phrase such as
  "Jamie Vasquez" or "Different Seasons"), or the conversation names another active target outright.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from classifiers.semantic import KIND_DESCRIPTION, KIND_EXAMPLE, KIND_FACT, ExemplarBlock

FEATURES = ("exact", "fuzzy", "partial", "sim_example", "sim_fact", "sim_description", "sim_top3",
            "sim_keep", "margin_keep", "margin_generic", "margin_other", "has_keep", "names_other", "other_target",
            "sim_related", "margin_related", "asks_who")

# Questions whose answer is a person: most ways of asking for a target without naming it ("Who wrote ...?",
# "Which author ...?", "¿Quién ...?"), and far rarer among questions about the things around it.
ASKS_WHO = re.compile(
    r"\b(?:who|whom|whose|quién|quien|quiénes|wer|wem|wessen|quem|chi|кто|чей|чья)\b|\bqui (?:a|est|était|fut)\b"
    r"|\bwhich (?:author|writer|novelist|actor|actress|singer|musician|rapper|artist|person|man|woman|director|"
    r"filmmaker|comedian|athlete|player|celebrity|politician|president|philosopher|painter|entrepreneur|"
    r"businessman|star|figure|individual|host|personality|composer|producer|poet|leader|king|queen|prince|"
    r"princess|wrestler|model|personality)\b|\bname (?:of )?the (?:author|writer|actor|actress|singer|person|"
    r"artist|individual)\b", re.IGNORECASE)


def asks_who(texts: list[str]) -> np.ndarray:
    """1.0 per window that asks for a person."""
    return np.array([1.0 if ASKS_WHO.search(t) else 0.0 for t in texts], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class MentionEvidence:
    """Conversation-level lexical evidence for one target."""

    exact: float = 0.0
    fuzzy: float = 0.0
    partial: float = 0.0

    @property
    def named(self) -> bool:
        return self.exact > 0 or self.fuzzy > 0


NO_MENTION = MentionEvidence()


@dataclass(frozen=True, slots=True)
class LeftOut:
    """Rows of one target left out of its features: training on a target's own example, keep prompt or related
    question must not see that very row."""

    row: int | None = None
    keep: int | None = None
    related: int | None = None


NOTHING_LEFT_OUT = LeftOut()


class _Rows:
    """Several targets' rows of one kind, compared with the windows in one product and laid out as
    (windows, targets, longest row count) with ``-inf`` where a target has no row (or one was left out)."""

    def __init__(self, window_vectors: np.ndarray, arrays: Sequence[np.ndarray], dropped: Sequence[int | None]
                 ) -> None:
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        width = int(counts.max(initial=0))
        self.valid = np.arange(width)[None, :] < counts[:, None]  # (targets, width)
        for t, row in enumerate(dropped):
            if row is not None and 0 <= row < counts[t]:
                self.valid[t, row] = False
        n_windows = len(window_vectors)
        if not counts.sum():
            self.sims = np.full((n_windows, len(arrays), width), -np.inf, np.float32)
            return
        flat = window_vectors @ np.concatenate(arrays).T.astype(np.float32)  # (windows, all rows)
        position = np.full((len(arrays), width), flat.shape[1], dtype=np.int64)  # padding -> the -inf column
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        position[self.valid] = (offsets[:, None] + np.arange(width)[None, :])[self.valid]
        flat = np.concatenate([flat, np.full((n_windows, 1), -np.inf, np.float32)], axis=1)
        self.sims = flat[:, position]

    def best(self, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per (window, target) the best similarity over the rows in ``mask`` (default: every valid row),
        and per target whether it has any such row. Invalid rows are already ``-inf`` in ``sims``."""
        has = self.valid.any(axis=1) if mask is None else (self.valid & mask).any(axis=1)
        if not self.sims.shape[2]:
            return np.zeros(self.sims.shape[:2], np.float32), has
        sims = self.sims if mask is None else np.where(mask[None], self.sims, -np.inf)
        return sims.max(axis=2), has


def pair_features(window_vectors: np.ndarray, blocks: Sequence[ExemplarBlock], generic: np.ndarray,
                  other: np.ndarray, mentions: Sequence[MentionEvidence], names_other: np.ndarray | None = None,
                  other_target: np.ndarray | None = None, who: np.ndarray | None = None,
                  left_out: Sequence[LeftOut] | None = None) -> np.ndarray:
    """A (targets x windows x len(FEATURES)) array: the features of every window against every target in
    ``blocks``, computed in a few array operations however many targets there are.

    ``generic`` (windows) is each window's best similarity to the generic-prompt bank; ``other`` (targets x
    windows) its best similarity to any target but this one; ``names_other`` (targets x windows) and
    ``other_target`` (targets) the "someone else" evidence; ``left_out`` per target, rows its features must not
    see (see ``LeftOut``).
    """
    n_targets, n_windows = len(blocks), len(window_vectors)
    left_out = left_out or [NOTHING_LEFT_OUT] * n_targets
    positive = _Rows(window_vectors, [b.vectors for b in blocks], [d.row for d in left_out])
    kinds = np.full(positive.valid.shape, -1, np.int8)
    for t, block in enumerate(blocks):
        kinds[t, :len(block.kinds)] = block.kinds
    desc, has_desc = positive.best(kinds == KIND_DESCRIPTION)
    fact, has_fact = positive.best(kinds == KIND_FACT)
    example, has_example = positive.best(kinds == KIND_EXAMPLE)
    desc = np.where(has_desc[None], desc, 0.0)
    fact = np.where(has_fact[None], fact, desc)
    example = np.where(has_example[None], example, np.maximum(fact, desc))
    best, has_any = positive.best()
    best = np.where(has_any[None], best, 0.0)
    # Mean of each target's three best rows (fewer when it has fewer): padding and left-out rows are -inf.
    top = -np.sort(-positive.sims, axis=2)[:, :, :3]
    top3_count = np.minimum(positive.valid.sum(axis=1), 3)
    top3 = np.where(np.isfinite(top), top, 0.0).sum(axis=2) / np.maximum(top3_count, 1)[None]
    keep = _Rows(window_vectors, [b.keep for b in blocks], [d.keep for d in left_out])
    sim_keep, has_keep = keep.best()
    sim_keep = np.where(has_keep[None], sim_keep, 0.0)
    related = _Rows(window_vectors, [b.related for b in blocks], [d.related for d in left_out])
    sim_related, has_related = related.best()
    sim_related = np.where(has_related[None], sim_related, 0.0)
    out = np.empty((n_windows, n_targets, len(FEATURES)), dtype=np.float32)
    out[:, :, 0] = [m.exact for m in mentions]
    out[:, :, 1] = [m.fuzzy for m in mentions]
    out[:, :, 2] = [m.partial for m in mentions]
    out[:, :, 3] = example
    out[:, :, 4] = fact
    out[:, :, 5] = desc
    out[:, :, 6] = top3
    out[:, :, 7] = sim_keep
    out[:, :, 8] = np.where(has_keep[None], best - sim_keep, 0.0)
    out[:, :, 9] = best - generic[:, None]
    out[:, :, 10] = best - other.T
    out[:, :, 11] = has_keep
    out[:, :, 12] = 0.0 if names_other is None else names_other.T
    out[:, :, 13] = 0.0 if other_target is None else other_target
    out[:, :, 14] = sim_related
    out[:, :, 15] = np.where(has_related[None], best - sim_related, 0.0)
    out[:, :, 16] = 0.0 if who is None else who[:, None]
    return out.transpose(1, 0, 2)


def best_positive(features: np.ndarray) -> np.ndarray:
    """Best positive similarity per window, recovered from a feature matrix."""
    return np.maximum(features[:, 3], np.maximum(features[:, 4], features[:, 5]))
