"""Semantic stage: which targets a window is about, by cosine against each target's exemplar embeddings.

Exemplars are a target's name + description, its facts (cut into sentence windows like prompts are) and its
example prompts; keep prompts are stored apart, as evidence *against* the target. Two search modes, chosen by
size, give the same answer shape:
- exact: one float32 matrix product of the prompt windows against every exemplar row. Below ~60,000 rows this
  is a few milliseconds on two cores and needs no index build.
- approximate: a usearch HNSW graph (8-bit vectors) returns the nearest rows in about a millisecond however
  many targets there are; the exact similarities are then recomputed for the few candidate targets only.
  Above ~60,000 rows (100,000 targets) the product alone would cost tens of ms. 8-bit rather than half
  precision: at 500,000 rows the graph holds 372 instead of 628 MiB and searches about twice as fast; its
  similarities are off by about 0.01 either way, and only pick candidates.
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
        self._keys, self._key_target = np.zeros(0, np.uint64), np.zeros(0, np.int32)  # ANN mode: row key -> target
        # Exact mode: the rows as one (dim, rows) C-contiguous matrix. With the single BLAS thread classification
        # runs on, a product against a transposed view took twice as long as against this layout.
        self._matrix: np.ndarray | None = None
        if self.rows >= ann_min_rows:
            self._ann, self._keys, self._key_target = _build_ann(self.blocks, dim, previous, keys)
        elif self.rows:
            self._matrix = np.ascontiguousarray(np.concatenate([b.vectors for b in self.blocks]).astype(np.float32).T)

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
            sims = windows @ self._matrix
            k = min(ROWS_PER_WINDOW, sims.shape[1])
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for w in range(len(windows)):
                rows = top[w][np.argsort(-sims[w, top[w]])]
                self._collect(self.row_target[rows], sims[w, rows], per_window, out_t, out_s)
        else:
            matches = self._ann.search(windows.astype(np.float16), ROWS_PER_WINDOW)
            keys = np.atleast_2d(matches.keys)
            distances = np.atleast_2d(matches.distances)
            # Row key -> target by binary search in the sorted keys (a missing result has no match).
            found = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            known = self._keys[found] == keys
            for w in range(len(windows)):
                ok = known[w]
                self._collect(self._key_target[found[w][ok]], 1.0 - distances[w][ok], per_window, out_t, out_s)
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
               keys: Sequence[int] | None) -> tuple[object, np.ndarray, np.ndarray]:
    """An HNSW graph over all rows, with its row keys sorted and each key's target (arrays: at 500,000 rows a
    dict of Python ints would cost ~40 MB). Row keys are ``entry key << 16 | row`` so unchanged targets keep theirs.

    With a previous graph built from the same kind of keys, only the rows of added/removed targets change
    (usearch ``copy`` + ``remove`` + ``add``), which keeps hot reloads at 100,000 targets fast.
    """
    from usearch.index import Index

    if keys is None:
        keys = list(range(len(blocks)))
    counts = np.array([len(b.vectors) for b in blocks], dtype=np.int64)
    first_row = np.repeat(np.cumsum(counts) - counts, counts)
    row_keys = np.repeat(np.asarray(keys, dtype=np.uint64) << np.uint64(16), counts) + \
        (np.arange(int(counts.sum())) - first_row).astype(np.uint64)
    row_targets = np.repeat(np.arange(len(blocks), dtype=np.int32), counts)
    order = np.argsort(row_keys, kind="stable")
    sorted_keys, key_target = row_keys[order], row_targets[order]
    if previous is not None and previous._ann is not None and previous.dim == dim:
        index = previous._ann.copy()
        stale = np.setdiff1d(previous._keys, sorted_keys, assume_unique=True)
        if len(stale):
            index.remove(stale)
        new = np.setdiff1d(sorted_keys, previous._keys, assume_unique=True)
    else:
        index = Index(ndim=dim, metric="cos", dtype="i8", connectivity=16, expansion_add=64, expansion_search=64)
        new = sorted_keys
    if len(new):
        at = np.searchsorted(sorted_keys, new)
        rows = (new & np.uint64(0xFFFF)).astype(np.int64)
        vectors = np.stack([blocks[key_target[i]].vectors[r] for i, r in zip(at.tolist(), rows.tolist(),
                                                                              strict=True)]).astype(np.float16)
        index.add(new, vectors, threads=0)
    return index, sorted_keys, key_target
