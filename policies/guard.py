"""GUARD: forbid a target's facts at generation time (Deng et al., 2025), as tensors.

Why decoding-time restriction: the prompt is left as the user wrote it, and only what the model is about to say
is steered away from the target's facts: tokens of the facts' content words and entities are penalised (soft) or
forbidden (hard), and multi-token phrases are blocked as they are being spelled out. vLLM's ``bad_words`` only bans
a phrase's *last* token, so "Montenegr…" can start and the model simply re-tokenises around the ban; here a
phrase's continuation is blocked after any prefix and its first token is penalised softly as well.

Pipeline (every step pure; the sentence encoder is passed in):
1. ``FactRetriever``: the facts nearest the prompt by sentence-embedding cosine (the paper retrieves answers).
2. ``extract_forbidden``: content words and entities (capitalised runs, numbers, quoted titles) of those facts,
   minus the prompt's ordinary words (the user said them; echoing them leaks nothing) - but never minus an entity:
   once the model has written the target's name it recites what it knows about them.
   ``fact_ngrams``: every run of ``ngram`` words (default 3) of the target's facts (all of them by default), so
   that no such run can be written (with its entities forbidden, a memorising model still recites the facts'
   sentence frames around other names).
3. ``compile_tables``: tokenizer variants (leading space or not, capitalised, lower case) become one dense
   per-token penalty vector and a right-aligned, padded prefix table of phrases and n-grams.
4. ``apply_guard``: one subtraction of the penalty vector, one comparison of the last W generated tokens against
   the phrase prefixes (on the CPU only those ending in the last token written), one scatter of the continuation
   penalties. Its cost does not grow with the number of forbidden single tokens: 10,000 tokens and 5,000 phrases
   (15,000 prefix rows) cost ~0.11 ms a step at a 4k vocabulary and ~0.13 ms at 152k, a TOFU author's table
   with its fact trigrams (8,200 rows) ~0.12 ms (median, one sequence, this shared 2-core CPU;
   ``gateway.bench.policies.guard_kernel_bench``), against ~6 ms for a step of the 6M-parameter demo model.

The same ``GuardTables``/``apply_guard`` run in the local engine (``GuardProcessor``), the reference worker
(``xargs`` factory) and the vLLM plugin (``policies.vllm_plugin``).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Mode = Literal["soft", "hard"]
Encode = Callable[[str], list[int]]  # text -> token ids, no special tokens
SentenceEncode = Callable[[Sequence[str]], torch.Tensor]  # texts -> (n, dim) unit rows

# Never equal to a token id nor to the prefix table's "don't care" marker.
HISTORY_PAD = -2
DONT_CARE = -1
INF = float("inf")

# Function words that carry no fact: our own short list (articles, pronouns, auxiliaries, prepositions...).
STOPWORDS = frozenset([
    "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "for", "of", "to", "in", "on", "at", "by", "with",
    "from", "into", "onto", "upon", "about", "above", "below", "over", "under", "between", "among", "through",
    "during", "before", "after", "since", "until", "while", "as", "than", "then", "there", "here", "this", "that",
    "these", "those", "it", "its", "itself", "he", "him", "his", "himself", "she", "her", "hers", "herself", "they",
    "them", "their", "theirs", "themselves", "we", "us", "our", "ours", "you", "your", "yours", "i", "me", "my",
    "mine", "who", "whom", "whose", "which", "what", "when", "where", "why", "how", "is", "are", "was", "were", "be",
    "been", "being", "am", "do", "does", "did", "done", "doing", "have", "has", "had", "having", "will", "would",
    "shall", "should", "can", "could", "may", "might", "must", "not", "no", "yes", "also", "very", "too", "just",
    "only", "even", "more", "most", "much", "many", "some", "any", "each", "every", "all", "both", "either",
    "neither", "other", "such", "own", "same", "one", "ones", "well", "often", "however", "into", "out", "up",
    "down", "off", "again", "further", "once", "because", "if", "whether", "though", "although", "like", "unlike",
    "within", "without", "across", "along", "around", "near", "toward", "towards", "against", "per", "via", "etc",
    "known", "notable", "notably", "particularly",
])

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*(?:'[A-Za-z]+)?")
# A quoted title: the opening quote follows a space or the start, the closing one precedes punctuation or a space
# (so possessive apostrophes never open a "title").
_QUOTED = re.compile(r"(?:^|(?<=\s))[\"“‘']([^\"”’']{3,80}?)[\"”’'](?=[\s.,;:!?)]|$)")


def _words(text: str) -> list[str]:
    """Word tokens with possessive/contraction suffixes dropped ("Montenegro's" -> "Montenegro")."""
    return [w.split("'")[0] for w in _WORD.findall(text)]


def generic_words(fact_groups: Sequence[Sequence[str]], max_share: float = 0.2) -> frozenset[str]:
    """Lower-cased words that occur in the facts of more than ``max_share`` of the targets (at least 2).

    Why: forbidding "genre" or "works" because one author's facts use them hurts fluency and protects nothing,
    since every other target's facts use them too. Document frequency over the registry is what an operator has;
    with fewer than 5 targets nothing is generic (every content word of a lone target is forbidden).
    """
    groups = [{w.lower() for fact in facts for w in _words(fact)} for facts in fact_groups]
    if len(groups) < 5:
        return frozenset()
    limit = max(2, int(max_share * len(groups)))
    counts: dict[str, int] = {}
    for group in groups:
        for word in group:
            counts[word] = counts.get(word, 0) + 1
    return frozenset(w for w, c in counts.items() if c > limit)


@dataclass(frozen=True)
class GuardParams:
    """Mirrors ``GuardPolicy``'s parameters, plus the phrase settings the policy leaves at their defaults."""

    mode: Mode = "hard"
    penalty: float = 10.0  # soft penalty on forbidden tokens (and continuations in soft mode)
    top_facts: int = 3
    semantic: bool = True
    semantic_threshold: float = 0.75
    semantic_penalty: float = 3.0
    first_token_penalty: float = 5.0  # soft penalty on a multi-token phrase's first token
    include_prompt: bool = False  # let a phrase begun at the end of the prompt be continued-blocked too
    # Fact n-gram blocking: no run of ``ngram`` words of the facts can be written (0 = off); the n-grams come from
    # all the target's facts or only the retrieved ones; entering one (its words 2..n-1) costs ``ngram_penalty``.
    ngram: int = 3
    ngram_facts: Literal["nearest", "all"] = "all"
    ngram_penalty: float = 4.0

    @classmethod
    def from_policy(cls, policy) -> GuardParams:
        return cls(mode=policy.mode, penalty=float(policy.penalty), top_facts=policy.top_facts,
                   semantic=getattr(policy, "semantic", True), semantic_threshold=float(policy.semantic_threshold),
                   ngram=int(getattr(policy, "ngram", cls.ngram)),
                   ngram_facts=getattr(policy, "ngram_facts", cls.ngram_facts))

    @property
    def token_penalty(self) -> float:
        return INF if self.mode == "hard" else self.penalty

    @property
    def continuation_penalty(self) -> float:
        return INF if self.mode == "hard" else self.penalty


