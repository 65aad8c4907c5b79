"""Text normalisation for name matching, with a map back to the original characters.

Names must match however a prompt spells them: "BEYONCÉ", "Beyonce", "beyoncé's", "Stephen-King" and
"Гарри Поттер" typed in another script. Every character becomes lower-case ASCII letters/digits or a space:
NFKC folds compatibility forms (full-width letters, ligatures), Latin letters lose their diacritics, letters of
other scripts are transliterated (anyascii), and every run of anything else collapses into one space. The same
function normalises the patterns and the prompts, so a transliteration only has to be consistent, not correct.

Syllabic and ideographic scripts (CJK, Devanagari, ...) have no spaces between words, so each of their
characters becomes a word of its own; a multi-character alias in such a script then still matches inside a
longer run, and a Latin name never matches half of a syllable.

Each output character remembers the index of the original character it came from, so a match in the normalised
text maps back to exact character spans of the prompt (ECO corrupts exactly those tokens).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from anyascii import anyascii

# Month names, folded: a capitalised run that starts with one is a date, not a title or a name.
MONTHS = frozenset({"january", "february", "march", "april", "may", "june", "july", "august", "september",
                    "october", "november", "december"})


@dataclass(frozen=True, slots=True)
class Normalized:
    """A normalised text: ``text`` starts and ends with a space; ``origin[i]`` is the source index of text[i]."""

    text: str
    origin: tuple[int, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original [start, end) covering normalised text[start:end] (both ends inside letters)."""
        return self.origin[start], self.origin[end - 1] + 1


@lru_cache(maxsize=65_536)
def _fold_char(ch: str) -> tuple[str, bool]:
    """(ascii letters/digits for one character, whether it stands alone as a word). Pure, so cached."""
    if ch.isascii():
        return (ch.lower(), False) if ch.isalnum() else ("", False)
    composed = unicodedata.normalize("NFKC", ch)
    decomposed = unicodedata.normalize("NFKD", composed)
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    if base and base.isascii():
        return "".join(c for c in base.lower() if c.isalnum()), False
    category = unicodedata.category(ch)
    if category[0] not in "LMN":
        return "", False
    translit = "".join(c for c in anyascii(composed).lower() if c.isalnum())
    # Scripts without letter case and without spaces between words: one word per character.
    alone = category in ("Lo", "Lm", "Mc", "Mn") and not _is_alphabetic_script(ch)
    return translit, alone


def _is_alphabetic_script(ch: str) -> bool:
    """Caseless alphabets that still separate words by spaces (Hebrew, Arabic, Georgian, Armenian)."""
    name = unicodedata.name(ch, "")
    return name.startswith(("HEBREW", "ARABIC", "GEORGIAN", "ARMENIAN", "THAANA", "SYRIAC"))


def normalize(text: str) -> Normalized:
    """Fold ``text`` for matching; see the module docstring."""
    return _normalize_ascii(text) if text.isascii() else _normalize_chars(text)


def _normalize_chars(text: str) -> Normalized:
    """The general case, one character at a time."""
    out: list[str] = [" "]
    origin: list[int] = [0]
    for index, ch in enumerate(text):
        folded, alone = _fold_char(ch)
        if not folded:
            if out[-1] != " ":
                out.append(" ")
                origin.append(index)
            continue
        if alone and out[-1] != " ":
            out.append(" ")
            origin.append(index)
        for c in folded:
            out.append(c)
            origin.append(index)
        if alone:
            out.append(" ")
            origin.append(index)
    if out[-1] != " ":
        out.append(" ")
        origin.append(max(len(text) - 1, 0))
    return Normalized("".join(out), tuple(origin))


_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")


def _normalize_ascii(text: str) -> Normalized:
    """``normalize`` for pure-ASCII text (most prompts), word runs at a time instead of character by character:
    the same output and origins, several times faster."""
    out: list[str] = [" "]
    origin: list[int] = [0]
    previous_end = -1
    for match in _ASCII_WORD.finditer(text):
        start, end = match.span()
        if previous_end >= 0:
            out.append(" ")
            origin.append(previous_end)
        out.append(text[start:end].lower())
        origin.extend(range(start, end))
        previous_end = end
    if previous_end >= 0:
        out.append(" ")
        origin.append(previous_end if previous_end < len(text) else len(text) - 1)
    return Normalized("".join(out), tuple(origin))


def normalize_pattern(text: str) -> str:
    """The normalised form of a name or alias, without the padding spaces ("" when nothing is left)."""
    return normalize(text).text.strip()
