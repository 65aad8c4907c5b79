"""Aliases derived from an operator's own texts: the distinctive names a target's material keeps using.

Why: a franchise or a field is named by many words (its characters, places, terms) that no operator wants to list
by hand, in every language its users write. Those names are exactly the words that occur far more often in the
target's material than in ordinary language. So, per language:

- candidates are the words that the texts write capitalised away from the start of a sentence (scripts with
  letter case), every word (caseless scripts with spaces, e.g. Devanagari), or character n-grams of 2-6
  (scripts without spaces, e.g. Han), counted over the texts;
- the background is ``wordfreq``'s frequency of the word in that language (web, subtitles, news, Wikipedia);
- a word is kept when it occurs at least ``min_count`` times, is not an everyday word (background Zipf at most
  ``max_background_zipf``, 3.5: rarer than about 3 per million words; 3.0 in caseless scripts, where no
  capitalisation singles out names, so every word is a candidate) and is ``min_lift`` orders of magnitude more
  frequent in the texts than in the background;
- n-grams must be whole names (see ``_whole_names``); one that contains a character that is itself one of the
  language's commonest words (a particle such as "的") or a common word ("什么") is a phrase, not a name;
- a word that occurs in the generic negatives (everyday prompts) is dropped.
Candidates are ranked by count (the names the material uses most) and interleaved across languages so that every
language gets its share of the alias budget. The result is whatever the texts and the thresholds give; nothing
is written per target. Names are not transliterated here: the matcher folds every script to ASCII and tolerates
a typo, so "Хагрид" already matches "Hagrid", and a letter-by-letter transliteration of the English names into
Cyrillic (the ``transliterate`` package) added no Russian training question under the alias budget (README).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest

import regex
from wordfreq import tokenize, zipf_frequency

from classifiers.normalize import MONTHS, normalize, normalize_pattern
from gateway.registry.targets import MAX_ALIASES

_WORD = regex.compile(r"[\p{L}\p{M}]+(?:[-'’][\p{L}\p{M}]+)*")
_SENTENCE_END = re.compile(r"[.!?。！？:;\"“”«»()\[\]]\s*$")
_POSSESSIVE = re.compile(r"['’]s$")
_NGRAM = range(2, 7)
CASELESS_ZIPF_MARGIN = 0.5  # caseless scripts: every word is a candidate, so the everyday-word bar is stricter
PARTICLE_ZIPF = 6.5  # a single character more common than ~3 per thousand words is a function word
COMMON_PART_ZIPF = 4.0  # a segment more common than 10 per million words makes an n-gram a phrase, not a name
NESTED_SHARE = 0.8  # n-grams one character apart with this share of occurrences are one name (see _whole_names)


@dataclass(frozen=True)
class Corpus:
    """Texts in one language (an ISO 639-1 code that ``wordfreq`` knows)."""

    language: str
    texts: Sequence[str]


@dataclass(frozen=True)
class Candidate:
    text: str
    language: str
    count: int
    background_zipf: float
    lift: float  # log10(frequency in the texts / background frequency)


def _unspaced(ch: str) -> bool:
    """Scripts written without spaces between words."""
    return unicodedata.name(ch, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER",
                                               "MYANMAR", "TIBETAN"))


def _cased(word: str) -> bool:
    return any(ch.isupper() or ch.islower() for ch in word)


def _words(texts: Sequence[str]) -> tuple[Counter[str], Counter[str], int]:
    """(occurrences of each word, its capitalised occurrences away from a sentence start, all words)."""
    counts: Counter[str] = Counter()
    capitalised: Counter[str] = Counter()
    total = 0
    for text in texts:
        for match in _WORD.finditer(text):
            word = _POSSESSIVE.sub("", match.group())
            if any(_unspaced(ch) for ch in word):
                continue
            total += 1
            key = word.lower()
            counts[key] += 1
            before = text[:match.start()].rstrip()
            starts_sentence = not before or bool(_SENTENCE_END.search(before))
            if not _cased(word) or (word[0].isupper() and not starts_sentence):
                capitalised[key] += 1
    return counts, capitalised, total


def _ngrams(texts: Sequence[str]) -> tuple[Counter[str], int]:
    """Character n-grams inside runs of unspaced scripts, and the number of such characters."""
    counts: Counter[str] = Counter()
    total = 0
    for text in texts:
        for run in re.findall(r"\w+", text):
            chars = "".join(ch for ch in run if _unspaced(ch))
            if len(chars) != len(run):
                continue
            total += len(chars)
            for n in _NGRAM:
                for i in range(len(chars) - n + 1):
                    counts[chars[i:i + n]] += 1
    return counts, total


def _whole_names(kept: dict[str, int]) -> list[str]:
    """The n-grams that are a whole name rather than part of one ("霍格沃" inside "霍格沃茨") or a name plus a
    neighbouring word ("在霍格沃茨", "at Hogwarts"): no one-longer n-gram keeps most of their occurrences, and
    they keep most of the occurrences of each one-shorter n-gram inside them."""
    part_of_longer = {sub for gram, count in kept.items() for sub in (gram[1:], gram[:-1])
                      if sub in kept and count >= NESTED_SHARE * kept[sub]}
    return [gram for gram, count in kept.items() if gram not in part_of_longer and all(
        count >= NESTED_SHARE * kept[sub] for sub in (gram[1:], gram[:-1]) if sub in kept)]


def _lift(count: int, total: int, background_zipf: float) -> float:
    # Zipf = log10(frequency per billion words); an unknown word counts as Zipf 0 (once per billion).
    return math.log10(count / max(total, 1) * 1e9) - background_zipf


def candidates(corpus: Corpus, min_count: int, max_background_zipf: float, min_lift: float) -> list[Candidate]:
    """The corpus's distinctive names, best first."""
    out: list[Candidate] = []
    counts, capitalised, total = _words(corpus.texts)
    for word, count in counts.items():
        if count < min_count or capitalised[word] * 2 < count or len(word) < 3:
            continue
        background = zipf_frequency(word, corpus.language)
        lift = _lift(count, total, background)
        bar = max_background_zipf if _cased(word) else max_background_zipf - CASELESS_ZIPF_MARGIN
        if background <= bar and lift >= min_lift:
            out.append(Candidate(word, corpus.language, count, background, lift))
    grams, chars = _ngrams(corpus.texts)
    kept = {g: c for g, c in grams.items() if c >= min_count}
    for gram in _whole_names(kept):
        count = kept[gram]
        background = zipf_frequency(gram, corpus.language)
        lift = _lift(count, chars, background)
        bar = max_background_zipf - CASELESS_ZIPF_MARGIN
        particle = any(zipf_frequency(ch, corpus.language) >= PARTICLE_ZIPF for ch in gram)
        # Segmentation splits unknown names into pieces that may be rare words ("瓦斯"); a common word is no piece.
        everyday_part = any(len(t) > 1 and zipf_frequency(t, corpus.language) > COMMON_PART_ZIPF
                            for t in tokenize(gram, corpus.language))
        if background <= bar and lift >= min_lift and not particle and not everyday_part:
            out.append(Candidate(gram, corpus.language, count, background, lift))
    return sorted(out, key=lambda c: (-c.count, -c.lift, c.text))