# -- 1. retrieval -------------------------------------------------------------------------------------------------
class FactRetriever:
    """Nearest facts to a prompt by sentence-embedding cosine; fact embeddings are cached per instance."""

    def __init__(self, encode: SentenceEncode, max_cache: int = 50_000):
        self._encode = encode
        self._cache: dict[str, torch.Tensor] = {}
        self._max_cache = max_cache

    def _facts_matrix(self, facts: Sequence[str]) -> torch.Tensor:
        missing = [f for f in dict.fromkeys(facts) if f not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self._max_cache:
                self._cache.clear()
            for fact, row in zip(missing, self._encode(missing)):
                self._cache[fact] = row
        return torch.stack([self._cache[f] for f in facts])

    def nearest(self, prompt: str, facts: Sequence[str], k: int) -> list[str]:
        if not facts or k <= 0:
            return []
        if len(facts) <= k:
            return list(facts)
        query = self._encode([prompt])[0]
        scores = self._facts_matrix(facts) @ query
        return [facts[i] for i in scores.topk(k).indices.tolist()]


# -- 2. extraction ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForbiddenSet:
    """Surface forms to keep out of the output: single words and multi-word phrases (entities, titles)."""

    words: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()


def _content(word: str) -> bool:
    lowered = word.lower()
    return lowered not in STOPWORDS and (len(word) >= 3 or word.isdigit())


def _capitalised_runs(words: Sequence[str]) -> list[list[str]]:
    """Runs of >= 2 capitalised words (a number may continue one): names, places, titles."""
    runs: list[list[str]] = []
    run: list[str] = []
    for word in [*words, ""]:
        if word[:1].isupper() or (run and word.isdigit()):
            run.append(word)
            continue
        if len(run) >= 2 and any(_content(w) for w in run):
            runs.append(run)
        run = []
    return runs


def _entity_words(fact: str) -> set[str]:
    """Lower-cased content words that ``fact`` names as entities: words of capitalised runs, and capitalised
    words that do not open a sentence, a quote or a bracket."""
    words = {w.lower() for run in _capitalised_runs(_words(fact)) for w in run if _content(w)}
    for match in _WORD.finditer(fact):
        word = match.group(0).split("'")[0]
        before = fact[:match.start()].rstrip()
        if word[:1].isupper() and _content(word) and before and before[-1] not in ".!?:;\"“‘'(":
            words.add(word.lower())
    return words


def extract_forbidden(facts: Iterable[str], prompt: str = "", generic: frozenset[str] = frozenset()) -> ForbiddenSet:
    """Content words and entities of ``facts``, less ``generic`` words and the prompt's ordinary words.

    Entities (names, places, titles) stay forbidden even when the prompt says them. Why: the memorised knowledge
    hangs on them. Echoing the user's ordinary words leaks nothing, but a model that has just written "Carmen
    Montenegro" goes on to recite what it knows about her, while a model that never learned her cannot echo her
    name into an answer. GUARD's forbidden set holds the entity itself for the same reason.
    """
    said = {w.lower() for w in _words(prompt)}
    words: dict[str, None] = {}
    phrases: dict[str, None] = {}
    for fact in facts:
        entities = _entity_words(fact) - generic
        fact_words = _words(fact)
        # The parts of a hyphenated name are names too: forbidding "Yun-Hwa" as one word blocks the phrase, but
        # lets the model write "Hwa" on its own.
        parts = [part for word in fact_words if "-" in word and word.lower() in entities
                 for part in word.split("-") if _content(part) and part.lower() not in generic]
        entities |= {part.lower() for part in parts}
        for word in [*fact_words, *parts]:
            lowered = word.lower()
            if _content(word) and lowered not in generic and (lowered not in said or lowered in entities):
                words[word] = None
        for run in _capitalised_runs(_words(fact)):
            if any(w.lower() in entities for w in run):
                phrases[" ".join(run)] = None
        for quoted in _QUOTED.findall(fact):
            if len(quoted.split()) >= 2:
                phrases[quoted.strip()] = None
    return ForbiddenSet(tuple(words), tuple(phrases))


def surface_variants(text: str) -> set[str]:
    """The spellings a model may produce: as written, capitalised, lower case; each with and without a space."""
    forms = {text, text[:1].upper() + text[1:], text.lower()}
    return {f for form in forms for f in (form, " " + form)}


def token_sequences(forbidden: ForbiddenSet, encode: Encode) -> tuple[set[int], set[tuple[int, ...]]]:
    """Single forbidden tokens and multi-token phrases (as token-id tuples) over every surface variant."""
    singles: set[int] = set()
    phrases: set[tuple[int, ...]] = set()
    for text in (*forbidden.words, *forbidden.phrases):
        for variant in surface_variants(text):
            ids = tuple(encode(variant))
            if len(ids) == 1:
                singles.add(ids[0])
            elif ids:
                phrases.add(ids)
    return singles, phrases


# A fact n-gram as token ids with two offsets: the tokens of its first word are free, those of words 2..n-1 (from
# ``soft``) are softly penalised after it, and those of word n (from ``hard``) are blocked continuations.
NGram = tuple[tuple[int, ...], int, int]


def fact_ngrams(facts: Iterable[str], n: int) -> set[tuple[str, str, str]]:
    """Every run of ``n`` words of ``facts`` as ``(first word, text before the last word, text)``.

    Each run appears verbatim (punctuation inside it kept: what a memorising model reproduces) and as its bare
    words joined by single spaces (the same words without the comma, which ROUGE-L counts just the same).
    """
    grams: set[tuple[str, str, str]] = set()
    if n < 2:
        return grams
    for fact in facts:
        spans = list(_WORD.finditer(fact))
        for i in range(len(spans) - n + 1):
            first, last = spans[i], spans[i + n - 1]
            grams.add((first.group(0), fact[first.start():last.start()].rstrip(), fact[first.start():last.end()]))
            words = [m.group(0) for m in spans[i:i + n]]
            grams.add((words[0], " ".join(words[:-1]), " ".join(words)))
    return grams


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def ngram_sequences(grams: Iterable[tuple[str, str, str]], encode: Encode) -> set[NGram]:
    """Token-id n-grams over the surface variants of ``surface_variants`` (each part varied the same way).

    The offsets are shared token prefixes, so a tokenizer that merges across a word boundary still gets the rest
    blocked."""
    out: set[NGram] = set()
    for first, lead, text in grams:
        for case in (str, lambda t: t[:1].upper() + t[1:], str.lower):
            for space in ("", " "):
                ids = tuple(encode(space + case(text)))
                hard = _shared(encode(space + case(lead)), ids)
                soft = min(_shared(encode(space + case(first)), ids), hard)
                if 0 < soft and hard < len(ids):
                    out.add((ids, soft, hard))
    return out


# -- 3. compiled tables -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardTables:
    """Everything ``apply_guard`` needs, as tensors on one device.

    ``static`` is a dense per-token penalty (forbidden tokens, phrase first tokens, semantic neighbours; +inf =
    forbidden). Phrase prefixes are right-aligned in ``prefixes`` ``[N, W]`` with ``DONT_CARE`` padding on the
    left; row n matches when the last W tokens agree on its cared-for columns, and then ``next_tokens[n]`` gets
    ``continuation[n]`` subtracted.
    """

    static: torch.Tensor  # [V] float32
    prefixes: torch.Tensor  # [N, W] int64
    care: torch.Tensor  # [N, W] bool
    next_tokens: torch.Tensor  # [N] int64
    continuation: torch.Tensor  # [N] float32
    n_tokens: int = 0
    n_phrases: int = 0
    n_ngrams: int = 0

    @property
    def window(self) -> int:
        return int(self.prefixes.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.static.shape[0])

    def to(self, device: torch.device | str) -> GuardTables:
        return GuardTables(self.static.to(device), self.prefixes.to(device), self.care.to(device),
                           self.next_tokens.to(device), self.continuation.to(device), self.n_tokens, self.n_phrases,
                           self.n_ngrams)


def compile_tables(vocab_size: int, tokens: Iterable[int] = (), phrases: Iterable[Sequence[int]] = (),
                   token_penalty: float = INF, first_token_penalty: float = 5.0,
                   continuation_penalty: float = INF, extra: Mapping[int, float] | None = None,
                   device: torch.device | str = "cpu", ngrams: Iterable[NGram] = (),
                   ngram_penalty: float = 0.0) -> GuardTables:
    """Build the tensors for one forbidden set; out-of-vocabulary ids are dropped.

    ``ngrams`` (see ``NGram``) add prefix rows after their first word only: ``ngram_penalty`` on the tokens of
    their inner words, ``continuation_penalty`` on their last word's. Their first tokens get no penalty: those are
    ordinary words ("is", "the"), and penalising every word the facts use would garble any answer.
    """
    static = torch.zeros(vocab_size, dtype=torch.float32)
    for token_id, value in (extra or {}).items():
        if 0 <= token_id < vocab_size:
            static[token_id] = max(float(static[token_id]), float(value))
    phrase_list = sorted({tuple(int(t) for t in p) for p in phrases if len(p) >= 2
                          and all(0 <= t < vocab_size for t in p)})
    firsts = [p[0] for p in phrase_list]
    if firsts and first_token_penalty > 0:
        index = torch.tensor(firsts)
        static[index] = torch.maximum(static[index], torch.tensor(first_token_penalty))
    token_list = sorted({int(t) for t in tokens if 0 <= int(t) < vocab_size})
    if token_list:
        static[torch.tensor(token_list)] = token_penalty  # forbidden tokens win over any softer entry
    rows: dict[tuple[tuple[int, ...], int], float] = {}  # (prefix, next token) -> its strongest penalty
    if continuation_penalty > 0:
        for phrase in phrase_list:
            for k in range(1, len(phrase)):
                rows[(phrase[:k], phrase[k])] = continuation_penalty
    ngram_list = sorted({(tuple(ids), soft, hard) for ids, soft, hard in ngrams
                         if 1 <= soft <= hard < len(ids) and 0 <= min(ids) and max(ids) < vocab_size})
    for ids, soft, hard in ngram_list:
        for k in range(soft, len(ids)):
            value = ngram_penalty if k < hard else continuation_penalty
            if value > rows.get((ids[:k], ids[k]), 0.0):
                rows[(ids[:k], ids[k])] = value
    # Right-align every prefix by one scatter of the flattened ids (thousands of rows with fact n-grams).
    lengths = torch.tensor([len(prefix) for prefix, _ in rows], dtype=torch.long)
    width = int(lengths.max()) if rows else 1
    flat = torch.tensor(list(itertools.chain.from_iterable(prefix for prefix, _ in rows)), dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    offset = torch.arange(flat.numel()) - (torch.cumsum(lengths, 0) - lengths)[owner]
    prefixes = torch.full((len(rows), width), DONT_CARE, dtype=torch.long)
    prefixes[owner, width - lengths[owner] + offset] = flat
    next_tokens = torch.tensor([nxt for _, nxt in rows], dtype=torch.long)
    continuation = torch.tensor(list(rows.values()), dtype=torch.float32)
    return GuardTables(static, prefixes, prefixes != DONT_CARE, next_tokens, continuation, len(token_list),
                       len(phrase_list), len(ngram_list)).to(device)


# -- 4. the per-step kernel ---------------------------------------------------------------------------------------
def history_window(tokens: Sequence[int], width: int) -> list[int]:
    """The last ``width`` tokens, left-padded with ``HISTORY_PAD``."""
    tail = list(tokens[-width:]) if width else []
    return [HISTORY_PAD] * (width - len(tail)) + tail


def apply_guard(logits: torch.Tensor, history: torch.Tensor, tables: GuardTables,
                gather: bool | None = None) -> torch.Tensor:
    """Penalise ``logits`` ``[R, V]`` in place given each row's last W tokens ``history`` ``[R, W]``.

    Two exact ways to find the matching prefix rows (``gather``; default: by device). On the CPU only the rows
    whose last prefix token is the last token written are compared in full: with fact n-grams a table holds
    thousands of rows, and the dense comparison of every row cost ~1 ms a step where this costs ~0.05 ms. On an
    accelerator the dense comparison stays: it is cheap there and, unlike ``nonzero``, never waits for the device.
    """
    logits.sub_(tables.static.to(logits.dtype))
    n = tables.next_tokens.shape[0]
    if n == 0:
        return logits
    if gather if gather is not None else logits.device.type == "cpu":
        rows, cand = (tables.prefixes[None, :, -1] == history[:, -1:]).nonzero(as_tuple=True)
        hit = ((tables.prefixes[cand] == history[rows]) | ~tables.care[cand]).all(dim=-1)
        rows, cand = rows[hit], cand[hit]
        flat = rows * logits.shape[1] + tables.next_tokens[cand]
        block = torch.zeros(logits.numel(), dtype=logits.dtype, device=logits.device).scatter_reduce_(
            0, flat, tables.continuation[cand].to(logits.dtype), reduce="amax").view(logits.shape)
        return logits.sub_(block)
    hist = history[:, None, :]  # [R, 1, W]
    match = ((tables.prefixes[None] == hist) | ~tables.care[None]).all(dim=-1)  # [R, N]
    penalties = torch.where(match, tables.continuation[None], torch.zeros((), device=logits.device))
    block = torch.zeros_like(logits).scatter_reduce_(1, tables.next_tokens.expand(logits.shape[0], n),
                                                     penalties.to(logits.dtype), reduce="amax")
    return logits.sub_(block)


def naive_guard(logits: torch.Tensor, history: Sequence[int], tokens: Iterable[int],
                phrases: Iterable[Sequence[int]], token_penalty: float, first_token_penalty: float,
                continuation_penalty: float, ngrams: Iterable[NGram] = (), ngram_penalty: float = 0.0
                ) -> torch.Tensor:
    """The same rule written plainly, one phrase at a time: the reference ``apply_guard`` is tested against."""
    out = logits.clone()
    penalty = [0.0] * out.shape[0]
    phrases = [tuple(p) for p in phrases if len(p) >= 2]
    for phrase in phrases:
        penalty[phrase[0]] = max(penalty[phrase[0]], first_token_penalty)
    for token in tokens:
        penalty[token] = token_penalty
    block = [0.0] * out.shape[0]
    real = [t for t in history if t >= 0]
    spans = [(p, 1, 1) for p in phrases] + [(tuple(ids), soft, hard) for ids, soft, hard in ngrams]
    for phrase, soft, hard in spans:
        for k in range(soft, len(phrase)):
            if len(real) >= k and tuple(real[-k:]) == phrase[:k]:
                value = ngram_penalty if k < hard else continuation_penalty
                block[phrase[k]] = max(block[phrase[k]], value)
    for v in range(out.shape[0]):
        out[v] = out[v] - penalty[v] - block[v]
    return out


class GuardProcessor:
    """A per-request logits processor ``(prompt_ids, output_ids, logits) -> logits`` around ``apply_guard``."""

    def __init__(self, tables: GuardTables, include_prompt: bool = False):
        self.tables = tables
        self.include_prompt = include_prompt

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        width = self.tables.window
        tail = list(output_ids[-width:])
        if self.include_prompt and len(tail) < width:
            tail = [t for t in prompt_ids[-(width - len(tail)):] if t > 0] + tail  # 0 = an embeddings position
        history = torch.tensor([history_window(tail, width)], device=logits.device)
        return apply_guard(logits[None], history, self.tables)[0]


# -- semantic neighbours ------------------------------------------------------------------------------------------
@dataclass
class VocabEmbeddings:
    """Sentence embeddings of the vocabulary's word-like tokens, computed once per tokenizer."""

    token_ids: torch.Tensor  # [M]
    matrix: torch.Tensor  # [M, dim]

    @staticmethod
    def words(tokenizer) -> tuple[list[int], list[str]]:
        """The word-like tokens (alphabetic, >= 3 characters) and their texts: what the table embeds."""
        ids, texts = [], []
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id]).strip()
            if len(text) >= 3 and text.isalpha():
                ids.append(token_id)
                texts.append(text)
        return ids, texts

    @classmethod
    def build(cls, tokenizer, encode: SentenceEncode, batch: int = 512) -> VocabEmbeddings:
        ids, texts = cls.words(tokenizer)
        rows = [encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
        matrix = torch.cat(rows) if rows else torch.zeros((0, 1))
        return cls(torch.tensor(ids, dtype=torch.long), matrix)

    def neighbours(self, words: Sequence[str], encode: SentenceEncode, threshold: float) -> list[int]:
        """Token ids whose text is within ``threshold`` cosine of any of ``words``."""
        if not words or self.token_ids.numel() == 0:
            return []
        sims = self.matrix @ encode(list(words)).T  # [M, len(words)]
        return self.token_ids[(sims.max(dim=1).values >= threshold)].tolist()


# -- putting it together ------------------------------------------------------------------------------------------
@dataclass
class GuardSet:
    """One request's forbidden set before compilation: tokens, phrases, fact n-grams, soft semantic penalties."""

    tokens: set[int] = field(default_factory=set)
    phrases: set[tuple[int, ...]] = field(default_factory=set)
    ngrams: set[NGram] = field(default_factory=set)
    extra: dict[int, float] = field(default_factory=dict)

    def update(self, other: GuardSet) -> None:
        self.tokens |= other.tokens
        self.phrases |= other.phrases
        self.ngrams |= other.ngrams
        for token_id, value in other.extra.items():
            self.extra[token_id] = max(self.extra.get(token_id, 0.0), value)


@dataclass
class GuardBuilder:
    """Per-model GUARD state: the tokenizer, the sentence encoder and the caches derived from them."""

    tokenizer: Any
    encode_sentences: SentenceEncode | None = None
    # ``generic_words`` of the target set: the default; the gateway passes its active set's with each request.
    generic: frozenset[str] = frozenset()
    # Where the semantic-neighbour table comes from (the gateway's: a disk cache); None = built here.
    vocabulary: Callable[[], VocabEmbeddings] | None = None
    _retriever: FactRetriever | None = field(default=None, init=False)
    _vocab: VocabEmbeddings | None = field(default=None, init=False)
    # The vocabulary table is made once (``warm``; ~1.5-4 s to embed the demo model's 4k tokens on two cores):
    # concurrent first requests wait for it instead of building it twice.
    _vocab_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _vocab_error: Exception | None = field(default=None, init=False, repr=False)
    _ngrams: dict[tuple[str, int], frozenset[NGram]] = field(default_factory=dict, init=False)
    # Token ids per surface form: a request tokenizes ~1,000 variants of its facts' words and phrases, the same
    # ones request after request (0.1 ms each through the tokenizer: most of building a request's tables).
    _ids: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False)

    # Names-only forbidden sets (``names_tables``, ``names_xargs``), per list of names: the same few lists recur
    # request after request, and building one costs ~1 ms for 19 names, ~4 ms for 64.
    _names: dict[tuple, tuple[GuardSet, dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    def encode(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            if len(self._ids) >= 200_000:
                self._ids.clear()
            ids = self._ids[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def nearest_facts(self, prompt: str, facts: Sequence[str], k: int) -> list[str]:
        if self.encode_sentences is None:
            return list(facts)
        if self._retriever is None:
            self._retriever = FactRetriever(self.encode_sentences)
        return self._retriever.nearest(prompt, facts, k)

    def warm(self) -> None:
        """Prepare the semantic-neighbour table now rather than on the first GUARD request. A table that cannot
        be made is logged once and not retried: GUARD then serves without its soft semantic penalties, never
        without its hard bans (a failure here must not turn flagged requests into server errors)."""
        if self.encode_sentences is None:
            return
        with self._vocab_lock:
            if self._vocab is not None or self._vocab_error is not None:
                return
            try:
                self._vocab = self.vocabulary() if self.vocabulary is not None else \
                    VocabEmbeddings.build(self.tokenizer, self.encode_sentences)
            except Exception as exc:  # noqa: BLE001 - the soft penalty is lost, never the hard bans
                self._vocab_error = exc
                log.error("GUARD's semantic-neighbour table could not be made (%s): GUARD runs without its soft "
                          "semantic penalties in this process", exc)

    def semantic_neighbours(self, words: Sequence[str], threshold: float) -> list[int]:
        self.warm()
        if self._vocab is None or self.encode_sentences is None:
            return []
        return self._vocab.neighbours(words, self.encode_sentences, threshold)

    def fact_ngram_sequences(self, facts: Sequence[str], n: int) -> set[NGram]:
        """``ngram_sequences`` of ``facts``, cached per fact (a target's facts recur on every flagged request)."""
        out: set[NGram] = set()
        for fact in facts:
            key = (fact, n)
            if key not in self._ngrams:
                if len(self._ngrams) >= 50_000:
                    self._ngrams.clear()
                self._ngrams[key] = frozenset(ngram_sequences(fact_ngrams([fact], n), self.encode))
            out |= self._ngrams[key]
        return out

    def sequences(self, prompt: str, facts: Sequence[str], params: GuardParams,
                  generic: frozenset[str] | None = None) -> GuardSet:
        """The forbidden set for one prompt against one target's facts (``generic``: see ``generic_words``;
        None = the builder's own)."""
        nearest = self.nearest_facts(prompt, facts, params.top_facts)
        forbidden = extract_forbidden(nearest, prompt, self.generic if generic is None else generic)
        tokens, phrases = token_sequences(forbidden, self.encode)
        extra: dict[int, float] = {}
        if params.semantic and forbidden.words:
            said = set(token_sequences(extract_forbidden([prompt]), self.encode)[0])
            for token_id in self.semantic_neighbours(forbidden.words, params.semantic_threshold):
                if token_id not in tokens and token_id not in said:
                    extra[token_id] = params.semantic_penalty
        ngrams: set[NGram] = set()
        if params.ngram >= 2:
            ngrams = self.fact_ngram_sequences(facts if params.ngram_facts == "all" else nearest, params.ngram)
        return GuardSet(tokens, phrases, ngrams, extra)

    def forbidden(self, prompt: str, facts_by_target: Sequence[Sequence[str]], params: GuardParams,
                  generic: frozenset[str] | None = None) -> GuardSet:
        merged = GuardSet()
        for facts in facts_by_target:
            merged.update(self.sequences(prompt, facts, params, generic))
        return merged

    def tables(self, prompt: str, facts_by_target: Sequence[Sequence[str]], params: GuardParams,
               device: torch.device | str = "cpu", generic: frozenset[str] | None = None) -> GuardTables:
        return self._compile(self.forbidden(prompt, facts_by_target, params, generic), params, device)

    def _compile(self, found: GuardSet, params: GuardParams, device: torch.device | str = "cpu") -> GuardTables:
        return compile_tables(self.vocab_size, found.tokens, found.phrases, params.token_penalty,
                              params.first_token_penalty, params.continuation_penalty, found.extra, device,
                              found.ngrams, params.ngram_penalty)

    def _names_entry(self, names: Sequence[str], params: GuardParams,
                     generic: frozenset[str] | None) -> tuple[GuardSet, dict[str, Any]]:
        """A names-only set, independent of the prompt: names are entities, which GUARD forbids even when the
        prompt says them. The dict holds its compiled forms, made on first use."""
        key = (tuple(names), params, self.generic if generic is None else generic)
        entry = self._names.get(key)
        if entry is None:
            if len(self._names) >= 1024:
                self._names.clear()
            entry = self._names[key] = (self.forbidden("", [[name] for name in names], params, generic), {})
        return entry

    def names_tables(self, names: Sequence[str], params: GuardParams,
                     generic: frozenset[str] | None = None) -> GuardTables:
        """Compiled tables forbidding ``names`` alone (cached; read-only once made)."""
        found, compiled = self._names_entry(names, params, generic)
        if "tables" not in compiled:
            compiled["tables"] = self._compile(found, params)
        return compiled["tables"]

    def names_xargs(self, names: Sequence[str], params: GuardParams,
                    generic: frozenset[str] | None = None) -> dict[str, Any]:
        """``names_tables`` as flat ``vllm_xargs`` (a copy: callers may extend it)."""
        found, compiled = self._names_entry(names, params, generic)
        if "xargs" not in compiled:
            compiled["xargs"] = xargs_for(found.tokens, found.phrases, params, found.ngrams)
        return dict(compiled["xargs"])

    def processor(self, prompt: str, facts_by_target: Sequence[Sequence[str]], params: GuardParams,
                  generic: frozenset[str] | None = None) -> GuardProcessor:
        return GuardProcessor(self.tables(prompt, facts_by_target, params, generic=generic), params.include_prompt)

    def xargs(self, prompt: str, facts_by_target: Sequence[Sequence[str]], params: GuardParams,
              generic: frozenset[str] | None = None) -> dict[str, Any]:
        """The same forbidden set as flat ``vllm_xargs`` for a vLLM worker running our plugin."""
        found = self.forbidden(prompt, facts_by_target, params, generic)
        return xargs_for(found.tokens, found.phrases, params, found.ngrams)


# -- flat vllm_xargs (the wire form of a forbidden set) -----------------------------------------------------------
XARG_KEYS = frozenset({"guard_target", "guard_tokens", "guard_phrases", "guard_ngrams", "guard_mode",
                       "guard_penalty", "guard_first_penalty", "guard_ngram_penalty"})


def _ids(text: str | int) -> list[int]:
    if isinstance(text, int):
        return [text]
    return [int(x) for x in str(text).split(",") if x.strip()]


def _ngram(text: str) -> NGram:
    """``"first word ids|inner words' ids|last word's ids"`` (the wire form of an ``NGram``) -> ``NGram``."""
    parts = str(text).split("|")
    if len(parts) != 3:
        raise ValueError(f"a guard_ngrams entry has three '|'-separated parts: {text!r}")
    first, inner, last = (_ids(p) for p in parts)
    return tuple(first + inner + last), len(first), len(first) + len(inner)


def _ngram_text(ngram: NGram) -> str:
    ids, soft, hard = ngram
    return "|".join(",".join(map(str, part)) for part in (ids[:soft], ids[soft:hard], ids[hard:]))


def _listed(raw: Any) -> list:
    return [raw] if isinstance(raw, str) else list(raw)


def xargs_for(tokens: Iterable[int], phrases: Iterable[Sequence[int]], params: GuardParams,
              ngrams: Iterable[NGram] = ()) -> dict[str, Any]:
    """Flat values only (vLLM rejects nested ones): ``"id,id,..."`` strings; n-grams as ``"a,b|c|d,e"``."""
    out = {"guard_tokens": ",".join(str(t) for t in sorted(tokens)),
           "guard_phrases": [",".join(str(t) for t in p) for p in sorted(phrases)],
           "guard_mode": params.mode, "guard_penalty": params.penalty,
           "guard_first_penalty": params.first_token_penalty}
    if ngrams:
        out["guard_ngrams"] = [_ngram_text(g) for g in sorted(ngrams)]
        out["guard_ngram_penalty"] = params.ngram_penalty
    return out


def validate_xargs(xargs: Mapping[str, Any], table: Mapping[str, Any] | None = None) -> bool:
    """Check the ``guard_*`` namespace; True when the request asks for GUARD. Raises ``ValueError``."""
    keys = {k for k in xargs if k.startswith("guard_")}
    if not keys:
        return False
    if unknown := keys - XARG_KEYS:
        raise ValueError(f"unknown GUARD arguments: {sorted(unknown)}")
    if xargs.get("guard_mode", "hard") not in ("soft", "hard"):
        raise ValueError("guard_mode must be 'soft' or 'hard'")
    for key in ("guard_penalty", "guard_first_penalty", "guard_ngram_penalty"):
        if key in xargs:
            value = float(xargs[key])
            if math.isnan(value) or value < 0:
                raise ValueError(f"{key} must be a number >= 0 or 'inf'")
    if "guard_target" in xargs and (table is None or str(xargs["guard_target"]) not in table):
        raise ValueError(f"unknown guard_target {xargs['guard_target']!r}")
    try:
        _ids(xargs.get("guard_tokens", ""))
        for phrase in _listed(xargs.get("guard_phrases", [])):
            _ids(phrase)
        for ngram in _listed(xargs.get("guard_ngrams", [])):
            _ngram(ngram)
    except ValueError as exc:
        raise ValueError("guard_tokens / guard_phrases must be comma-separated token ids, guard_ngrams "
                         "'ids|ids|ids'") from exc
    return True


def tables_from_xargs(xargs: Mapping[str, Any], vocab_size: int, table: Mapping[str, Any] | None = None,
                      device: torch.device | str = "cpu") -> GuardTables | None:
    """A request's ``guard_*`` xargs (and a target table entry it names) -> tables; None without GUARD args."""
    if not validate_xargs(xargs, table):
        return None
    mode = str(xargs.get("guard_mode", "hard"))
    penalty = float(xargs.get("guard_penalty", 10.0))
    tokens = set(_ids(xargs.get("guard_tokens", "")))
    phrases = {tuple(_ids(p)) for p in _listed(xargs.get("guard_phrases", []))}
    ngrams = {_ngram(g) for g in _listed(xargs.get("guard_ngrams", []))}
    ngram_penalty = float(xargs.get("guard_ngram_penalty", GuardParams.ngram_penalty))
    if "guard_target" in xargs and table is not None:
        entry = table[str(xargs["guard_target"])]
        tokens |= {int(t) for t in entry.get("tokens", [])}
        phrases |= {tuple(int(t) for t in p) for p in entry.get("phrases", [])}
        ngrams |= {(tuple(int(t) for t in ids), int(soft), int(hard)) for ids, soft, hard in entry.get("ngrams", [])}
        mode = str(xargs.get("guard_mode", entry.get("mode", mode)))
        penalty = float(xargs.get("guard_penalty", entry.get("penalty", penalty)))
        ngram_penalty = float(xargs.get("guard_ngram_penalty", entry.get("ngram_penalty", ngram_penalty)))
    hard = mode == "hard"
    return compile_tables(vocab_size, tokens, phrases, INF if hard else penalty,
                          float(xargs.get("guard_first_penalty", 5.0)), INF if hard else penalty, device=device,
                          ngrams=ngrams, ngram_penalty=ngram_penalty)


def target_table_entry(builder: GuardBuilder, facts: Sequence[str], params: GuardParams) -> dict[str, Any]:
    """One ``UNLEARN_GUARD_TABLE`` entry: a target's forbidden set over all its facts (no per-prompt retrieval)."""
    tokens, phrases = token_sequences(extract_forbidden(facts, "", builder.generic), builder.encode)
    ngrams = builder.fact_ngram_sequences(facts, params.ngram) if params.ngram >= 2 else set()
    return {"tokens": sorted(tokens), "phrases": [list(p) for p in sorted(phrases)],
            "ngrams": [[list(ids), soft, hard] for ids, soft, hard in sorted(ngrams)], "mode": params.mode,
            "penalty": params.penalty, "ngram_penalty": params.ngram_penalty}


__all__ = ["FactRetriever", "ForbiddenSet", "GuardBuilder", "GuardParams", "GuardProcessor", "GuardSet",
           "GuardTables", "NGram", "VocabEmbeddings", "apply_guard", "compile_tables", "extract_forbidden",
           "fact_ngrams", "generic_words", "history_window", "naive_guard", "ngram_sequences",
           "surface_variants", "tables_from_xargs", "target_table_entry", "token_sequences", "validate_xargs",
           "xargs_for"]
