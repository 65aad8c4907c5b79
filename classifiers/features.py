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
from dataclasses import dataclass

import numpy as np

from classifiers.semantic import KIND_DESCRIPTION, KIND_EXAMPLE, KIND_FACT

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


def _masked_max(sims: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    if not mask.any():
        return fallback
    return sims[:, mask].max(axis=1)


def pair_features(window_vectors: np.ndarray, rows: np.ndarray, kinds: np.ndarray, keep: np.ndarray,
                  related: np.ndarray, generic: np.ndarray, other: np.ndarray, mention: MentionEvidence,
                  names_other: np.ndarray | None = None, other_target: float = 0.0,
                  who: np.ndarray | None = None,
                  drop_row: int | None = None, drop_keep: int | None = None,
                  drop_related: int | None = None) -> np.ndarray:
    """A (windows x len(FEATURES)) matrix for one target.

    ``rows``/``kinds`` are the target's positive exemplar rows, ``keep`` its keep rows, ``generic`` and ``other``
    the best similarity of each window to the generic-prompt bank and to any other target. ``drop_row`` and
    ``drop_keep``/``drop_related`` leave one row out (training on a target's own example must not see that example).
    """
    n_windows = len(window_vectors)
    sims = window_vectors @ rows.T.astype(np.float32) if len(rows) else np.zeros((n_windows, 0), np.float32)
    valid = np.ones(len(rows), dtype=bool)
    if drop_row is not None and 0 <= drop_row < len(rows):
        valid[drop_row] = False
    zeros = np.zeros(n_windows, dtype=np.float32)
    desc = _masked_max(sims, valid & (kinds == KIND_DESCRIPTION), zeros)
    fact = _masked_max(sims, valid & (kinds == KIND_FACT), desc)
    example = _masked_max(sims, valid & (kinds == KIND_EXAMPLE), np.maximum(fact, desc))
    usable = sims[:, valid]
    if usable.shape[1]:
        k = min(3, usable.shape[1])
        top3 = -np.sort(-usable, axis=1)[:, :k].mean(axis=1)
        best = usable.max(axis=1)
    else:
        top3 = best = zeros
    if drop_keep is not None and 0 <= drop_keep < len(keep):
        keep = np.delete(keep, drop_keep, axis=0)
    if len(keep):
        sim_keep = (window_vectors @ keep.T.astype(np.float32)).max(axis=1)
        has_keep = 1.0
    else:
        sim_keep, has_keep = zeros, 0.0
    if drop_related is not None and 0 <= drop_related < len(related):
        related = np.delete(related, drop_related, axis=0)
    sim_related = (window_vectors @ related.T.astype(np.float32)).max(axis=1) if len(related) else zeros
    out = np.empty((n_windows, len(FEATURES)), dtype=np.float32)
    out[:, 0] = mention.exact
    out[:, 1] = mention.fuzzy
    out[:, 2] = mention.partial
    out[:, 3] = example
    out[:, 4] = fact
    out[:, 5] = desc
    out[:, 6] = top3
    out[:, 7] = sim_keep
    out[:, 8] = best - sim_keep if has_keep else 0.0
    out[:, 9] = best - generic
    out[:, 10] = best - other
    out[:, 11] = has_keep
    out[:, 12] = 0.0 if names_other is None else names_other
    out[:, 13] = other_target
    out[:, 14] = sim_related
    out[:, 15] = best - sim_related if len(related) else 0.0
    out[:, 16] = 0.0 if who is None else who
    return out


def best_positive(features: np.ndarray) -> np.ndarray:
    """Best positive similarity per window, recovered from a feature matrix."""
    return np.maximum(features[:, 3], np.maximum(features[:, 4], features[:, 5]))
