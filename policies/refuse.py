"""REFUSE: answer a flagged request with a templated refusal instead of generating.

Why a template: it is the baseline every unlearning method is compared with (TOFU's "I don't know" answers), it
costs nothing, and it never leaks. It also makes the gate visible to the user, which the other policies avoid.
The template is configurable per target (``RefusePolicy.message``); ``{name}`` and ``{names}`` are filled in.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TEMPLATE = "I'm sorry, but I don't have any information about {name}."


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _join(names: Sequence[str]) -> str:
    names = [n for n in names if n]
    if len(names) <= 1:
        return names[0] if names else "that"
    return ", ".join(names[:-1]) + " or " + names[-1]


def refusal(names: Sequence[str], template: str | None = None) -> str:
    """The refusal text for the targets a request matched; unknown ``{fields}`` are left as written."""
    joined = _join(list(names))
    return (template or DEFAULT_TEMPLATE).format_map(_Blank(name=joined, names=joined))


__all__ = ["DEFAULT_TEMPLATE", "refusal"]
