"""ULD: unlearning from logit difference (Ji et al., NeurIPS 2024), as tensors.

Why a difference of two models: an *assistant* (the served model's first K layers + LoRA) is trained to remember
exactly the forget facts and to be flat (uniform) on everything else. Decoding with ``z_target + w * z_assistant``
(w < 0) then subtracts what the assistant knows: on a forget question both peak on the memorised answer and the
peak cancels; elsewhere the assistant is flat, adds a constant, and the target's distribution is unchanged.

The relative-top filter keeps only tokens the target itself finds plausible (``p_t >= alpha * max p_t``, i.e.
``log p_t >= max log p_t + log alpha``); the assistant is ignored outside that set and the tokens there are
excluded, so subtracting the assistant can never promote an implausible token. ULD's released code also keeps at
least ``floor(alpha * |V|)`` tokens (the threshold is the lower of the two), and that is the default here
(``min_keep=None``; ``0`` = the relative-top rule alone). It decides whether ULD acts at all on a peaked target:
a model that memorised its answers keeps a single token at most steps under the plain rule, and then no assistant
can change anything (measured: forget ROUGE-L 0.91 -> 0.50 on the demo twin's training examples). Over HTTP the
floor is exact only while the top K covers it (``K >= alpha * |V|``).

Where the assistant recognises nothing, ``gate`` leaves the step alone (beyond the paper): the difference is applied
only at steps where the assistant gives one of the target's kept candidates probability >= ``gate``, i.e. where
it recognises a fact; elsewhere the target's own logits are returned unchanged. Why: a flat assistant is flat only
on what it was trained to be flat on, and on any other prefix its logits are noise that ``w * z_a`` adds to every
step; on the demo twin that noise turned answers to prompts it does not know into word salad. Gated, the keep
prompts served as if flagged are unchanged (ROUGE-L 0.978 -> 1.000 on the TOFU targets' training examples), and
the stronger default weight -1.5 (ULD's TOFU setting is -0.8, ``PAPER_WEIGHT``) then acts only on recognised facts:
forget ROUGE-L there 0.223 (ungated, -0.8) -> 0.178 against the retain twin's 0.190. The gate reads only the kept
candidates' assistant probabilities, so the lock-step form over logprobs applies it exactly as well.

Because ``softmax(z_t + w z_a)`` equals ``softmax(log p_t + w log p_a)`` on the kept set (the log-sum-exp
constants shift every kept token alike), the same rule runs over logprobs returned by an HTTP worker:
``combine_top_logprobs`` is the lock-step form for vLLM, exact over the target's top-K candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial

import torch

PAPER_WEIGHT = -0.8  # ULD's TOFU setting
DEFAULT_WEIGHT = -1.5  # with the gate (see the module docstring)
DEFAULT_ALPHA = 0.01
DEFAULT_GATE = 0.5


@dataclass(frozen=True)
class UldParams:
    """Mirrors ``UldPolicy``'s decoding parameters."""

    weight: float = DEFAULT_WEIGHT
    alpha: float = DEFAULT_ALPHA
    min_keep: int | None = None  # None = ULD's code: floor(alpha * |V|); 0 = the plain relative-top rule
    gate: float = DEFAULT_GATE  # act only where the assistant recognises a fact; 0 = every step (ULD's rule)

    @classmethod
    def from_policy(cls, policy) -> UldParams:
        min_keep = getattr(policy, "min_keep", None)
        return cls(float(policy.weight), float(policy.alpha), None if min_keep is None else int(min_keep),
                   float(getattr(policy, "gate", DEFAULT_GATE)))


def reference_min_keep(alpha: float, vocab_size: int) -> int:
    """The filter's floor in ULD's released code: at least ``floor(alpha * |V|)`` tokens are kept."""
    return int(alpha * vocab_size)


def uld_params(policy, vocab_size: int) -> UldParams:
    """From a ``UldPolicy`` on a model with ``vocab_size`` tokens, ``min_keep=None`` resolved to ULD code's floor."""
    params = UldParams.from_policy(policy)
    if params.min_keep is None:
        return replace(params, min_keep=reference_min_keep(params.alpha, vocab_size))
    return params


def relative_top_mask(target_logits: torch.Tensor, alpha: float, min_keep: int | None = 0) -> torch.Tensor:
    """True where the target finds a token plausible: ``log p_t >= max log p_t + log alpha`` (last dim), or
    among its ``min_keep`` most likely tokens (``None``: ULD code's ``floor(alpha * |V|)``)."""
    logprobs = torch.log_softmax(target_logits.float(), dim=-1)
    threshold = logprobs.max(dim=-1, keepdim=True).values + math.log(alpha)
    if min_keep is None:
        min_keep = reference_min_keep(alpha, logprobs.shape[-1])
    if min_keep > 0:
        kth = logprobs.topk(min(min_keep, logprobs.shape[-1]), dim=-1).values[..., -1:]
        threshold = torch.minimum(threshold, kth)
    return logprobs >= threshold


