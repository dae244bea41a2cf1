"""What a wheel of caprouter holds: every package of the source tree, and the data it reads."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found = set()
    for name, folder in SETUP["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "node_modules" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_is_listed_for_the_wheel():
    assert _packages_on_disk() == set(SETUP["packages"])


def test_the_data_files_serving_reads_are_package_data():
    patterns = SETUP["package-data"]["router"]
    for f in ("data/default.yaml", "data/aptitude_outcomes.jsonl", "data/aptitude_suite.jsonl",
              "data/default-router/manifest.json"):
        assert (ROOT / "router" / f).exists() and any(Path(f).match(p) for p in patterns), f
