"""Decoding helpers shared by every engine that samples tokens itself (local engine, ULD lock-step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Below this temperature sampling is numerically greedy (logits / t overflows), so decode greedily.
GREEDY_BELOW = 1e-5


def eos_token_ids(generation_eos: int | list[int] | None, tokenizer) -> list[int]:
    """The ids that end a generation: the generation config's (one or several), else the tokenizer's."""
    eos = generation_eos or tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list) else [eos]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next token from 1-D logits: greedy at temperature ~0, else nucleus sampling."""
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.nan_to_num(torch.softmax(logits.float() / temperature, dim=-1), nan=0.0)
    if float(probs.sum()) <= 0.0:  # every token was forbidden: nothing to sample from
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        outside[0] = False  # explicitly: a top_p below float32's range (5e-324) compares as 0 and keeps nothing
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns generated token ids into text increments, honouring stop strings.

    Text is held back while it could still be the start of a stop string or ends in an incomplete
    UTF-8 sequence, so a client never sees characters that are later taken back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show. Sets ``stopped`` on a stop string."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        if self._stop:
            window_start = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [i for i in (text.find(s, window_start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(text[: min(hits)])
            safe_end = len(text) - self._partial_stop_suffix(text)
            return self._take(text[:safe_end])
        return self._take(text)

    def flush(self) -> str:
        """The held-back text at the end of generation (no stop string followed)."""
        if self.stopped:
            return ""
        return self._take(self._tokenizer.decode(self._ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        if len(text) <= self._emitted:
            return ""
        new = text[self._emitted :]
        self._emitted = len(text)
        return new

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
