"""The categorized calibration pool that architecture codes and the MoE backend are built from.

Why generated from templates: pruning masks, expert clusters and the pre-gating router are
fitted on prompts, so the pool must be broad (several kinds of request, so that experts and
codes can specialize) and large enough to hold some out, and it must ship with the product (no
data set at run time). Every prompt carries its category so that reports can say what a code
or an expert set specializes in. Deterministic: the same pool on every machine.

None of these prompts is an item of the aptitude suite (router/data/aptitude_suite.jsonl), which is
what codes are scored on; arithmetic here is drawn from other templates and number ranges.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20261130


@dataclass(frozen=True)
class CalibrationPrompt:
    category: str
    text: str


_CONCEPTS = ["photosynthesis", "gravity", "inflation in economics", "how vaccines work", "the water cycle",
             "black holes", "machine learning", "the greenhouse effect", "supply and demand", "DNA replication",
             "plate tectonics", "compound interest", "the immune system", "electric circuits", "evolution by natural selection",
             "how the internet works", "nuclear fission", "the stock market", "how airplanes fly", "the placebo effect",
             "blockchain", "climate change", "the speed of light", "how batteries store energy", "antibiotic resistance",
             "the French Revolution", "democracy", "the theory of relativity", "how rainbows form", "encryption"]
_FORMS = ["short poem", "haiku", "limerick", "two-sentence story", "short product description", "motivational quote",
          "birthday message", "short speech"]
_TOPICS = ["the ocean", "a rainy morning", "friendship", "a lost cat", "the first day of school", "coffee",
           "mountains in winter", "a robot learning to paint", "city lights at night", "a garden in spring"]
_CODE = ["reverses a string", "checks whether a number is prime", "returns the factorial of n",
         "counts the vowels in a string", "merges two sorted lists", "finds the largest element of a list",
         "removes duplicates from a list while keeping order", "computes the nth Fibonacci number",
         "checks whether a string is a palindrome", "converts Celsius to Fahrenheit", "sums the digits of an integer",
         "returns the most common word in a text", "flattens a nested list", "sorts a list of dictionaries by a key",
         "validates an email address with a regular expression", "reads a CSV file and returns its rows",
         "computes the average of a list of numbers", "capitalizes the first letter of every word",
         "returns the intersection of two lists", "generates all permutations of a string"]
_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
_PHRASES = ["Good morning, how are you?", "Where is the train station?", "I would like a cup of tea.",
            "Thank you for your help.", "The weather is nice today.", "What time is it?", "I love reading books.",
            "Can you help me, please?"]
_GOALS = ["sleep better", "learn a new language faster", "save money each month", "stay focused while studying",
          "start running as a beginner", "make my small apartment feel bigger", "prepare for a job interview",
          "reduce stress at work", "keep houseplants alive", "write a clear email to my manager",
          "eat more vegetables", "organize my week", "be more productive in the morning", "improve my handwriting",
          "make new friends in a new city"]
_SENTENCES = ["hey, can u send me the report asap?", "the meeting got moved cuz the boss is sick",
              "we gotta fix this bug before friday", "thx for the gift, it was awesome",
              "i cant come tomorrow, something came up", "this product is kinda expensive but its good",
              "the team did great on the project", "pls call me back when u can"]
_ITEMS = ["apples", "pencils", "notebooks", "tickets", "cupcakes", "batteries"]
_PEOPLE = ["Anna", "Ben", "Carla", "David", "Elif", "Farid"]


def _math(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b, c = rng.randint(12, 95), rng.randint(3, 19), rng.randint(2, 9)
        who, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
        t = i % 4
        if t == 0:
            out.append(f"{who} buys {c} packs of {item} with {b} {item} in each pack. How many {item} is that in total?")
        elif t == 1:
            out.append(f"{who} had {a} {item} and gave away {b}. How many {item} are left?")
        elif t == 2:
            out.append(f"A train travels at {a} kilometres per hour for {c} hours. How far does it go?")
        else:
            out.append(f"If {c} friends share {c * b} {item} equally, how many does each friend get?")
    return out


def calibration_pool() -> list[CalibrationPrompt]:
    """Every calibration prompt with its category, in a fixed order (226 prompts)."""
    rng = random.Random(SEED)
    chat = [line.strip() for line in (Path(__file__).parent / "data" / "calibration.txt").read_text().splitlines()
            if line.strip()]
    pool = [CalibrationPrompt("chat", t) for t in chat]
    pool += [CalibrationPrompt("explain", f"Explain {c} in simple terms.") for c in _CONCEPTS]
    pool += [CalibrationPrompt("writing", f"Write a {rng.choice(_FORMS)} about {t}.") for t in _TOPICS for _ in range(3)]
    pool += [CalibrationPrompt("code", f"Write a Python function that {t}.") for t in _CODE]
    pool += [CalibrationPrompt("math", t) for t in _math(rng, 32)]
    pool += [CalibrationPrompt("translate", f"Translate into {lang}: \"{p}\"") for p in _PHRASES
             for lang in rng.sample(_LANGUAGES, 3)]
    pool += [CalibrationPrompt("advice", f"How can I {g}? Give three tips.") for g in _GOALS]
    pool += [CalibrationPrompt("advice", f"What is a good way to {g}?") for g in _GOALS]
    pool += [CalibrationPrompt("rewrite", f"Rewrite this message in a polite, formal tone: \"{s}\"") for s in _SENTENCES]
    pool += [CalibrationPrompt("rewrite", f"Fix the spelling and grammar: \"{s}\"") for s in _SENTENCES]
    # The templates repeat a few texts; the first of each is kept, in order.
    seen: set[str] = set()
    out = []
    for p in pool:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def split_pool(pool: list[CalibrationPrompt], held_out: float = 0.25, seed: int = SEED
               ) -> tuple[list[CalibrationPrompt], list[CalibrationPrompt]]:
    """(fit, held-out), stratified by category so both halves hold every kind of request."""
    rng = random.Random(seed)
    fit: list[CalibrationPrompt] = []
    held: list[CalibrationPrompt] = []
    for cat in sorted({p.category for p in pool}):
        items = [p for p in pool if p.category == cat]
        rng.shuffle(items)
        n = int(round(held_out * len(items)))
        held += items[:n]
        fit += items[n:]
    return fit, held


def subsample(pool: list[CalibrationPrompt], n: int | None) -> list[CalibrationPrompt]:
    """At most about ``n`` prompts, every category kept in proportion (quick builds, tests)."""
    if n is None or n >= len(pool):
        return pool
    cats = sorted({p.category for p in pool})
    out: list[CalibrationPrompt] = []
    for cat in cats:
        items = [p for p in pool if p.category == cat]
        out += items[:max(2, round(n * len(items) / len(pool)))]
    return out
