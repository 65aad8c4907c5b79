"""Training prompts derived from a target's own facts, for the prompts an operator never thinks to list.

Why: the learned stage decides exactly the prompts that do not name the target, and an operator's examples
almost always do. Two kinds of derived prompts fill the gap, both built only from operator material:
- reverse questions ("Stephen King wrote Carrie." -> "Who wrote Carrie?"): a fact sentence whose subject is the
  target becomes a question *for* the target. These are positives, and also exemplar rows, so a jailbreak that
  asks "who wrote ...?" instead of naming the target lands near them;
- related-entity questions ("What is The Shawshank Redemption known for?"): questions about the other people,
  works and places the facts mention, which do not ask for the target. These are the neighbour-like negatives
  that generic everyday prompts cannot stand in for: they teach and calibrate the learned stage on prompts that
  share the target's topic without asking about the target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from classifiers.lexical import LexicalMatcher, TargetPatterns, proper_phrases

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PRONOUN = re.compile(r"^(?:He|She|They)\s+(?=[a-z])")
_POSSESSIVE_PRONOUN = re.compile(r"^(?:His|Her|Their)\s+(?=[a-z])")
_PARENTHESIS = re.compile(r"^\s*\([^)]*\)\s*,?\s*")
_RELATED_TEMPLATES = ("What is {} known for?", "Tell me about {}.")


def _sentences(facts: Sequence[str]) -> list[str]:
    return [s.strip() for fact in facts for s in _SENTENCE.split(fact) if 5 <= len(s.split()) <= 40]


def reverse_questions(facts: Sequence[str], target_id: str, patterns: TargetPatterns, limit: int) -> list[str]:
    """Fact sentences about the target, turned into questions whose answer is the target."""
    matcher = LexicalMatcher({target_id: patterns})
    out: list[str] = []
    for sentence in _sentences(facts):
        rest = None
        head = [m for m in matcher.find([sentence]) if m.kind != "partial" and m.start <= 1]
        if head:
            tail = sentence[head[0].end:]
            if tail.startswith(("'s ", "’s ")):
                rest = "Whose " + tail[3:]
            else:
                tail = _PARENTHESIS.sub("", tail)
                if tail[:1].islower():
                    rest = "Who " + tail
        elif _PRONOUN.match(sentence):
            rest = "Who " + _PRONOUN.sub("", sentence)
        elif _POSSESSIVE_PRONOUN.match(sentence):
            rest = "Whose " + _POSSESSIVE_PRONOUN.sub("", sentence)
        if rest:
            out.append(rest.rstrip(" .;:!") + "?")
        if len(out) >= limit:
            break
    return out


def related_questions(facts: Sequence[str], patterns: TargetPatterns, limit: int) -> list[str]:
    """Questions about the other entities the facts mention (not about the target)."""
    own = (*patterns.full, *patterns.partial)
    seen: set[str] = set()
    out: list[str] = []
    for sentence in _sentences(facts):
        for match in re.finditer(r"(?:[A-Z][\w'’.-]+)(?:\s+(?:of|the|and|de|la)?\s*[A-Z][\w'’.-]+)+", sentence):
            phrase = re.sub(r"\s+", " ", match.group()).strip().rstrip(".,;:")
            norm = proper_phrases(phrase)
            if not norm or norm[0] in seen or any(f" {p} " in f" {norm[0]} " for p in own):
                continue
            seen.add(norm[0])
            template = _RELATED_TEMPLATES[len(out) % len(_RELATED_TEMPLATES)]
            out.append(template.format(phrase))
            if len(out) >= limit:
                return out
    return out
