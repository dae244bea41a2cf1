"""Automatic scorers for the aptitude suite: (answer, item) -> score in [0, 1].

Each scorer reads only the start of an answer where that is where the answer belongs (small
models often ramble on after answering), and is lenient about case and punctuation, strict about
content.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from router.core.registry import Registry

SCORERS: Registry[Callable[[str, dict[str, Any]], float]] = Registry("aptitude scorer")

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", " ", s.lower()).strip()


def first_number(answer: str) -> float | None:
    """The first number in the answer (digits, or a number word up to twelve)."""
    m = _NUM.search(answer.replace(",", ""))
    words = re.search(r"\b(" + "|".join(_WORDS) + r")\b", answer.lower())
    if m and (not words or m.start() <= words.start()):
        return float(m.group())
    return float(_WORDS[words.group(1)]) if words else None


@SCORERS.register("number")
def number(answer: str, item: dict[str, Any]) -> float:
    """The first number stated equals the reference. "7 + 5 = 12" would read 7: the prompt asks
    for the number alone, and restating the question first is a formatting failure we accept
    only when the final number of the first line is right, so we check that too."""
    ref = float(item["reference"])
    line = answer.strip().split("\n")[0]
    got = first_number(line)
    if got is not None and abs(got - ref) < 1e-6:
        return 1.0
    if "=" in line:
        after = first_number(line.rsplit("=", 1)[1])
        return float(after is not None and abs(after - ref) < 1e-6)
    return 0.0


@SCORERS.register("contains")
def contains(answer: str, item: dict[str, Any]) -> float:
    """Any accepted answer appears as whole words in the first 200 characters."""
    head = " " + _norm(answer[:200]) + " "
    return float(any(f" {_norm(a)} " in head for a in item["accept"]))


@SCORERS.register("yes_no")
def yes_no(answer: str, item: dict[str, Any]) -> float:
    """The first yes/no word in the answer matches the reference."""
    m = re.search(r"\b(yes|no)\b", answer.lower())
    return float(m is not None and m.group(1) == item["reference"])


@SCORERS.register("exact_word")
def exact_word(answer: str, item: dict[str, Any]) -> float:
    """The whole answer is the word (quotes, case and a final period forgiven)."""
    return float(_norm(answer) == _norm(item["reference"]))


@SCORERS.register("uppercase")
def uppercase(answer: str, item: dict[str, Any]) -> float:
    """The word appears in capital letters."""
    return float(re.search(r"\b" + re.escape(item["reference"].upper()) + r"\b", answer) is not None)


@SCORERS.register("repeat")
def repeat(answer: str, item: dict[str, Any]) -> float:
    """The sentence is reproduced word for word (case and punctuation forgiven)."""
    return float(_norm(item["reference"]) in _norm(answer))


@SCORERS.register("comma_list")
def comma_list(answer: str, item: dict[str, Any]) -> float:
    """The first non-empty line holds exactly n comma-separated items, or a list of n lines."""
    n = int(item["reference"])
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    if not lines:
        return 0.0
    parts = [p for p in re.split(r",|\band\b", lines[0]) if p.strip(" .")]
    if len(parts) == n:
        return 1.0
    bullets = [ln for ln in lines if re.match(r"^(\d+[.)]|[-*•])\s+\S", ln)]
    return float(len(bullets) == n)


@SCORERS.register("starts_with")
def starts_with(answer: str, item: dict[str, Any]) -> float:
    """The answer's first word is the given word."""
    words = _norm(answer).split()
    return float(bool(words) and words[0] == _norm(item["reference"]))


def score(answer: str, item: dict[str, Any]) -> float:
    return SCORERS.get(item["scorer"])(answer, item)
