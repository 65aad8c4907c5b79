"""ECO: corrupt the input embeddings of the flagged prompt tokens (Liu et al., NeurIPS 2024).

Why the embeddings and not the text: the served model never sees a clean copy of the entity it must forget, yet
the rest of the prompt (and every generated token) is untouched, so the answer stays fluent but uninformed. The
corruption is applied once, to the prefill; decoding is ordinary.

Everything here is pure: token ids, offsets and tensors in, tensors (or content parts) out. Engines receive the
result as ``EmbedsPart`` content parts, which the local engine splices into its prefill and the vLLM engine sends
as ``prompt_embeds`` chat content parts.

Default strength: Gaussian noise with sigma = 1.0 on every dimension. It is stated in absolute units like the
paper's sigma, and it is far above the scale of typical input embeddings (the demo model's rows have per-dimension
std ~0.07 and norm ~1.1; Llama-2's are smaller still), so the corrupted rows carry no usable signal about the
entity without any per-model search. ``unlearn-gateway tune eco`` searches a target's sigma so that its examples
are answered like the retain model answers them.

Which positions: ``EcoPolicy.scope`` "prompt" (the default) corrupts every token of the flagged message but the
last; "entity" only the classifier's spans. On a model that memorised whole questions the wording left around a
corrupted name still recalls the answer (README, Policies), which is why the default is the whole message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Corruption = Literal["gaussian", "zero", "flip"]
Span = tuple[int, int]  # [start, end) character offsets

DEFAULT_SIGMA = 1.0


@dataclass(frozen=True)
class EcoParams:
    """How to corrupt: mirrors ``EcoPolicy`` (corruption, sigma, dims, seed) without depending on the registry."""

    corruption: Corruption = "gaussian"
    sigma: float = DEFAULT_SIGMA
    dims: int | None = None  # gaussian: the first ``dims`` dimensions; zero/flip: the top-``dims`` by |value|
    seed: int | None = 0

    @classmethod
    def from_policy(cls, policy) -> EcoParams:
        """From an ``EcoPolicy`` (or anything with the same attribute names)."""
        seed = policy.seed if policy.seed is not None else 0
        return cls(policy.corruption, float(policy.sigma), policy.dims, seed)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed) % 2**64)


def _top_k_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest-|value| dimensions of each row."""
    k = min(k, rows.shape[-1])
    top = rows.abs().topk(k, dim=-1).indices
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, top, True)


def corrupt_rows(rows: torch.Tensor, params: EcoParams) -> torch.Tensor:
    """Corrupt every row of ``rows`` ``(n, hidden)``; returns a new tensor, the input is left untouched."""
    out = rows.detach().clone()
    if out.numel() == 0:
        return out
    hidden = out.shape[-1]
    dims = hidden if params.dims is None else min(params.dims, hidden)
    if params.corruption == "gaussian":
        noise = torch.randn((out.shape[0], dims), generator=_generator(params.seed, out.device),
                            device=out.device, dtype=torch.float32)
        out[:, :dims] += (params.sigma * noise).to(out.dtype)
    elif params.corruption == "zero":
        out[_top_k_mask(out, dims)] = 0
    elif params.corruption == "flip":
        mask = _top_k_mask(out, dims)
        out[mask] = -out[mask]
    else:
        raise ValueError(f"unknown corruption {params.corruption!r}")
    return out


def corrupt_positions(embeds: torch.Tensor, positions: Iterable[int], params: EcoParams) -> torch.Tensor:
    """Corrupt exactly the given positions of ``embeds`` ``(seq, hidden)``; other rows are returned unchanged."""
    index = sorted({int(p) for p in positions})
    out = embeds.detach().clone()
    if not index:
        return out
    if index[0] < 0 or index[-1] >= embeds.shape[0]:
        raise IndexError(f"positions must lie in [0, {embeds.shape[0]})")
    rows = torch.tensor(index, device=embeds.device)
    out[rows] = corrupt_rows(embeds[rows], params)
    return out


def positions_for_spans(offsets: Sequence[tuple[int, int]], spans: Iterable[Span]) -> list[int]:
    """Token positions whose character range overlaps any span (ECO maps NER spans the same way).

    ``offsets`` are the tokenizer's ``(start, end)`` per token; empty-width tokens (specials) never match.
    """
    spans = [(int(s), int(e)) for s, e in spans if e > s]
    return [i for i, (start, end) in enumerate(offsets)
            if end > start and any(start < s_end and s_start < end for s_start, s_end in spans)]


def all_but_last(length: int) -> list[int]:
    """ECO's fallback scope when no entity span is known: every prompt position except the last."""
    return list(range(max(0, length - 1)))


class OffsetTokenizer(Protocol):
    """A transformers fast tokenizer (what ``__call__`` with ``return_offsets_mapping`` needs)."""

    def __call__(self, text: str, **kwargs): ...


EmbedLookup = Callable[[Sequence[int]], torch.Tensor]  # token ids -> (n, hidden) input-embedding rows


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions -> maximal runs ``[first, last]``."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def corrupted_content(text: str, spans: Iterable[Span], tokenizer: OffsetTokenizer, embed: EmbedLookup,
                      params: EcoParams, fallback_all: bool = True) -> list:
    """A message's text -> content parts ``[text, EmbedsPart(corrupted), text, ...]``.

    The text is tokenized once with offsets; every run of tokens overlapping a span is cut out at token
    boundaries and replaced by its corrupted input embeddings, so both engines rebuild the same token sequence
    around it. With no span (or none matching a token) and ``fallback_all``, every token but the last is
    corrupted (ECO's rule for prompts without entities). Each run gets its own noise draw (seed + run index).
    Returns ``[text]`` unchanged when nothing is to be corrupted.
    """
    from gateway.engines.base import EmbedsPart  # the engine interface's content-part type (no engine code)

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    positions = positions_for_spans(offsets, spans)
    if not positions and fallback_all:
        positions = all_but_last(len(ids))
    if not positions:
        return [text]
    parts: list = []
    cursor = 0
    for n, (first, last) in enumerate(_runs(positions)):
        start, end = offsets[first][0], offsets[last][1]
        if start > cursor:
            parts.append(text[cursor:start])
        run_params = params if params.seed is None else EcoParams(params.corruption, params.sigma, params.dims,
                                                                   params.seed + n)
        rows = embed(ids[first:last + 1])
        parts.append(EmbedsPart(corrupt_rows(rows, run_params)))
        cursor = end
    if cursor < len(text):
        parts.append(text[cursor:])
    return parts


def name_spans(text: str, names: Iterable[str]) -> list[Span]:
    """Case-insensitive occurrences of any of ``names`` in ``text`` (what a lexical classifier reports)."""
    lowered = text.lower()
    spans: list[Span] = []
    for name in names:
        needle = name.strip().lower()
        if not needle:
            continue
        start = lowered.find(needle)
        while start >= 0:
            spans.append((start, start + len(needle)))
            start = lowered.find(needle, start + 1)
    return sorted(spans)


__all__ = [
    "DEFAULT_SIGMA",
    "Corruption",
    "EcoParams",
    "EmbedLookup",
    "all_but_last",
    "corrupt_positions",
    "corrupt_rows",
    "corrupted_content",
    "name_spans",
    "positions_for_spans",
]
