"""Word-by-word English glosses of windows written in other languages, for the English-only encoder.

Why: all-MiniLM-L6-v2 was trained on English. To it, "¿Quién interpretó a Henry Hill en la película
Goodfellas?" is a name, a title and word pieces it cannot read, so the question lands far from the target's
English material ("Who played Henry Hill in Goodfellas?", derived from its facts). No multilingual encoder
installs offline, but the words that carry a question's intent - question words, "played", "born", "film",
"wife" - are few and stable, so a glossary of them turns the window into broken English the encoder does read:
"Who played to Henry Hill in the film Goodfellas?". The glossed window is encoded *beside* the original (same
characters of the same message), never instead of it.

The glossaries (``data/gloss/<lang>.tsv``: Spanish, French, German, Italian, Portuguese, Russian, Hindi,
Chinese) were written by hand: each language's 3,000 most frequent words (wordfreq's list, without names) and the
vocabulary of questions about people and their works in its inflected forms. No benchmark text went into them.
Words outside them (domain terms: "hechizo", "заклинание") stay as written.

A window is read as language L when at least ``MIN_FOREIGN`` of its distinct lower-case words, and at least
``MIN_SHARE`` of them, are words of L's glossary that L uses more than English does (by wordfreq), so "Las Vegas"
or a French loan word in an English prompt glosses nothing. Capitalised words are names and titles and stay as
written, except where a sentence starts and, in German, nouns the glossary knows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import regex
from wordfreq import zipf_frequency

from classifiers.windows import Window

MIN_FOREIGN = 3  # lower-case words that must be the language's, not English
MIN_SHARE = 0.3  # ... and this share of the window's lower-case words
FOREIGN_MARGIN = 0.5  # Zipf points a word must be more frequent in the language than in English
# Words with their combining marks (Devanagari writes vowel signs as marks), numbers, spaces, anything else.
_WORD = regex.compile(r"[\p{L}\p{M}]+")
_TOKEN = regex.compile(r"[\p{L}\p{M}]+|\d+|\s+|.")
_HAN = regex.compile(r"\p{Han}")  # Chinese writes no spaces: jieba cuts it into words
_ASCII_WORD = re.compile(r"[A-Za-z]+")  # the same words, faster, for ASCII text (most prompts)
_ELISION = regex.compile(r"\b(\p{L}{1,5})['’](?=\p{L})")  # l'album, dell'anno, qu'il
_SENTENCE_START = re.compile(r"(?:^|[.!?¿¡:;\"“«(]\s*)$")


def languages() -> tuple[str, ...]:
    """The languages with a packaged glossary (``data/gloss/<language>.tsv``)."""
    folder = resources.files("classifiers").joinpath("data/gloss")
    return tuple(sorted(f.name.removesuffix(".tsv") for f in folder.iterdir() if f.name.endswith(".tsv")))


@lru_cache(maxsize=16)
def load_glossary(language: str) -> Mapping[str, str]:
    """word -> English gloss, from the packaged ``data/gloss/<language>.tsv``."""
    text = resources.files("classifiers").joinpath(f"data/gloss/{language}.tsv").read_text(encoding="utf-8")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            word, _, gloss = line.partition("\t")
            out[word.strip()] = gloss.strip()
    return out


def _foreign_words(language: str, glossary: Mapping[str, str]) -> frozenset[str]:
    """The glossary's words that the language uses clearly more than English does ("quién", "de", "die"; not
    "a", "in"): only these count as evidence of the language."""
    return frozenset(w for w in glossary
                     if zipf_frequency(w, language) >= zipf_frequency(w, "en") + FOREIGN_MARGIN)


@dataclass(frozen=True)
class Glosser:
    """Detects a window's language among the glossaries' and glosses it word by word."""

    glossaries: Mapping[str, Mapping[str, str]]
    foreign: Mapping[str, frozenset[str]]  # language -> its words that are evidence of it

    @classmethod
    def from_glossaries(cls, glossaries: Mapping[str, Mapping[str, str]]) -> Glosser:
        return cls(glossaries, {lang: _foreign_words(lang, glossary) for lang, glossary in glossaries.items()})

    @classmethod
    def packaged(cls) -> Glosser:
        """The glosser of the packaged glossaries (built once per process: a few hundred ms of look-ups)."""
        return _packaged()

    def _evidence(self, text: str) -> tuple[int, int, str | None]:
        """(distinct lower-case words, hits of the best language, that language)."""
        if "'" in text or "’" in text:
            text = _ELISION.sub(r"\1 ", text)
        if text.isascii():
            found = _ASCII_WORD.findall(text)
        elif _HAN.search(text):
            found = [t for t in _chinese_words(text) if _WORD.fullmatch(t)]
        else:
            found = _WORD.findall(text)
        # Capitalised words are names and titles; caseless scripts (Devanagari) count as lower case.
        lower = {w for w in found if not w[0].isupper()}
        hits, best = max(((len(lower & words), language) for language, words in self.foreign.items()),
                         default=(0, None))
        return len(lower), hits, best

    def language(self, text: str) -> str | None:
        """The glossary language the text is written in, or None (English, or none of them)."""
        words, hits, best = self._evidence(text)
        return best if hits >= max(MIN_FOREIGN, MIN_SHARE * words) else None

    def gloss(self, text: str) -> str | None:
        """The word-by-word English gloss of ``text``, or None when it is not in a glossary language."""
        language = self.language(text)
        if language is None:
            return None
        glossary = self.glossaries[language]
        text = _ELISION.sub(r"\1 ", text)
        if _HAN.search(text):  # words without spaces between them: glossed words get spaces
            glossed = " ".join(glossary.get(token, token) for token in _chinese_words(text))
            glossed = re.sub(r"\s+", " ", glossed).strip()
            return glossed if glossed and glossed != text.strip() else None
        out: list[str] = []
        for match in _TOKEN.finditer(text):
            token = match.group(0)
            lower = token.lower()
            if lower in glossary and (not token[0].isupper() or language == "de"
                                      or _SENTENCE_START.search(text[:match.start()])):
                gloss = glossary[lower]
                out.append(gloss.capitalize() if token[0].isupper() else gloss)
            elif token not in "¿¡":
                out.append(token)
        glossed = re.sub(r"\s+", " ", "".join(out)).strip()
        return glossed if glossed and glossed != text.strip() else None

    def windows(self, messages: Sequence[str], windows: Sequence[Window]) -> list[Window]:
        """Glossed copies of the windows written in a glossary language (same message and characters). A message
        with fewer than ``MIN_FOREIGN`` foreign words in all is skipped whole: none of its windows can have more."""
        candidates = {i for i, text in enumerate(messages) if self._evidence(text)[1] >= MIN_FOREIGN}
        out: list[Window] = []
        for window in windows:
            glossed = self.gloss(window.text) if window.message in candidates else None
            if glossed:
                out.append(Window(window.message, window.start, window.end, glossed))
        return out


@lru_cache(maxsize=1)
def _packaged() -> Glosser:
    return Glosser.from_glossaries({language: load_glossary(language) for language in languages()})


@lru_cache(maxsize=4096)
def _chinese_words(text: str) -> tuple[str, ...]:
    """Chinese text cut into words by jieba (the segmenter wordfreq uses for its Chinese word list, which the
    glossary follows); other characters come back as their own tokens. Cached: a window is cut once for its
    language check and reused for its gloss."""
    return tuple(_jieba().lcut(text))


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba  # imported on the first Chinese text only: its dictionary takes a moment to load

    jieba.setLogLevel(logging.WARNING)
    return jieba
