"""Generate the aptitude suite (router/data/aptitude_suite.jsonl), deterministically.

    .venv/bin/python -m router.offline.aptitude.build_suite

Four kinds of question, each with an automatic scorer (router/offline/aptitude/scorers.py):
arithmetic, facts, short reasoning, instruction following. Arithmetic and reasoning items are
drawn from templates with a fixed seed; facts and instruction words are written out below.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SUITE = Path(__file__).resolve().parents[2] / "data" / "aptitude_suite.jsonl"
SEED = 20261129
JUST_NUMBER = " Answer with just the number."

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
            ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Argentina", "Buenos Aires"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
            ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Peru", "Lima"), ("Cuba", "Havana"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen")]

FACTS: list[tuple[str, list[str]]] = [
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("What planet is known as the Red Planet?", ["Mars"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("How many continents are there on Earth?", ["seven", "7"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
    ("Who wrote the play Romeo and Juliet?", ["Shakespeare"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the closest star to the Earth?", ["Sun"]),
    ("What do bees make?", ["honey"]),
    ("What is the tallest animal in the world?", ["giraffe"]),
    ("What is the largest mammal?", ["blue whale", "whale"]),
    ("What color do you get by mixing blue and yellow?", ["green"]),
    ("What color do you get by mixing red and white?", ["pink"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many legs does an insect have?", ["six", "6"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("Which organ pumps blood through the human body?", ["heart"]),
    ("What is the main language spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the currency of the United Kingdom?", ["pound", "pounds", "pound sterling"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci", "Leonardo da Vinci"]),
    ("What is the longest river in Africa?", ["Nile"]),
    ("What is the boiling point of water in degrees Celsius at sea level?", ["100"]),
    ("How many hours are in a day?", ["24", "twenty four", "twenty-four"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of up?", ["down"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("What is the primary ingredient in guacamole?", ["avocado", "avocados"]),
    ("Which planet do we live on?", ["Earth"]),
    ("What is frozen water called?", ["ice"]),
    ("What is the largest desert in the world that is hot?", ["Sahara"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("How many sides does a hexagon have?", ["six", "6"]),
    ("What is the first letter of the English alphabet?", ["A"]),
    ("What season comes after winter?", ["spring"]),
    ("What is the name of the satellite that orbits the Earth?", ["Moon"]),
    ("Which animal says moo?", ["cow", "cows"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth", "moths"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What is the capital city of the United States?", ["Washington", "Washington DC", "Washington D C"]),
    ("Who was the first person to walk on the Moon?", ["Armstrong", "Neil Armstrong"]),
    ("What instrument has 88 keys?", ["piano"]),
    ("What is the largest country in the world by area?", ["Russia"]),
    ("Which gas do humans need to breathe to live?", ["oxygen"]),
    ("What is the color of a ripe banana?", ["yellow"]),
]

WORDS = ["banana", "river", "orange", "yes", "window", "purple", "mountain", "seven", "hello", "garden",
         "silver", "tiger", "coffee", "pencil", "ocean", "rocket", "candle", "forest", "guitar", "summer"]
UPPER = ["apple", "table", "music", "winter", "bridge", "cloud", "flower", "dragon", "pizza", "planet",
         "school", "horse", "lemon", "storm", "castle"]
SENTENCES = ["The cat sat on the mat.", "I like to read books.", "The sun is bright today.",
             "We went to the park.", "Birds can fly high.", "My dog loves to run.",
             "The train leaves at noon.", "She drinks tea every morning.", "Snow fell all night.",
             "The river flows to the sea.", "He plays the violin.", "Bread is baked in an oven.",
             "The door is painted blue.", "They walked home together.", "Stars shine at night."]
LISTS = ["colors", "animals", "fruits", "countries", "vegetables", "sports", "musical instruments",
         "vehicles", "flowers", "tools", "birds", "jobs", "drinks", "cities", "shapes"]
STARTERS = ["The", "My", "Today", "Yesterday", "Every", "Dogs", "Water", "Music", "People", "Sometimes",
            "Winter", "Books", "Children", "Coffee", "Rain"]
NAMES = ["Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Zoe", "Raj", "Emma"]
ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "coins", "cards"]
SYLLOGISMS = [
    ("All birds have feathers. A robin is a bird. Does a robin have feathers?", "yes"),
    ("All fish live in water. A salmon is a fish. Does a salmon live in water?", "yes"),
    ("No cats can bark. Tom is a cat. Can Tom bark?", "no"),
    ("All squares have four sides. This shape is a square. Does it have four sides?", "yes"),
    ("No reptiles have fur. A snake is a reptile. Does a snake have fur?", "no"),
    ("All metals conduct electricity. Copper is a metal. Does copper conduct electricity?", "yes"),
    ("Every student in the class passed. Ana is a student in the class. Did Ana pass?", "yes"),
    ("No vegetables are sweets. A carrot is a vegetable. Is a carrot a sweet?", "no"),
    ("If it rains, the ground gets wet. It is raining. Is the ground wet?", "yes"),
    ("All planets orbit a star. Mars is a planet. Does Mars orbit a star?", "yes"),
    ("No insects have eight legs. An ant is an insect. Does an ant have eight legs?", "no"),
    ("All roses are flowers. This plant is a rose. Is it a flower?", "yes"),
    ("If a number is even, it is divisible by 2. 14 is even. Is 14 divisible by 2?", "yes"),
    ("No birds are mammals. A parrot is a bird. Is a parrot a mammal?", "no"),
    ("All doctors went to school. Maria is a doctor. Did Maria go to school?", "yes"),
    ("Is 9 greater than 12?", "no"),
    ("Is 25 an odd number?", "yes"),
    ("Is 10 less than 3?", "no"),
    ("Is a week longer than a day?", "yes"),
    ("Is the number 4 larger than the number 40?", "no"),
]


def _item(kind: str, n: int, prompt: str, scorer: str, **extra: Any) -> dict[str, Any]:
    return {"id": f"{kind}-{n:03d}", "kind": kind, "prompt": prompt, "scorer": scorer, **extra}


def arithmetic(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for n in range(100):
        band = n // 20
        if band == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            q, r = f"What is {a} + {b}?", a + b
        elif band == 1:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, r = f"What is {a} + {b}?", a + b
        elif band == 2:
            a = rng.randint(10, 99)
            b = rng.randint(1, a)
            q, r = f"What is {a} - {b}?", a - b
        elif band == 3:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, r = f"What is {a} times {b}?", a * b
        else:
            b, r = rng.randint(2, 9), rng.randint(2, 12)
            q = f"What is {b * r} divided by {b}?"
        out.append(_item("arithmetic", n, q + JUST_NUMBER, "number", reference=r))
    return out


def facts() -> list[dict[str, Any]]:
    out = [_item("facts", n, f"What is the capital of {c}? Answer in a few words.", "contains", accept=[a])
           for n, (c, a) in enumerate(CAPITALS)]
    out += [_item("facts", len(CAPITALS) + n, q + " Answer in a few words.", "contains", accept=a)
            for n, (q, a) in enumerate(FACTS)]
    return out


def reasoning(rng: random.Random) -> list[dict[str, Any]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    for _ in range(20):
        a, b = rng.sample(range(10, 100), 2)
        w = rng.choice(["larger", "smaller"])
        r = max(a, b) if w == "larger" else min(a, b)
        out.append((f"Which number is {w}, {a} or {b}?" + JUST_NUMBER, "number", {"reference": r}))
    for _ in range(20):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + step * i for i in range(4)]
        out.append((f"What number comes next in the sequence {', '.join(map(str, seq))}?" + JUST_NUMBER,
                    "number", {"reference": start + step * 4}))
    for _ in range(20):
        name, thing = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 15), rng.randint(1, 9)
        if rng.random() < 0.5:
            text, r = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
        else:
            a = a + b
            text, r = f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", a - b
        out.append((text + JUST_NUMBER, "number", {"reference": r}))
    for syllogism, answer in SYLLOGISMS:
        out.append((syllogism + " Answer yes or no.", "yes_no", {"reference": answer}))
    return [_item("reasoning", n, q, s, **extra) for n, (q, s, extra) in enumerate(out)]


def instructions() -> list[dict[str, Any]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    out += [(f"Reply with only the word '{w}' and nothing else.", "exact_word", {"reference": w}) for w in WORDS]
    out += [(f"Write the word '{w}' in capital letters.", "uppercase", {"reference": w}) for w in UPPER]
    out += [(f"Repeat this sentence exactly: {s}", "repeat", {"reference": s}) for s in SENTENCES]
    out += [(f"List three {c}, separated by commas.", "comma_list", {"reference": 3}) for c in LISTS]
    out += [(f"Write one sentence that starts with the word '{w}'.", "starts_with", {"reference": w}) for w in STARTERS]
    return [_item("instructions", n, q, s, **extra) for n, (q, s, extra) in enumerate(out)]


def build() -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    return arithmetic(rng) + facts() + reasoning(rng) + instructions()


def main() -> None:
    items = build()
    with open(SUITE, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    print(f"wrote {len(items)} items to {SUITE}")


if __name__ == "__main__":
    main()
