"""Cut a conversation into short, overlapping windows for the sentence encoder.

Why windows, not the whole prompt: the encoder reads at most 256 word pieces (everything after that would be
silently dropped), and a mean-pooled embedding of a long prompt is dominated by its filler, so a question
buried after 700 words of small talk would no longer look like the question. Windows are whole sentences packed
up to ``max_units`` words (CJK characters count one each); consecutive windows of a message share one sentence,
so a question whose subject is set up in the sentence before it ("Answer: Carrie. And who wrote it?") is seen
together. A sentence longer than a window is cut into overlapping word chunks. Nothing is truncated.

A question (a sentence with "?" or a fill-in blank "___") packed with other sentences also gets a window of
its own: the intent of a prompt sits in its question, and 40 words of small talk around it would dilute its
embedding ("a question buried after 700 words of filler").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?。！？;])\s+|\n+|(?<=[。！？])")
_UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u9fff"
                   r"\uac00-\ud7af\uf900-\ufaff]+")
MAX_UNITS = 48
CHUNK_OVERLAP = 12


@dataclass(frozen=True, slots=True)
class Window:
    """A piece of one message: original characters [start, end) of message ``message``."""

    message: int
    start: int
    end: int
    text: str


def _sentences(content: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    position = 0
    for match in _SENTENCE_END.finditer(content):
        if match.start() > position:
            spans.append((position, match.start()))
        position = match.end()
    if position < len(content):
        spans.append((position, len(content)))
    return [(s, e) for s, e in spans if content[s:e].strip()]


def _units(content: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in _UNIT.finditer(content[start:end])]


def message_windows(index: int, content: str, max_units: int = MAX_UNITS) -> list[Window]:
    """Windows of one message, in order."""
    pieces: list[tuple[int, int, int]] = []  # start, end, units
    for s, e in _sentences(content):
        units = _units(content, s, e)
        if len(units) <= max_units:
            pieces.append((s, e, len(units)))
            continue
        step = max_units - CHUNK_OVERLAP
        for k in range(0, len(units), step):
            chunk = units[k:k + max_units]
            pieces.append((chunk[0][0], chunk[-1][1], len(chunk)))
            if k + max_units >= len(units):
                break
    out: list[Window] = []
    questions = [(s, e) for s, e, _ in pieces if "?" in content[s:e] or "？" in content[s:e] or "__" in content[s:e]]
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + pieces[j][2] <= max_units):
            total += pieces[j][2]
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        out.append(Window(index, start, end, content[start:end].strip()))
        if j - i >= 2:
            out += [Window(index, qs, qe, content[qs:qe].strip()) for qs, qe in questions if start <= qs and qe <= end]
        if j >= len(pieces):
            break
        # Share the last sentence with the next window when both fit together.
        i = j - 1 if j - i >= 2 and pieces[j - 1][2] + pieces[j][2] <= max_units else j
    return out


def conversation_windows(messages: Sequence[str], max_units: int = MAX_UNITS) -> list[Window]:
    """Windows of every message of the conversation (every role), without duplicate texts."""
    seen: set[str] = set()
    out: list[Window] = []
    for index, content in enumerate(messages):
        for window in message_windows(index, content, max_units):
            if window.text and window.text not in seen:
                seen.add(window.text)
                out.append(window)
    return out
