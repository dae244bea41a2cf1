import json

import pytest

from router.offline.aptitude.runner import summarize
from router.offline.aptitude.scorers import SCORERS, score
from router.serving.registrations import load_suite, suite_path


@pytest.mark.parametrize("answer,item,expected", [
    ("12", {"scorer": "number", "reference": 12}, 1),
    ("The answer is 12.", {"scorer": "number", "reference": 12}, 1),
    ("7 + 5 = 12", {"scorer": "number", "reference": 12}, 1),
    ("13", {"scorer": "number", "reference": 12}, 0),
    ("twelve", {"scorer": "number", "reference": 12}, 1),
    ("1,024", {"scorer": "number", "reference": 1024}, 1),
    ("", {"scorer": "number", "reference": 1}, 0),
    ("The capital of France is Paris.", {"scorer": "contains", "accept": ["Paris"]}, 1),
    ("Parisian food", {"scorer": "contains", "accept": ["Paris"]}, 0),
    ("It is Washington, D.C.", {"scorer": "contains", "accept": ["Washington DC", "Washington"]}, 1),
    ("Yes, it does.", {"scorer": "yes_no", "reference": "yes"}, 1),
    ("No. Snakes have scales.", {"scorer": "yes_no", "reference": "yes"}, 0),
    ("'Banana'.", {"scorer": "exact_word", "reference": "banana"}, 1),
    ("Banana is a fruit.", {"scorer": "exact_word", "reference": "banana"}, 0),
    ("APPLE", {"scorer": "uppercase", "reference": "apple"}, 1),
    ("Apple", {"scorer": "uppercase", "reference": "apple"}, 0),
    ("the cat sat on the mat", {"scorer": "repeat", "reference": "The cat sat on the mat."}, 1),
    ("The cat sat.", {"scorer": "repeat", "reference": "The cat sat on the mat."}, 0),
    ("red, blue, green", {"scorer": "comma_list", "reference": 3}, 1),
    ("red, blue and green", {"scorer": "comma_list", "reference": 3}, 1),
    ("1. red\n2. blue\n3. green", {"scorer": "comma_list", "reference": 3}, 1),
    ("red, blue", {"scorer": "comma_list", "reference": 3}, 0),
    ("The dog barked.", {"scorer": "starts_with", "reference": "The"}, 1),
    ("A dog barked.", {"scorer": "starts_with", "reference": "The"}, 0),
])
def test_scorers(answer, item, expected):
    assert score(answer, item) == expected


def test_suite_is_several_hundred_items_of_four_kinds_with_known_scorers():
    items = load_suite(suite_path(None))
    assert len(items) >= 300
    kinds = {it["kind"] for it in items}
    assert kinds == {"arithmetic", "facts", "reasoning", "instructions"}
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert it["scorer"] in SCORERS and it["prompt"].strip()


def test_suite_file_is_what_the_generator_produces():
    from router.offline.aptitude.build_suite import build

    assert load_suite(suite_path(None)) == json.loads(json.dumps(build()))


def test_summarize():
    rows = [{"category": "a", "scores": {"x": 1.0, "y": 0.0}}, {"category": "b", "scores": {"x": 0.0, "y": 0.0}}]
    s = summarize(rows)
    assert s["x"] == {"a": 1.0, "b": 0.0, "all": 0.5} and s["y"]["all"] == 0.0