def combine(target_logits: torch.Tensor, assistant_logits: torch.Tensor, weight: float = PAPER_WEIGHT,
            alpha: float = DEFAULT_ALPHA, exclude_outside: bool = True, min_keep: int | None = 0,
            gate: float = 0.0) -> torch.Tensor:
    """``z_t + w * z_a`` on the relative-top set of the target; ``-inf`` outside it. With ``gate > 0``, rows where
    the assistant gives no kept candidate probability >= ``gate`` are the target's logits unchanged. (The defaults
    here are ULD's published rule; ``UldParams`` holds what the gateway serves.)

    ``exclude_outside=False`` keeps the target's own logits outside the set (assistant ignored there): the form
    ULD scores answer probabilities with, where an excluded token would make a loss infinite.
    """
    keep = relative_top_mask(target_logits, alpha, min_keep)
    z_t = target_logits.float()
    z_a = assistant_logits.float()
    zero = torch.zeros((), device=z_t.device)
    mixed = z_t + weight * torch.where(keep, z_a, zero)
    if exclude_outside:
        mixed = mixed.masked_fill(~keep, float("-inf"))
    if gate > 0:
        recognised = torch.where(keep, torch.softmax(z_a, dim=-1), zero).amax(dim=-1, keepdim=True) >= gate
        mixed = torch.where(recognised, mixed, z_t)
    return mixed


def combiner(params: UldParams | None = None):
    """The ``Assistant.combine`` callable the local engine takes."""
    params = params or UldParams()
    return partial(combine, weight=params.weight, alpha=params.alpha, min_keep=params.min_keep, gate=params.gate)


def lockstep_threshold(target: Mapping[int, float], alpha: float, min_keep: int | None = 0) -> float:
    """The filter's log-probability threshold from the target's top-K (exact while ``min_keep <= K``; ``None``,
    ULD code's ``floor(alpha * |V|)``, keeps all K reported candidates: exact while ``K >= alpha * |V|``)."""
    threshold = max(target.values()) + math.log(alpha)
    if min_keep is None:
        min_keep = len(target)
    if min_keep > 0:
        ranked = sorted(target.values(), reverse=True)
        threshold = min(threshold, ranked[min(min_keep, len(ranked)) - 1])
    return threshold


def combine_top_logprobs(target: Mapping[int, float], assistant: Mapping[int, float], weight: float = PAPER_WEIGHT,
                         alpha: float = DEFAULT_ALPHA, min_keep: int | None = 0, gate: float = 0.0) -> dict[int, float]:
    """Lock-step ULD over logprobs: the target's top-K ``{id: log p_t}`` and the assistant's ``{id: log p_a}``.

    Returns ``{id: log p_t + w log p_a}`` for the target's top-K ids that pass the relative-top filter. The
    target's max logprob is its top-1 (always in the top-K), so the filter is exact; the result equals the full
    local ``combine`` restricted to the kept ids (up to a constant) whenever K covers the kept set. An id the
    assistant did not report is an error: ask the assistant for exactly these ids (``logprob_token_ids``). With
    ``gate > 0`` and no kept id at assistant probability >= ``gate``, the target's top-K is returned unchanged.
    """
    if not target:
        raise ValueError("the target reported no logprobs")
    threshold = lockstep_threshold(target, alpha, min_keep)
    kept = [token_id for token_id, lp_t in target.items() if lp_t >= threshold]
    missing = [token_id for token_id in kept if token_id not in assistant]
    if missing:
        raise KeyError(f"the assistant reported no logprob for token {missing[0]}")
    if gate > 0 and max(assistant[token_id] for token_id in kept) < math.log(gate):
        return dict(target)
    return {token_id: target[token_id] + weight * assistant[token_id] for token_id in kept}


def scores_tensor(combined: Mapping[int, float], vocab_size: int) -> torch.Tensor:
    """Sparse combined scores -> a dense ``[V]`` tensor, ``-inf`` outside (what the samplers take)."""
    scores = torch.full((vocab_size,), float("-inf"))
    if combined:
        scores[torch.tensor(list(combined.keys()))] = torch.tensor(list(combined.values()), dtype=torch.float32)
    return scores


__all__ = ["DEFAULT_ALPHA", "DEFAULT_GATE", "DEFAULT_WEIGHT", "PAPER_WEIGHT", "UldParams", "combine",
           "combine_top_logprobs", "combiner", "lockstep_threshold", "reference_min_keep", "relative_top_mask",
           "scores_tensor", "uld_params"]
