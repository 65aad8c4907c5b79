"""Per-request logits processors.

A processor is ``(prompt_ids, output_ids, logits) -> logits`` on one sequence's 1-D logits over the
vocabulary, called once per decoding step before sampling. ``LogitBias`` and ``BadWords`` reproduce the
semantics of vLLM's built-in ``logit_bias`` and ``bad_words`` request fields, so the reference worker
behaves like vLLM and GUARD can compare itself against them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

LogitsProcessor = Callable[[Sequence[int], Sequence[int], torch.Tensor], torch.Tensor]


def apply_processors(
    processors: Iterable[LogitsProcessor], prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
) -> torch.Tensor:
    for processor in processors:
        logits = processor(prompt_ids, output_ids, logits)
    return logits


class LogitBias:
    """Add a fixed bias to chosen token ids (OpenAI's ``logit_bias``, values clamped to [-100, 100])."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = torch.tensor(list(bias.keys()), dtype=torch.long)
        self.values = torch.tensor([max(-100.0, min(100.0, v)) for v in bias.values()], dtype=torch.float32)

    def __call__(self, prompt_ids, output_ids, logits: torch.Tensor) -> torch.Tensor:
        logits[self.ids] += self.values.to(logits.dtype)
        return logits


class BadWords:
    """vLLM's ``bad_words``: ban a word's last token when its other tokens were just generated.

    Each word is tokenized as given and with a leading space. Only output tokens are matched, and a
    multi-token word's first tokens stay allowed: that is vLLM's behaviour, which GUARD improves on.
    """

    def __init__(self, token_sequences: Iterable[Sequence[int]]):
        self.sequences = [tuple(seq) for seq in token_sequences if seq]

    @classmethod
    def from_words(cls, words: Iterable[str], encode: Callable[[str], list[int]]) -> BadWords:
        sequences: set[tuple[int, ...]] = set()
        for word in words:
            for variant in (word.lstrip(" "), " " + word.lstrip(" ")):
                sequences.add(tuple(encode(variant)))
        return cls(sorted(sequences))

    def __call__(self, prompt_ids, output_ids, logits: torch.Tensor) -> torch.Tensor:
        for seq in self.sequences:
            prefix = seq[:-1]
            if not prefix or tuple(output_ids[-len(prefix):]) == prefix:
                logits[seq[-1]] = float("-inf")
        return logits
