"""Learned stage: a logistic regression over pair features, thresholds set by split-conformal calibration.

Why one shared model over pair features, not one model per target: targets arrive at run time with a handful
of examples each; a per-target classifier would have nothing to learn from, while "how close to this target's
facts, how far from its keep prompts, is it named" means the same for every target. Logistic regression keeps
scoring at a few microseconds per pair (a dot product; no sklearn call on the hot path) and its output is
monotone in every similarity, which makes the conformal threshold meaningful. (Gradient-boosted trees were
tried: sklearn's per-call overhead made a TOFU evaluation run over ten times longer, so they were dropped.)

Calibration (split-conformal): negatives (keep prompts, generic everyday prompts, other targets' examples) are
split in two by a hash of their text. One half trains the model with the positives; on the other half the score
of each negative *prompt* is its highest score over its candidate targets, and the threshold is the
ceil((n+1)(1-alpha))-th smallest of those, so a new prompt exchangeable with those negatives is flagged with
probability at most alpha (default 1%). A target with enough negatives of its own also gets its own threshold
at the same level; the stricter of the two applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression


@dataclass(frozen=True, slots=True)
class Scorer:
    """Standardise, dot, sigmoid."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def score(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_scorer(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, c: float = 1.0) -> Scorer:
    """Fit the logistic regression (classes balanced; features standardised)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit((x - mean) / scale, y, sample_weight=weights)
    return Scorer(mean.astype(np.float32), scale.astype(np.float32), model.coef_[0].astype(np.float32),
                  float(model.intercept_[0]))


def conformal_threshold(negative_scores: Sequence[float], alpha: float, min_count: int = 20) -> float:
    """The split-conformal threshold: flag a score strictly above it.

    With fewer than 1/alpha - 1 negatives the exact quantile does not exist; from ``min_count`` negatives on,
    the highest negative score is used (a bound of about 1/(n+1) instead of alpha), below that ``inf``.
    """
    n = len(negative_scores)
    if n < min_count:
        return math.inf
    k = min(math.ceil((n + 1) * (1 - alpha)), n)
    return float(np.sort(np.asarray(negative_scores, dtype=np.float64))[k - 1])


@dataclass(frozen=True, slots=True)
class Calibration:
    """Thresholds: one global, and per-target ones (target id -> threshold) where a target had enough data."""

    alpha: float
    global_threshold: float
    per_target: dict[str, float] = field(default_factory=dict)
    negatives: int = 0

    def threshold(self, target_id: str) -> float:
        return max(self.global_threshold, self.per_target.get(target_id, -math.inf))


def calibrate(prompt_max: Sequence[float], pair_scores: dict[str, list[float]], alpha: float,
              floor: float = 0.5) -> Calibration:
    """Global threshold from per-prompt maxima; per-target ones from that target's pair scores.

    ``floor`` keeps the threshold from dropping below an even-odds score when the negatives are all easy.
    """
    global_threshold = max(conformal_threshold(prompt_max, alpha), floor)
    per_target: dict[str, float] = {}
    for target_id, scores in pair_scores.items():
        value = conformal_threshold(scores, alpha, min_count=math.ceil(1 / alpha) - 1)
        if math.isfinite(value) and value > global_threshold:
            per_target[target_id] = value
    return Calibration(alpha, global_threshold, per_target, len(prompt_max))
