"""Input-embedding rows of a checkpoint, read on demand (what the gateway needs to send ECO to vLLM).

Why not load the model: the gateway in front of vLLM holds no model, only the checkpoint files. ECO needs the
rows of the token-embedding matrix for the few tokens it corrupts, and safetensors slices read just those rows
(memory-mapped), so a 1 GB embedding matrix is never loaded.

vLLM expects the output of the model's own ``embed_input_ids()``; for Llama-style models that is the raw row.
Architectures that scale inside it (Gemma: x sqrt(hidden)) need ``scale``; see VLLM.md §1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

_EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight",
                   "model.language_model.embed_tokens.weight")


class EmbeddingTable:
    """Row lookup ``ids -> (n, hidden)`` over a checkpoint folder's safetensors files."""

    def __init__(self, checkpoint: Path, scale: float = 1.0, dtype: torch.dtype = torch.float32):
        from safetensors import safe_open

        self.scale = scale
        self.dtype = dtype
        for file in sorted(Path(checkpoint).glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            names = set(handle.keys())  # a safetensors handle, not a dict
            key = next((k for k in _EMBEDDING_KEYS if k in names), None)
            if key is not None:
                self._slice = handle.get_slice(key)
                self._handle = handle  # keeps the memory map open
                self.vocab_size, self.hidden_size = self._slice.get_shape()
                return
        raise FileNotFoundError(f"no token-embedding matrix in {checkpoint}")

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        if not ids:
            return torch.zeros((0, self.hidden_size), dtype=self.dtype)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise IndexError(f"token ids must lie in [0, {self.vocab_size})")
        unique = sorted(set(ids))
        read = {i: self._slice[i:i + 1][0] for i in unique}  # one memory-mapped row read per distinct id
        rows = torch.stack([read[i] for i in ids])
        return (rows.to(self.dtype) * self.scale) if self.scale != 1.0 else rows.to(self.dtype)


__all__ = ["EmbeddingTable"]
