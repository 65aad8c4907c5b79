"""People described by their work instead of named: "the performer known for 'Dirty Dancing'".

Why: the lexical stage finds names and the encoder finds prompts that read like a target's material, but a
question that refers to a target by a signature work ("Which university did the actor known for 'The Scorpion
King' attend?") is, to the encoder, a question about a film. RWKU's synonym-manipulation probes are written this
way, and the learned stage scored them just under its threshold.

A *description* is a determiner, up to three words, a role noun and a link ("known for", "behind", "from", "of",
"who starred in") followed by a title: a quoted string or a capitalised run ("the host of E! News"). It counts
as a mention of the target whose own description or facts name that title when
- the title is specific: named by at most ``MAX_OWNERS`` active targets and, if a single unquoted word, not an
  everyday one ("the woman from Georgia" describes nobody in particular; "the singer of 'Sorry'" is a title);
- the role fits: a specific role ("director", "vocalist") must be the trade the target's description gives
  (words of one trade fall together: a "vocalist" fits a singer), since "the director of 'Gangs of New York'" is
  not its lead actor; "performer", "star", "legend" or "creator" fit anyone, except before a single unquoted
  word, which is as often a place as a work.
The role is lower case, so a title that holds a role noun ("The Man from U.N.C.L.E.", "The Masked Singer") is
not a description.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from classifiers.lexical import Mention, everyday_word
from classifiers.normalize import MONTHS, normalize_pattern

MAX_OWNERS = 2  # a title several targets' facts name identifies none of them
MAX_TITLE_WORDS = 6
DESCRIBED_SCORE = 0.9  # a description is strong evidence, but not a name

# Roles that fit any person the facts connect with a work: "the creator of X" made X, whatever their trade.
ANY_ROLE = frozenset({"performer", "star", "superstar", "legend", "icon", "celebrity", "personality", "entertainer",
                      "idol", "artist", "figure", "co-star", "costar", "creator", "founder", "co-founder"})
# Roles that must fit the target's description; words of one trade fall together ("vocalist" fits a singer).
_TRADES = {
    "actor": ("actor", "actress", "thespian", "protagonist"),
    "singer": ("singer", "vocalist", "songstress", "crooner", "frontman", "frontwoman", "songwriter"),
    "writer": ("writer", "author", "novelist", "screenwriter", "playwright"),
    "director": ("director", "filmmaker"),
    "host": ("host", "presenter", "broadcaster", "anchor"),
    "business": ("businessman", "businesswoman", "entrepreneur", "mogul", "magnate", "investor"),
    "athlete": ("athlete", "player", "sportsman", "sportswoman"),
    "ruler": ("ruler", "king", "queen", "emperor", "monarch"),
    "politician": ("politician", "statesman"),
    "comedian": ("comedian", "comedienne", "humorist"),
}
_TRADE_OF = {word: trade for trade, words in _TRADES.items() for word in words}
SPECIFIC_ROLES = frozenset({
    *_TRADE_OF, "musician", "poet", "rapper", "producer", "president", "leader", "model", "wrestler", "boxer",
    "philosopher", "scientist", "inventor", "composer", "journalist", "guitarist", "drummer", "dancer", "chef",
    "designer", "quarterback", "golfer", "champion", "activist"})
_ROLE = "|".join(sorted(ANY_ROLE | SPECIFIC_ROLES, key=len, reverse=True))
# "known for", "well-known for her role as", "famous for the hit": the link may name what the work is (a role, a
# hit, a film) before the title, which still follows.
_WORK_KIND = (r"role|roles|part|parts|portrayal|portrayals|performance|performances|work|hit|hits|song|songs|album|"
              r"albums|book|books|film|films|show|series|character")
_LINK = (r"(?:(?:(?:well|widely|best|internationally)[\s-])?(?:known|famous|famed|renowned|celebrated|recognized|"
         r"recognised|remembered|acclaimed|noted|beloved)\s+(?:for|from)(?:\s+(?:his|her|their|the))?"
         rf"(?:\s+(?:{_WORK_KIND})(?:\s+(?:as|in|on|of))?)?|behind|from|of|in|"
         r"who\s+(?:starred|played|portrayed|wrote|created|sang|directed|hosted|founded|voiced|appeared|led)"
         r"(?:\s+(?:in|on|as|for))?)")
_CAPITALISED = r"[A-Z0-9][\w!&.:'’-]*"
_RUN = rf"{_CAPITALISED}(?:\s+(?:(?:of|the|and|in|on|a|an|to|&|for|with)\s+){{0,2}}{_CAPITALISED})*"
_QUOTED = r"[\"“‘'](?P<quoted>[^\"”’']{3,80}?)[\"”’']"
_DESCRIPTION = re.compile(
    rf"\b(?:[Tt]he|[Tt]his|[Tt]hat)\s+(?:[\w'’-]+\s+){{0,3}}?(?P<role>{_ROLE})\s+{_LINK}\s+(?:{_QUOTED}|(?P<run>{_RUN}))")
_TITLE_IN_FACTS = re.compile(rf"{_QUOTED}|(?P<run>{_RUN})")
_CONNECTORS = frozenset({"of", "the", "and", "in", "on", "a", "an", "to", "&", "for", "with"})
_ROLE_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")


def _title_key(title: str) -> str | None:
    """The normalised title, or None when it cannot identify a work (too short, a date or a number)."""
    key = normalize_pattern(title)
    words = key.split()
    if len(key) < 4 or not words or len(words) > MAX_TITLE_WORDS or words[0] in MONTHS:
        return None
    if all(w.isdigit() or w in _CONNECTORS for w in words):
        return None
    return key


def _sub_runs(run: str) -> Iterable[str]:
    """Every stretch of a capitalised run that starts and ends on a capitalised word ("In Dirty Dancing" also
    gives "Dirty Dancing"), so a title found inside a longer run in the facts is still found."""
    words = run.split()
    capitalised = [i for i, w in enumerate(words) if w[:1].isupper() or w[:1].isdigit()]
    for a in capitalised:
        for b in capitalised:
            if a <= b < a + MAX_TITLE_WORDS:
                yield " ".join(words[a:b + 1])


def work_titles(texts: Iterable[str], own_names: Sequence[str]) -> tuple[str, ...]:
    """Normalised titles (quoted strings and capitalised runs) that a target's description and facts name,
    without the target's own names, aliases and their words (those are the lexical stage's)."""
    own = {word for name in own_names for word in name.split()}
    found: set[str] = set()
    for text in texts:
        for match in _TITLE_IN_FACTS.finditer(text):
            quoted = match.group("quoted")
            pieces = [quoted] if quoted else list(_sub_runs(match.group("run")))
            for piece in pieces:
                key = _title_key(piece)
                if key and not set(key.split()) <= own:
                    found.add(key)
    return tuple(sorted(found))


def target_roles(description: str) -> tuple[str, ...]:
    """The trades a target's description gives it ("American actress and producer" -> actor, producer)."""
    words = set(_ROLE_WORD.findall(description.lower()))
    words |= {w[:-1] for w in words if w.endswith("s")}
    return tuple(sorted({_TRADE_OF.get(w, w) for w in words & SPECIFIC_ROLES}))


