"""Static sentence vectors: a microsecond-cheap stand-in for the sentence encoder, used only to decide which
windows are worth encoding (the second half of the encoder gate, ``classifiers.gate``).

Why: the encoder costs ~4 ms for even a one-line window on two cores, and most windows that share a word with
some target (``music`` in small talk, when one target's facts mention folk music) are nowhere near it. A static
vector - the weighted mean of per-token vectors - ranks such windows far below the target's own prompts at
the cost of a table look-up, so the gate can skip them.

The token table is distilled once from the encoder itself (each word piece encoded alone, ``[CLS] t [SEP]``,
mean-pooled; the idea of model2vec), reduced by PCA to ``STATIC_DIM`` dimensions, and cached beside the ONNX
export. A window's vector weights its pieces by smooth inverse frequency, ``a / (a + p(word))`` with ``p``
from ``wordfreq``'s English table, so function words count for little and rare names for most.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from classifiers.encoder import cached_array, model_path
from classifiers.normalize import normalize

log = logging.getLogger(__name__)

STATIC_DIM = 64
SIF_A = 1e-4  # smooth-inverse-frequency constant: "the" weighs 0.002, "garden" 0.7, an unseen name 1.0
_BATCH = 2048
_WORD = re.compile(r"[a-z0-9]+")


class StaticEmbedder:
    """Texts -> unit-length ``STATIC_DIM`` vectors from a per-token table.

    Works on normalised words (``classifiers.normalize``; the encoder is uncased and strips accents too): each
    distinct word is cut into word pieces once and its weighted piece sum cached, so a window costs a few
    dictionary look-ups per word rather than a tokenizer call.
    """

    name = "minilm-static"
    dim = STATIC_DIM
    cache_size = 20_000  # words of live prompts; index builds do not fill it (their names are one-offs)

    def __init__(self, tokenizer: Any, table: np.ndarray, weights: np.ndarray) -> None:
        self._tokenizer = tokenizer
        self._table = table  # float32 (vocabulary, STATIC_DIM), already multiplied by the token weights
        self._weights = weights  # float32 (vocabulary,)
        self._words: dict[str, tuple[np.ndarray, float]] = {}

    def _word(self, word: str, remember: bool) -> tuple[np.ndarray, float]:
        cached = self._words.get(word)
        if cached is None:
            ids = self._tokenizer.encode(word, add_special_tokens=False).ids
            cached = (self._table[ids].sum(axis=0), float(self._weights[ids].sum()))
            if remember:
                if len(self._words) >= self.cache_size:
                    self._words.clear()
                self._words[word] = cached
        return cached

    def embed_words(self, windows: Sequence[Sequence[str]], remember: bool = True) -> np.ndarray:
        """One vector per window given as its normalised words (``remember``: cache the words' vectors)."""
        out = np.zeros((len(windows), self.dim), np.float32)
        for i, words in enumerate(windows):
            total = 0.0
            for word in words:
                vector, weight = self._word(word, remember)
                out[i] += vector
                total += weight
            if total > 0:
                out[i] /= total
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of exemplar texts (index builds: their words are not cached)."""
        return self.embed_words([words(text) for text in texts], remember=False)


def words(text: str) -> list[str]:
    """The normalised words of ``text``."""
    if text.isascii():  # most prompts: the same words without building the map back to the original characters
        return _WORD.findall(text.lower())
    return _WORD.findall(normalize(text).text)


def _token_weights(vocabulary: dict[str, int]) -> np.ndarray:
    from wordfreq import word_frequency

    weights = np.ones(len(vocabulary), np.float32)
    for piece, i in vocabulary.items():
        if piece.startswith("[") and piece.endswith("]"):
            weights[i] = 0.0  # [CLS], [SEP], [PAD], [UNK], [unusedN]
        elif not piece.startswith("##"):
            weights[i] = SIF_A / (SIF_A + word_frequency(piece, "en"))
    return weights


def distil_table(encode_ids: Callable[[np.ndarray], np.ndarray], vocabulary_size: int,
                 parallel: int = 1) -> np.ndarray:
    """Each word piece encoded alone by the sentence encoder (``encode_ids`` maps (n, 3) id rows to (n, dim)
    mean-pooled vectors), projected onto its top ``STATIC_DIM`` principal components. ``parallel`` batches run
    at once (the encoder runs each single-threaded); the batches, and so the table, are the same either way."""
    log.info("distilling the static token table (once; ~16 s on two cores)")
    batches = []
    for start in range(0, vocabulary_size, _BATCH):
        ids = np.arange(start, min(vocabulary_size, start + _BATCH), dtype=np.int64)
        cls, sep = np.full_like(ids, 101), np.full_like(ids, 102)
        batches.append(np.stack([cls, ids, sep], axis=1))
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        rows = list(pool.map(encode_ids, batches))
    full = np.concatenate(rows).astype(np.float32)
    centred = full - full.mean(axis=0)
    _, _, components = np.linalg.svd(centred[::4], full_matrices=False)
    return (centred @ components[:STATIC_DIM].T).astype(np.float32)


def static_embedder(encoder: Any) -> StaticEmbedder | None:
    """The encoder's static stand-in, or None for encoders that have none."""
    load = getattr(encoder, "static_embedder", None)
    return load() if load is not None else None


def load_static(encoder: Any) -> StaticEmbedder | None:
    """The static embedder distilled from ``encoder`` (cached on disk), or None when the encoder cannot
    encode raw token ids (then the gate falls back to shared words alone)."""
    encode_ids = getattr(encoder, "encode_token_ids", None)
    tokenizer = getattr(encoder, "tokenizer", None)
    if encode_ids is None or tokenizer is None:
        return None
    vocabulary = tokenizer.get_vocab()
    tag = hashlib.sha1(f"{encoder.name}:{model_path()}:{len(vocabulary)}:{STATIC_DIM}".encode()).hexdigest()[:12]
    table = cached_array(f"static-{tag}.npy",
                         lambda: distil_table(encode_ids, len(vocabulary), getattr(encoder, "parallel", 1)))
    weights = _token_weights(vocabulary)
    return StaticEmbedder(tokenizer, table * weights[:, None], weights)
