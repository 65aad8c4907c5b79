"""ROUGE-L as TOFU reports it: longest common subsequence over lower-cased word tokens.

TOFU's ``rougeL_recall`` uses the ``rouge_score`` package with stemming off; its tokenizer lower-cases,
replaces every non-alphanumeric character by a space and splits on whitespace. We do the same so our
figures compare with the published ones.
"""

from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Share of the reference's tokens that appear, in order, in the prediction."""
    ref = tokens(reference)
    if not ref:
        return 0.0
    return _lcs_length(tokens(prediction), ref) / len(ref)
