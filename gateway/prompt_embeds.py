"""vLLM's wire encoding of prompt embeddings: base64 of ``torch.save(tensor)``.

vLLM decodes with ``pybase64.b64decode(validate=True)`` then ``torch.load(weights_only=True)`` on the CPU
(``vllm/renderers/embed_utils.py``); the gateway encodes what it sends to vLLM and the reference worker
decodes the same way.
"""

from __future__ import annotations

import base64
import io

import torch

from gateway.errors import BadRequest


def decode_embeds(data: str, param: str) -> torch.Tensor:
    """base64 of ``torch.save(tensor)`` -> tensor, loaded safely (weights_only) on the CPU, as vLLM does."""
    try:
        raw = base64.b64decode(data, validate=True)
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # binascii.Error, pickle errors, torch errors: all mean "undecodable"
        raise BadRequest(f"could not decode prompt embeds: {exc}", param=param) from exc
    if not isinstance(tensor, torch.Tensor):
        raise BadRequest("prompt embeds must decode to a tensor", param=param)
    if tensor.is_sparse:
        tensor = tensor.to_dense()
    if not tensor.is_floating_point():
        raise BadRequest(f"prompt embeds must be a floating tensor, got {tensor.dtype}", param=param)
    return tensor


def encode_embeds(tensor: torch.Tensor) -> str:
    """The client side of the same encoding (what the gateway sends to vLLM)."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()