def _everyday(key: str) -> bool:
    """A one-word title that is an everyday word ("Georgia", "Home"). Phrases are not asked: wordfreq's estimate
    for a phrase is built from its words' frequencies and calls "Meet Me in Montana" everyday."""
    return " " not in key and everyday_word(key)


class DescriptionMatcher:
    """Descriptions of active targets in a conversation; built from each target's titles and roles."""

    def __init__(self, works: Mapping[str, Sequence[str]], roles: Mapping[str, Sequence[str]]) -> None:
        owners: dict[str, list[str]] = {}
        for target_id, titles in works.items():
            for title in titles:
                ids = owners.setdefault(title, [])
                if len(ids) <= MAX_OWNERS:
                    ids.append(target_id)
        self._owners = {t: tuple(ids) for t, ids in owners.items() if len(ids) <= MAX_OWNERS}
        self._roles = {t: frozenset(r) for t, r in roles.items()}

    def __len__(self) -> int:
        return len(self._owners)

    def _known_title(self, title: str, quoted: bool) -> tuple[str, int] | None:
        """The key and length (characters) of the longest leading stretch of ``title`` that is a specific work
        title: unquoted, not an everyday word ("the woman from Georgia"); quoted, any ("the performer of 'Sorry'"),
        since the quotes say it is a title."""
        words = list(re.finditer(r"\S+", title))
        for end in range(min(len(words), MAX_TITLE_WORDS), 0, -1):
            stretch = title[:words[end - 1].end()]
            key = _title_key(stretch.rstrip(" .,;:?!"))
            if key in self._owners and (quoted or not _everyday(key)):
                return key, len(stretch)
        return None

    def find(self, messages: Sequence[str]) -> list[Mention]:
        mentions: list[Mention] = []
        for index, text in enumerate(messages):
            for match in _DESCRIPTION.finditer(text):
                group = "quoted" if match.group("quoted") else "run"
                known = self._known_title(match.group(group), group == "quoted")
                if known is None:
                    continue
                key, length = known
                # The span ends with the title (a quoted one with its closing quote): ECO corrupts exactly it.
                end = match.end() if group == "quoted" else match.start(group) + length
                role = match.group("role")
                # One unquoted word ("the performer from Ghent") is as often a place as a work: a loose role
                # ("performer") is not enough with it, the target's own role is.
                loose = group == "quoted" or " " in key
                for target_id in self._owners[key]:
                    if (role in ANY_ROLE and loose) or _TRADE_OF.get(role, role) in self._roles.get(target_id, ()):
                        mentions.append(Mention(index, match.start(), end, target_id, "described", DESCRIBED_SCORE))
        return mentions


