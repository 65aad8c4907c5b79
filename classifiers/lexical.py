"""Lexical stage: find mentions of target names and aliases in a conversation, exactly or with a typo.

Why this design:
- Exact matching is one Aho-Corasick pass over the normalised text (pyahocorasick), so its cost grows with the
  prompt, not with the number of targets. Patterns are padded with spaces and the normalised text has single
  spaces between words, so a pattern only matches whole words ("king" never fires inside "kingdom").
- Typos ("Stephen Kinng", "Beyonse") are found with a symmetric-deletion index: every name token of three or more
  letters is stored under each of its one-letter deletions, and each prompt token looks up its own deletions,
  so candidate pairs come from hash look-ups (again independent of the number of targets); rapidfuzz's OSA
  distance then confirms them. A multi-word name may carry one misspelt word, never more.
- An inflected form (one or two letters appended: "Weasleys", Russian case endings) counts as one typo; a name
  of one short word (under six letters) takes such endings but no typo.
- A common English word is spelt correctly, so it is never read as a typo of a name ("shape" is not "Snape",
  "album" is not "Albus"): found as 3 of our 214 everyday prompts flagged by derived Harry Potter aliases.
- A two-word name also matches with one or two capitalised middle names in between ("Stephen Edwin King").
- Besides full names, a target's distinctive surname is a *partial* mention: on its own it is only evidence
  (several targets can share "Perry"), which the learned stage weighs; a full name or alias flags. The one-word
  head of a titled name ("Meghan" of "Meghan, Duchess of Sussex") is partial in the same way.
- A name written in another alphabet is spelt by ear, not letter by letter: "Гарри Поттер" folds to "garri
  potter", two letters off "harry potter", "हैरी पॉटर" to "hairi potr", and "Гермионой" (an inflected
  Hermione) to "germionoy". Words of Cyrillic and Devanagari text are therefore also compared by their
  consonant skeleton (``sound_key``: letters that transliterations swap, g/h, v/w, i/y, k/c/q, s/z, j/dzh,
  fall together; vowels and doubled letters drop), which both forms share. A skeleton is short and so ambiguous: a
  name must give at least four consonants, every word of a multi-word name must match, and a one-word match
  must not be an everyday word of the language ("огромный", "huge", has Hermione's skeleton).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import ahocorasick
import regex
from rapidfuzz.distance import OSA
from wordfreq import zipf_frequency

from classifiers.normalize import Normalized, normalize, normalize_pattern

MentionKind = Literal["exact", "fuzzy", "partial", "described"]  # described: classifiers.described
MIN_FUZZY_TOKEN = 3
MIN_PARTIAL_TOKEN = 4
MIN_SUFFIX_STEM = 4
SUFFIX = 1  # an inflection ending costs as much as one typo (but short names take endings, never typos)
OPTIONS_CACHE = 100_000  # words whose name options are remembered per matcher
EVERYDAY_ZIPF = 3.5  # the bar classifiers.aliases uses for "not an everyday word"
_SUFFIXES = {"jr", "sr", "ii", "iii", "iv"}
MIN_SOUND_CONSONANTS = 4  # a name's skeleton must be at least this long to be matched by sound
# Scripts whose words are compared by sound, with the wordfreq languages that say what is an everyday word there.
# Cyrillic and Devanagari so far: their letters map onto sounds, and the benchmark's Russian and Hindi training
# texts show what matching them does. Greek, for one, writes "d" as "ντ" and "b" as "μπ" (Dumbledore is
# "Ντάμπλντορ"), which needs rules of its own.
SOUND_SCRIPTS = {"CYRILLIC": ("ru", "uk", "bg", "mk"), "DEVANAGARI": ("hi",)}
_LETTER_RUN = regex.compile(r"[\p{L}\p{M}\p{N}]+")  # a word with its vowel signs (Devanagari writes them as marks)
# English "j" is written "дж" (dzh) and "x" "кс" (ks); the Russian "й" folds to "y", a vowel here.
# English "qu" is /kv/ to the ear of Russian and Hindi ("Quidditch" is "Квиддич"), and the "t" of "tch" is silent
# ("snitch" and "Квиддич" end in the same sound).
_SOUND_DIGRAPHS = (("dzh", "j"), ("tch", "ch"), ("qu", "kv"), ("kh", "h"), ("ph", "f"), ("th", "t"), ("ck", "k"),
                   ("sh", "s"), ("zh", "j"), ("x", "ks"))
_SOUND_CLASSES = str.maketrans({"g": "h", "w": "v", "y": "i", "q": "k", "c": "k", "z": "s"})


@dataclass(frozen=True, slots=True)
class Mention:
    """One mention of a target: original character span [start, end) in message ``message``."""

    message: int
    start: int
    end: int
    target_id: str
    kind: MentionKind
    score: float


@dataclass(frozen=True, slots=True)
class TargetPatterns:
    """The normalised patterns of one target; derived once per target version and reused across rebuilds."""

    full: tuple[str, ...]
    partial: tuple[str, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha1(("\x1f".join(self.full) + "\x1e" + "\x1f".join(self.partial)).encode()).hexdigest()


def _variants(raw: str) -> set[str]:
    """A name and the spellings people commonly use for it (all normalised)."""
    out: set[str] = set()
    base = normalize_pattern(raw)
    if base:
        out.add(base)
    without_parens = normalize_pattern(re.sub(r"\([^)]*\)", " ", raw))
    if without_parens:
        out.add(without_parens)
    if "," in raw:
        head = normalize_pattern(raw.split(",", 1)[0])
        if len(head.split()) >= 2:
            out.add(head)
    if "-" in raw:  # "Yun-Hwa" is also written "Yunhwa"
        joined = normalize_pattern(raw.replace("-", ""))
        if joined:
            out.add(joined)
    for form in list(out):
        tokens = form.split()
        core = [t for t in tokens if t not in _SUFFIXES]
        if len(core) >= 2 and core != tokens:
            out.add(" ".join(core))
        no_initials = [t for t in core if len(t) > 1]
        if len(no_initials) >= 2 and no_initials != core:
            out.add(" ".join(no_initials))
        initials = [t for t in core if len(t) == 1]
        if len(initials) >= 2 and len(core) > len(initials):  # "j k rowling" -> "jk rowling"
            out.add("".join(initials) + " " + " ".join(t for t in core if len(t) > 1))
    return out


def target_patterns(name: str, aliases: Iterable[str], birth_names: Iterable[str] = ()) -> TargetPatterns:
    """Full-name patterns from the name, aliases and birth names; the surname of a multi-word name or alias as a
    partial pattern. A birth surname gives none: relatives share it ("McGraw" in Faith Hill's married name is
    also her husband Tim McGraw's)."""
    full: set[str] = set()
    for raw in (name, *aliases, *birth_names):
        full |= _variants(raw)
    partial: set[str] = set()
    for raw in (name, *aliases):
        tokens = [t for t in normalize_pattern(re.sub(r"\([^)]*\)", " ", raw.split(",", 1)[0])).split()
                  if t not in _SUFFIXES]
        # A titled name's one-word head is what people call the person ("Meghan" of "Meghan, Duchess of
        # Sussex"): evidence like a surname, since others share it.
        titled = len(tokens) == 1 and "," in raw
        if (len(tokens) >= 2 or titled) and len(tokens[-1]) >= MIN_PARTIAL_TOKEN:
            partial.add(tokens[-1])
    partial -= full
    return TargetPatterns(tuple(sorted(full)), tuple(sorted(partial)))


def sound_key(word: str, w_vowel: bool = False) -> str:
    """The consonant skeleton of a folded word ("harry" and "garri" -> "hr"; "hogwarts" and "khogvarts" ->
    "hvrts"): what a name keeps when it is transliterated into another alphabet and back. ``w_vowel``: read an
    English "w" as the vowel Russian often writes for it ("Walters" is "Уолтерс"), not as "в" ("Хогвартс")."""
    if w_vowel:
        word = word.replace("w", "u")
    for digraph, letter in _SOUND_DIGRAPHS:
        word = word.replace(digraph, letter)
    out: list[str] = []
    for ch in word.translate(_SOUND_CLASSES):
        if ch not in "aeiou" and (not out or out[-1] != ch):
            out.append(ch)
    return "".join(out)


@lru_cache(maxsize=4096)
def _sound_script(ch: str) -> str | None:
    """The script of a letter when its words are compared by sound (``SOUND_SCRIPTS``), else None."""
    if ch.isascii():
        return None
    script = unicodedata.name(ch, "").split(" ", 1)[0]
    return script if script in SOUND_SCRIPTS else None


@lru_cache(maxsize=65_536)
def _everyday_in(word: str, script: str) -> bool:
    """A common word of a language written in ``script``: never read as a name by sound."""
    return any(zipf_frequency(word, language) > EVERYDAY_ZIPF for language in SOUND_SCRIPTS[script])


@lru_cache(maxsize=65_536)
def everyday_word(word: str) -> bool:
    """A common English word (more frequent than ~3 per million words): correctly spelt, so never read as a typo
    of a name. Asked only for words that are one edit away from some name token, so it costs nothing per prompt."""
    return zipf_frequency(word, "en") > EVERYDAY_ZIPF


def _deletions(token: str) -> set[str]:
    return {token[:i] + token[i + 1:] for i in range(len(token))}


def _max_distance(token: str) -> int:
    return 1 if len(token) < 9 else 2


class LexicalMatcher:
    """Exact, fuzzy and partial name search over a whole conversation; immutable once built."""

    def __init__(self, patterns: Mapping[str, TargetPatterns]) -> None:
        self._automaton = ahocorasick.Automaton()
        entries: dict[str, list[tuple[str, MentionKind]]] = {}
        by_head: dict[tuple[str, str], list[tuple[tuple[str, ...], str]]] = {}
        by_ends: dict[tuple[str, ...], list[str]] = {}
        deletes: dict[str, set[str]] = {}
        self._name_tokens: set[str] = set()
        self._options: dict[str, tuple[dict[str, int], frozenset[str]]] = {}  # per-word cache (``_word_options``)
        # First word's skeleton -> (word count, the words' skeletons joined by spaces, target): one string rather
        # than a tuple of them, about half the memory at 100,000 targets.
        sounds: dict[str, list[tuple[int, str, str]]] = {}
        for target_id, pats in patterns.items():
            for pattern in pats.full:
                entries.setdefault(f" {pattern} ", []).append((target_id, "exact"))
                for w_vowel in (False, True) if "w" in pattern else (False,):
                    keys = tuple(sound_key(token, w_vowel) for token in pattern.split())
                    if all(keys) and sum(map(len, keys)) >= MIN_SOUND_CONSONANTS:
                        sounds.setdefault(keys[0], []).append((len(keys), " ".join(keys), target_id))
                tokens = tuple(pattern.split())
                head = (tokens[0], tokens[1] if len(tokens) > 1 else "")
                by_head.setdefault(head, []).append((tokens, target_id))
                if len(tokens) == 2:
                    by_ends.setdefault(tokens, []).append(target_id)
                for token in tokens:
                    if len(token) >= MIN_FUZZY_TOKEN and token.isalpha():
                        self._name_tokens.add(token)
            for pattern in pats.partial:
                entries.setdefault(f" {pattern} ", []).append((target_id, "partial"))
        for token in self._name_tokens:
            deletes.setdefault(token, set()).add(token)
            for deleted in _deletions(token):
                deletes.setdefault(deleted, set()).add(token)
        # Held as tuples (most hold one item): a third of the memory of lists and sets, about 100 MB less at
        # 100,000 targets.
        self._by_head = {key: tuple(value) for key, value in by_head.items()}
        self._by_ends = {key: tuple(value) for key, value in by_ends.items()}  # two-word names: middle names
        self._deletes = {key: tuple(sorted(value)) for key, value in deletes.items()}  # symmetric deletion index
        self._sounds = {key: tuple(dict.fromkeys(value)) for key, value in sounds.items()}
        for key, value in entries.items():
            self._automaton.add_word(key, (len(key), tuple(value)))
        self.empty = not entries
        if not self.empty:
            self._automaton.make_automaton()

    def find(self, messages: Sequence[str]) -> list[Mention]:
        """All mentions in every message; a partial mention inside an exact one of the same target is dropped."""
        mentions: list[Mention] = []
        if self.empty:
            return mentions
        for index, content in enumerate(messages):
            norm = normalize(content)
            found = self._exact(index, norm)
            found += self._fuzzy(index, norm, found)
            found += self._middle_names(index, content, norm, found)
            if not content.isascii():
                found += self._by_sound(index, content, found)
            exact_ranges = [(m.target_id, m.start, m.end) for m in found if m.kind != "partial"]
            mentions += [m for m in found if m.kind != "partial" or not any(
                t == m.target_id and s <= m.start and m.end <= e for t, s, e in exact_ranges)]
        return mentions

    def _exact(self, index: int, norm: Normalized) -> list[Mention]:
        out: list[Mention] = []
        for end, (length, value) in self._automaton.iter(norm.text):
            # The key is " pattern ": its letters run from end - length + 2 to end - 1.
            s, e = norm.span(end - length + 2, end)
            out.extend(Mention(index, s, e, target_id, kind, 1.0) for target_id, kind in value)
        return out

    def _middle_names(self, index: int, content: str, norm: Normalized, found: list[Mention]) -> list[Mention]:
        """A two-word name with one or two capitalised words in between ("Stephen Edwin King")."""
        if not self._by_ends:
            return []
        words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"[a-z0-9]+", norm.text)]
        taken = {(m.target_id, m.start) for m in found}
        out: list[Mention] = []
        for i in range(len(words)):
            for gap in (1, 2):
                j = i + gap + 1
                if j >= len(words):
                    break
                for target_id in self._by_ends.get((words[i][2], words[j][2]), ()):
                    s, e = norm.span(words[i][0], words[j][1])
                    middle = [content[norm.origin[words[k][0]]] for k in range(i + 1, j)]
                    if (target_id, s) in taken or not all(ch.isupper() for ch in middle):
                        continue
                    taken.add((target_id, s))
                    out.append(Mention(index, s, e, target_id, "fuzzy", 0.9))
        return out

    def _by_sound(self, index: int, content: str, found: list[Mention]) -> list[Mention]:
        """Names written in another alphabet, matched by consonant skeleton (see the module docstring). Whole
        words of the original text are folded here, because the matcher's own folding splits an abugida such as
        Devanagari into one word per character."""
        words = [(m.start(), m.end(), m.group()) for m in _LETTER_RUN.finditer(content)]
        scripts = [_sound_script(word[0]) for _, _, word in words]
        keys = [sound_key(normalize_pattern(word).replace(" ", "")) if script else ""
                for (_, _, word), script in zip(words, scripts, strict=True)]
        taken = {(m.target_id, m.start) for m in found if m.kind != "partial"}
        out: list[Mention] = []
        for i, key in enumerate(keys):
            # No stored skeleton is empty, so a word outside the sound scripts ("") never starts or joins a match.
            for length, sounds, target_id in self._sounds.get(key, ()):
                if " ".join(keys[i:i + length]) != sounds:
                    continue
                s, e = words[i][0], words[i + length - 1][1]
                if (target_id, s) in taken:
                    continue
                if length == 1 and _everyday_in(words[i][2].lower(), scripts[i]):  # type: ignore[arg-type]
                    continue
                taken.add((target_id, s))
                out.append(Mention(index, s, e, target_id, "fuzzy", 0.8))
        return out

    def _word_options(self, word: str) -> tuple[dict[str, int], frozenset[str]]:
        """The name tokens ``word`` may stand for, with their edit cost, and those it inflects. Depends only on
        the word, so it is cached: prompts repeat everyday words, and the symmetric-deletion look-ups were most
        of the lexical stage's time."""
        cached = self._options.get(word)
        if cached is not None:
            return cached
        options: dict[str, int] = {word: 0}
        endings: set[str] = set()
        for cut in (1, 2):  # inflected forms: "Weasleys", "Гермионы" (germiony), "Хогвартсе"
            stem = word[:-cut]
            if len(stem) >= MIN_SUFFIX_STEM and stem in self._name_tokens and stem not in options:
                options[stem] = SUFFIX
                endings.add(stem)
        if word not in self._name_tokens and len(word) >= MIN_FUZZY_TOKEN and word.isalpha():
            typos: dict[str, int] = {}
            for key in (word, *_deletions(word)):
                for token in self._deletes.get(key, ()):
                    if token in typos or token in options:
                        continue
                    distance = OSA.distance(word, token, score_cutoff=_max_distance(token))
                    if distance <= _max_distance(token):
                        typos[token] = distance
            if typos and not everyday_word(word):  # "shape" is a word, not a typo of "Snape"
                options.update(typos)
        if len(self._options) >= OPTIONS_CACHE:
            self._options.clear()
        result = (options, frozenset(endings))
        self._options[word] = result
        return result

    def _fuzzy(self, index: int, norm: Normalized, exact: list[Mention]) -> list[Mention]:
        if not self._deletes:
            return []
        words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"[a-z0-9]+", norm.text)]
        matches: list[dict[str, int]] = []
        inflected: list[frozenset[str]] = []  # per word: the name tokens it is an inflection of (not a typo)
        for _, _, word in words:
            options, endings = self._word_options(word)
            matches.append(options)
            inflected.append(endings)
        out: list[Mention] = []
        taken = {(m.target_id, m.start) for m in exact}
        for i, options in enumerate(matches):
            nxt = matches[i + 1] if i + 1 < len(matches) else {}
            for first, d0 in options.items():
                for second, d1 in [*nxt.items(), ("", 0)]:
                    for tokens, target_id in self._by_head.get((first, second), ()):
                        if (second == "") != (len(tokens) == 1):
                            continue
                        total, typos, ok = d0 + d1, int(d0 > 0) + int(d1 > 0), True
                        for k, token in enumerate(tokens[2:], start=2):
                            if i + k >= len(matches) or token not in matches[i + k]:
                                ok = False
                                break
                            dk = matches[i + k][token]
                            total += dk
                            typos += int(dk > 0)
                        short_typo = len(tokens) == 1 and len(tokens[0]) < 6 and first not in inflected[i]
                        if not ok or typos == 0 or typos > 1 or short_typo:
                            continue
                        start_norm, end_norm = words[i][0], words[i + len(tokens) - 1][1]
                        s, e = norm.span(start_norm, end_norm)
                        if (target_id, s) in taken:
                            continue
                        taken.add((target_id, s))
                        letters = sum(len(t) for t in tokens)
                        out.append(Mention(index, s, e, target_id, "fuzzy",
                                           max(0.5, 1.0 - min(total, 2 * len(tokens)) / letters)))
        return out


