"""Teacher-forced answer likelihoods under a policy-carrying ``GenerationRequest`` (TOFU's probabilities).

Why from the request: the leakage evaluation builds exactly the requests the gateway would send to the local
engine (ECO content parts, GUARD processors, a ULD assistant), and scores answers under the same hooks, so the
probabilities describe the served behaviour, not a re-implementation of it:
- embedding parts are spliced into the prompt as in prefill;
- logits processors are applied at every answer position with the answer's own prefix as output history;
- with an assistant, ULD's combination is used in its scoring form (``exclude_outside=False``: outside the
  relative-top set the target's logits stand, as ULD's own scoring does, so no loss is infinite). A hard GUARD
  ban is scored as a finite penalty for the same reason (``hard_as``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gateway.engines.base import GenerationRequest
from gateway.engines.local import LocalEngine, Prompt
from policies.uld import UldParams, combine


def _answer_ids(engine: LocalEngine, answer: str) -> list[int]:
    return engine.main.encode(answer)


@torch.inference_mode()
def answer_nlls(engine: LocalEngine, request: GenerationRequest, answers: Sequence[str],
                uld: UldParams | None = None, hard_as: float = 10.0) -> list[float]:
    """Mean negative log-likelihood per answer token of each answer after the request's prompt."""
    main = engine.main
    prompt = engine.render(request)
    out: list[float] = []
    for answer in answers:
        ids = _answer_ids(engine, answer)
        if not ids:
            out.append(float("nan"))
            continue
        full = Prompt(prompt.ids + ids, prompt.embeds)
        if full.embeds:
            logits = main.model(inputs_embeds=main.input_embeddings(full)).logits[0]
        else:
            logits = main.model(input_ids=torch.tensor([full.ids], device=main.device)).logits[0]
        start = len(prompt.ids) - 1
        scores = logits[start:start + len(ids)].float()
        if request.assistant is not None:
            assistant = engine.load_assistant(request.assistant.model)
            a_logits = assistant.model(input_ids=torch.tensor([full.ids], device=assistant.device)).logits[0]
            params = uld or UldParams()
            scores = combine(scores, a_logits[start:start + len(ids)].float(), params.weight, params.alpha,
                             exclude_outside=False, min_keep=params.min_keep, gate=params.gate)
        if request.logits_processors:
            rows = []
            for k in range(len(ids)):
                row = scores[k].clone()
                for processor in request.logits_processors:
                    row = processor(prompt.ids, ids[:k], row)
                rows.append(torch.nan_to_num(row, neginf=-hard_as * 1e3).clamp(min=scores[k].min() - hard_as))
            scores = torch.stack(rows)
        logprobs = torch.log_softmax(scores, dim=-1)
        picked = logprobs[torch.arange(len(ids)), torch.tensor(ids)]
        out.append(float(-picked.mean()))
    return out


__all__ = ["answer_nlls"]