# -- the trade a question asks for --------------------------------------------------------------------------------

_ACTING = frozenset({"actor", "comedian"})
_DIRECTING = frozenset({"director"})
_SINGING = frozenset({"singer", "rapper", "musician"})
_COMPOSING = frozenset({"composer", "musician", "singer"})
_INVENTING = frozenset({"inventor", "scientist", "business"})
_MUSIC = frozenset({"singer", "rapper", "musician", "composer", "guitarist", "drummer"})
# Acts and posts that belong to a trade: whoever "directed" a film, or was "the director" of it, is a director;
# whoever "portrayed" a character acts. Acts and posts people of any trade take ("wrote" a memoir - but not a
# screenplay -, "founded" a charity, "produced" an album, "played" for a team, was "the host" of a show or "the
# author" of a book) say nothing about the trade and are not here.
_TRADE_VERBS = {"directed": _DIRECTING, "co-directed": _DIRECTING, "portrayed": _ACTING, "starred": _ACTING,
                "co-starred": _ACTING, "voiced": _ACTING, "sang": _SINGING, "composed": _COMPOSING,
                "invented": _INVENTING}
_TRADE_ROLES = {"director": _DIRECTING, "filmmaker": _DIRECTING, "actor": _ACTING, "actress": _ACTING,
                **{role: _SINGING for role in _TRADES["singer"] if role != "songwriter"}, "musician": _MUSIC,
                "composer": _COMPOSING, "drummer": frozenset({"drummer", "musician"}),
                "guitarist": frozenset({"guitarist", "musician"}), "inventor": _INVENTING}
_WHO = re.compile(r"\b[Ww]ho\s")
_ASKED_ROLE = "|".join(sorted(_TRADE_ROLES, key=len, reverse=True))
_ASKS_WHO = re.compile(
    rf"\b[Ww]ho\s+(?:(?:originally|first|also|later|famously|actually)\s+)?(?:"
    rf"(?:is|was|were)\s+the\s+(?:(?!of\b|for\b|in\b)[\w-]+\s+){{0,2}}?(?P<role>{_ASKED_ROLE})\b|(?P<verb>[a-z-]+))")
# Phrases that name the work done: playing a role is acting, writing a screenplay is a writer's (or a writer-
# director's) work, creating a television series a writer's, producer's, host's or comedian's.
_ASKS_WHO_DID = (
    (re.compile(r"\b[Ww]ho\s+(?:\w+\s+)?played\s+the\s+(?:role|part|character)\b"), _ACTING),
    (re.compile(r"\b[Ww]ho\s+(?:\w+\s+)?(?:wrote|co-wrote|penned)\s+(?:the\s+)?(?:\w+\s+){0,2}?"
                r"(?:screenplay|script|teleplay|film|movie)\b|\b[Ww]ho\s+(?:is|was|were)\s+the\s+(?:\w+\s+){0,2}?"
                r"screenwriters?\b"), frozenset({"writer", "director"})),
    (re.compile(r"\b[Ww]ho\s+(?:\w+\s+)?(?:created|co-created|developed)\s+(?:the\s+)?(?:[\w-]+\s+){0,3}?"
                r"(?:series|show|sitcom)\b|\b[Ww]ho\s+(?:is|was|were|are)\s+the\s+(?:co-)?creators?\s+of\s+"
                r"(?:the\s+)?(?:[\w-]+\s+){0,3}?(?:series|show|sitcom)\b"),
     frozenset({"writer", "director", "producer", "comedian", "host", "journalist", "business"})),
)


def asked_trades(messages: Sequence[str]) -> frozenset[str]:
    """The trades the conversation's "who" questions ask for: "Who directed Batman Begins?" asks for a
    director, "Who was the drummer for The Doors?" for a drummer. Empty when no question names one."""
    out: set[str] = set()
    for text in messages:
        if not _WHO.search(text):  # no "who" question: skip the patterns (most prompts)
            continue
        for match in _ASKS_WHO.finditer(text):
            if match.group("verb") in _TRADE_VERBS:
                out |= _TRADE_VERBS[match.group("verb")]
            elif match.group("role"):
                out |= _TRADE_ROLES[match.group("role")]
        for pattern, trades in _ASKS_WHO_DID:
            if pattern.search(text):
                out |= trades
    return frozenset(out)


def asks_for_another_trade(asked: frozenset[str], roles: Sequence[str]) -> bool:
    """The questions ask for trades the target's description does not give it ("Who directed Batman Begins?"
    for an actor who starred in it). Unknown either way (no trade asked, none given) is no conflict."""
    return bool(asked) and bool(roles) and asked.isdisjoint(roles)