def derive_aliases(corpora: Iterable[Corpus], negatives: Sequence[str] = (), limit: int = MAX_ALIASES,
                   min_count: int = 3, max_background_zipf: float = 3.5, min_lift: float = 2.0,
                   exclude: Iterable[str] = ()) -> list[Candidate]:
    """Up to ``limit`` aliases, one language's best after another's; see the module docstring."""
    negative_text = " ".join(normalize(t).text for t in negatives)
    seen = {normalize_pattern(e) for e in exclude}
    ranked = [candidates(c, min_count, max_background_zipf, min_lift) for c in corpora]
    out: list[Candidate] = []
    for row in zip_longest(*ranked):
        for cand in row:
            if cand is None or len(out) >= limit:
                continue
            key = normalize_pattern(cand.text)
            if not key or key in seen or f" {key} " in negative_text:
                continue
            seen.add(key)
            out.append(cand)
    return out


# -- birth names ---------------------------------------------------------------------------------------------

_NAME_WORD = r"[A-Z][\w'’.-]*\.?"
_PERSON = rf"{_NAME_WORD}(?:\s+{_NAME_WORD}){{1,4}}"
# "Carlos Irwin Estévez (born September 3, 1965), known professionally as Charlie Sheen"
_KNOWN_AS = re.compile(rf"^(?P<birth>{_PERSON})\s*\([^)]*\)\s*,?\s*(?:known\s+professionally|better\s+known|"
                       rf"professionally\s+known|known)\s+as\s+(?P<name>{_PERSON})")
# "Meghan, Duchess of Sussex (; born Rachel Meghan Markle; August 4, 1981)", "Sheen was born Carlos Irwin Estévez on",
# "Confucius (孔子; c. 551 – c. 479 BCE), born Kong Qiu (孔丘), was"
_BORN_AS = re.compile(rf"(?P<subject>{_NAME_WORD}(?:,?\s+{_NAME_WORD}|\s+of\s+{_NAME_WORD}){{0,4}})\s*"
                      rf"(?:\(\s*(?:[^()]*?;\s*)?(?:born|née|né)|was\s+born|\([^)]*\)\s*,\s*born)\s+(?P<birth>{_PERSON})"
                      rf"(?=\s*(?:[;,()]|on\b|in\b))")
_SUFFIX_WORDS = {"Jr.", "Jr", "Sr.", "Sr", "II", "III", "IV"}
_PRONUNCIATION = re.compile(r"[A-Z]{2,}-|ə")  # "Houghton HOH-tən": a pronunciation guide, not a name


def birth_names(name: str, texts: Iterable[str]) -> tuple[str, ...]:
    """Other names the target's own texts say it was born with or is known by: "Carlos Irwin Estévez (born ...),
    known professionally as Charlie Sheen", "Sheen was born Carlos Irwin Estévez on ...". The sentence's subject
    (or the "known as" name) must be the target, written only with words of its name ("Lou Walters (born
    Louis Abraham Warmwater)" is Barbara Walters's father). Each birth name also gives its first-and-last form,
    and its middle-and-last form where the middle name is one the target goes by ("Rachel Meghan Markle" ->
    "Meghan Markle" for Meghan, Duchess of Sussex)."""
    own = set(normalize_pattern(name.replace(",", " ")).split())
    found: set[str] = set()
    for text in texts:
        for pattern in (_KNOWN_AS, _BORN_AS):
            for match in pattern.finditer(text):
                named = match.group("name") if pattern is _KNOWN_AS else match.group("subject")
                if not set(normalize_pattern(named.replace(",", " ")).split()) <= own:
                    continue
                words = [w for w in match.group("birth").split() if w not in _SUFFIX_WORDS]
                full = [w for w in words if len(w.rstrip(".")) > 1]  # initials are no name on their own
                if len(full) < 2 or any(w.lower() in MONTHS for w in words) or _PRONUNCIATION.search(" ".join(words)) \
                        or set(normalize_pattern(" ".join(words)).split()) <= own:
                    continue
                found.add(" ".join(words))
                found.add(f"{full[0]} {full[-1]}")
                found.update(f"{w} {full[-1]}" for w in full[1:-1] if normalize_pattern(w) in own)
    return tuple(sorted(found))