_PROPER = re.compile(r"(?<![\w'’])(?:[A-Z][\w'’.-]*)"
                     r"(?:\s+(?:(?:of|de|la|del|van|von|bin|al|and|the)\s+)?[A-Z][\w'’.-]*)+")
_LEADING = {"what", "who", "whom", "whose", "which", "where", "when", "why", "how", "is", "are", "was", "were",
            "do", "does", "did", "can", "could", "would", "should", "has", "have", "had", "in", "on", "at", "the",
            "a", "an", "please", "tell", "describe", "explain", "name", "question", "answer", "i", "and", "but",
            "as", "if", "for", "from", "with", "by", "to", "of", "this", "that", "these", "those"}


def proper_phrases(text: str) -> list[str]:
    """Normalised multi-word capitalised phrases ("Jamie Vasquez", "Different Seasons"): names of someone or
    something. A leading question or function word ("How", "The") is not part of the phrase."""
    out: list[str] = []
    for match in _PROPER.finditer(text):
        words = match.group().split()
        while words and words[0].lower().strip(".'’") in _LEADING:
            words = words[1:]
        if len(words) >= 2:
            out.append(normalize_pattern(" ".join(words)))
    return out


def names_someone_else(phrases: Sequence[str], patterns: TargetPatterns) -> bool:
    """True when a proper phrase neither contains one of the target's full names nor is part of one.

    A surname inside a longer name ("Elsie Marais Van der Westhuizen" for "Raven Marais") is someone else."""
    for phrase in phrases:
        padded = f" {phrase} "
        if not any(f" {p} " in padded or padded in f" {p} " for p in patterns.full):
            return True
    return False
