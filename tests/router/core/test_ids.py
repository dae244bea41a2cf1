"""Decision ids: 128 random bits each, no two alike, from any thread."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from router.core.ids import RandomIds


def test_ids_are_32_hex_digits_and_never_repeat_across_threads_and_refills():
    ids = RandomIds()
    with ThreadPoolExecutor(8) as ex:
        got = [i for part in ex.map(lambda _: [ids.next_hex() for _ in range(500)], range(8)) for i in part]
    assert len(got) == 4000 > 256                      # many refills of the pool
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in got)
    assert len(set(got)) == len(got)
