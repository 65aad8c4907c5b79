"""Which windows are worth the sentence encoder: those that share a content word with some active target.

Why: the encoder is the classifier's whole cost (about 0.1 ms per word piece on two cores), while most of a long
prompt is text that shares no distinctive word with any target's name, description, facts or examples:
pasted documents, small talk, code. A window that has no such word cannot be close to a target in the ways
the semantic and learned stages look for, so it is not encoded. The word index is a dictionary, so the check
costs the same at 10 or 100,000 targets. Function words and words that a large share of the targets use are
not distinctive and do not open the gate.

Trade-off, measured in the README: a paraphrase that replaces every content word of the target's material
(and any language the facts are not written in) is only seen by the lexical stage. ``ClassifierConfig.gate``
turns the gate off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from classifiers.normalize import normalize

# Our own list of English function words and very common verbs (no distinctive content).
STOPWORDS = frozenset("""
    a as about above after again against all also am an and any are at be because been before being below
    between both but by can could did do does doing done down during each else ever every few for from further
    get gets got had has have having he her here hers herself him himself his how however i if in into is it its
    itself just know known let like made make many may me might more most much must my myself near never new no
    nor not now of off often on once one only or other our ours ourselves out over own please same say says she
    should so some such tell than that the their theirs them themselves then there these they this those through
    to too under until up upon us use used very was we were what when where which while who whom whose why will
    with within without would yes yet you your yours yourself yourselves name named called first last well way
    two three
""".split())

_WORD = re.compile(r"[a-z0-9]+")


def content_words(texts: Iterable[str]) -> set[str]:
    """Normalised words of three or more characters that are not function words."""
    words: set[str] = set()
    for text in texts:
        for word in _WORD.findall(normalize(text).text):
            if len(word) >= 3 and word not in STOPWORDS:
                words.add(word)
    return words
