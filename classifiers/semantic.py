"""Semantic stage: which targets a window is about, by cosine against each target's exemplar embeddings.

Exemplars are a target's name + description, its facts (cut into sentence windows like prompts are) and its
example prompts; keep prompts are stored apart, as evidence *against* the target. Two search modes, chosen by
size, give the same answer shape:
- exact: one float32 matrix product of the prompt windows against every exemplar row. Below ~60,000 rows this
  is a few milliseconds on two cores and needs no index build.
- approximate: a usearch HNSW graph (half-precision vectors) returns the nearest rows in well under a
  millisecond however many targets there are; the exact similarities are then recomputed for the few
  candidate targets only. Above ~60,000 rows (100,000 targets) the product alone would cost tens of ms.
Either way the cost of scoring a candidate is independent of the number of targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ANN_MIN_ROWS = 60_000
ROWS_PER_WINDOW = 64  # nearest rows looked at per window to pick candidate targets
KIND_DESCRIPTION, KIND_FACT, KIND_EXAMPLE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ExemplarBlock:
    """One target's embeddings: positive rows (description, facts, examples), keep rows and related rows
    (questions about other entities its facts mention; see ``classifiers.synthetic``)."""

    vectors: np.ndarray  # float16 (n, dim), unit length
    kinds: np.ndarray  # int8 (n,)
    keep: np.ndarray  # float16 (m, dim)
    related: np.ndarray  # float16 (r, dim)


@dataclass(frozen=True, slots=True)
class Candidates:
    """Per window, the best-scoring targets with their best row similarity."""

    targets: list[list[int]]
    best: list[list[float]]


class SemanticIndex:
    """Nearest-target search over every active target's exemplar rows; immutable once built."""

    def __init__(self, blocks: Sequence[ExemplarBlock], dim: int, ann_min_rows: int = ANN_MIN_ROWS,
                 previous: SemanticIndex | None = None, keys: Sequence[int] | None = None) -> None:
        self.blocks = list(blocks)
        self.dim = dim
        counts = np.array([len(b.vectors) for b in self.blocks], dtype=np.int64)
        self.rows = int(counts.sum())
        self.row_target = np.repeat(np.arange(len(self.blocks), dtype=np.int32), counts)
        self._ann = None
        self._matrix: np.ndarray | None = None
        if self.rows >= ann_min_rows:
            self._ann, self._key_target = _build_ann(self.blocks, dim, previous, keys)
        elif self.rows:
            self._matrix = np.concatenate([b.vectors for b in self.blocks]).astype(np.float32)

    @property
    def mode(self) -> str:
        return "ann" if self._ann is not None else "exact"

    def candidates(self, windows: np.ndarray, per_window: int) -> Candidates:
        """The ``per_window`` most similar targets of each window (best row similarity first)."""
        out_t: list[list[int]] = []
        out_s: list[list[float]] = []
        if not self.rows or not len(windows):
            return Candidates([[] for _ in range(len(windows))], [[] for _ in range(len(windows))])
        if self._matrix is not None:
            sims = windows @ self._matrix.T
            k = min(ROWS_PER_WINDOW, sims.shape[1])
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for w in range(len(windows)):
                rows = top[w][np.argsort(-sims[w, top[w]])]
                self._collect(self.row_target[rows], sims[w, rows], per_window, out_t, out_s)
        else:
            matches = self._ann.search(windows.astype(np.float16), ROWS_PER_WINDOW)
            keys = np.atleast_2d(matches.keys)
            distances = np.atleast_2d(matches.distances)
            for w in range(len(windows)):
                valid = keys[w] < np.iinfo(np.uint64).max
                targets = np.array([self._key_target.get(int(k), -1) for k in keys[w][valid]], dtype=np.int64)
                ok = targets >= 0
                self._collect(targets[ok], 1.0 - distances[w][valid][ok], per_window, out_t, out_s)
        return Candidates(out_t, out_s)

    @staticmethod
    def _collect(targets: np.ndarray, sims: np.ndarray, per_window: int, out_t: list[list[int]],
                 out_s: list[list[float]]) -> None:
        chosen: list[int] = []
        best: list[float] = []
        seen: set[int] = set()
        for t, s in zip(targets.tolist(), sims.tolist(), strict=True):
            if t not in seen:
                seen.add(t)
                chosen.append(t)
                best.append(float(s))
                if len(chosen) == per_window:
                    break
        out_t.append(chosen)
        out_s.append(best)


def _build_ann(blocks: Sequence[ExemplarBlock], dim: int, previous: SemanticIndex | None,
               keys: Sequence[int] | None) -> tuple[object, dict[int, int]]:
    """An HNSW graph over all rows; row keys are ``entry key << 16 | row`` so unchanged targets keep theirs.

    With a previous graph built from the same kind of keys, only the rows of added/removed targets change
    (usearch ``copy`` + ``remove`` + ``add``), which keeps hot reloads at 100,000 targets fast.
    """
    from usearch.index import Index

    if keys is None:
        keys = list(range(len(blocks)))
    key_target: dict[int, int] = {}
    wanted: dict[int, tuple[int, int]] = {}
    for t, (block, base) in enumerate(zip(blocks, keys, strict=True)):
        for r in range(len(block.vectors)):
            key = (int(base) << 16) | r
            key_target[key] = t
            wanted[key] = (t, r)
    index = None
    if previous is not None and previous._ann is not None and previous.dim == dim:
        index = previous._ann.copy()
        old = set(previous._key_target)
        stale = np.fromiter((k for k in old if k not in wanted), dtype=np.uint64)
        if len(stale):
            index.remove(stale)
        new = [k for k in wanted if k not in old]
    else:
        index = Index(ndim=dim, metric="cos", dtype="f16", connectivity=16, expansion_add=64, expansion_search=64)
        new = list(wanted)
    if new:
        vectors = np.stack([blocks[wanted[k][0]].vectors[wanted[k][1]] for k in new]).astype(np.float16)
        index.add(np.array(new, dtype=np.uint64), vectors, threads=0)
    return index, key_target
