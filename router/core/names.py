"""What a backend may be called: one rule for the config, Onboard, training data and artifacts.

Published routing data names models by provider and variant (``meta/llama-3-70b-instruct``,
``Llama-3.1-405B-Inst@sambanova``, ``gpt-4-1106-preview``), so the rule admits ``/``, ``:``, ``@``
and ``+`` besides letters, digits and ``._-``. It leaves out what would break a log line, an HTTP
header or a URL path (spaces, quotes, control characters). ``caprouter train`` refuses a data
set whose names break the rule, so whatever it writes, ``caprouter serve --artifact`` loads.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

BACKEND_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
BACKEND_NAME_RULE = "1-128 characters of letters, digits and ._:/@+- starting with a letter or digit"

_NAME = re.compile(BACKEND_NAME)


def is_backend_name(name: str) -> bool:
    return bool(_NAME.match(name))


def invalid_backend_names(names: Iterable[str]) -> list[str]:
    """The names that break the rule, in their order."""
    return [n for n in names if not _NAME.match(n)]
