"""The answer cache alone: exact and semantic hits, what must match, TTL, size bound, tenants."""
from __future__ import annotations

import time

import numpy as np

from router.core.config import CacheConfig
from router.serving.answer_cache import AnswerCache, CachedAnswer, params_of, request_key

P = params_of(16, 0.0, (), None, {})
A = CachedAnswer("Paris.", (), "stop", 9, 2)


def _unit(*v):
    x = np.array(v, np.float32)
    return x / np.linalg.norm(x)


def test_exact_and_semantic_hits_within_one_scope_only():
    c = AnswerCache(CacheConfig(enabled=True, semantic=True, semantic_threshold=0.95), dim=3)
    exact, scope = request_key("", "m1", [["user", "capital of France?"]], P)
    c.put(exact, scope, _unit(1, 0, 0), A)
    assert c.get(exact, scope, None, semantic=False).kind == "exact"
    near, _ = request_key("", "m1", [["user", "France's capital?"]], P)
    hit = c.get(near, scope, _unit(1, 0.1, 0), semantic=True)
    assert hit is not None and hit.kind == "semantic" and hit.answer == A and 0.99 < hit.similarity < 1
    assert c.get(near, scope, _unit(1, 0.5, 0), semantic=True) is None              # cosine 0.89 < 0.95
    assert c.get(near, scope, _unit(1, 0.1, 0), semantic=False) is None             # semantic not allowed
    for tenant, backend, params in (("key-2", "m1", P), ("", "m2", P), ("", "m1", params_of(17, 0.0, (), None, {}))):
        other_exact, other_scope = request_key(tenant, backend, [["user", "capital of France?"]], params)
        assert other_exact != exact and other_scope != scope
        assert c.get(other_exact, other_scope, _unit(1, 0, 0), semantic=True) is None   # never across scopes


def test_ttl_and_the_size_bound_evict_and_free_semantic_rows():
    c = AnswerCache(CacheConfig(enabled=True, semantic=True, max_entries=2, ttl_s=0.05), dim=2)
    keys = [request_key("", "m", [["user", str(i)]], P) for i in range(3)]
    for i, (k, s) in enumerate(keys):
        c.put(k, s, _unit(1, i), CachedAnswer(str(i), (), "stop", 1, 1))
    assert len(c) == 2 and c.get(*keys[0], None, semantic=False) is None             # least recently used out
    assert c.get(*keys[2], None, semantic=False).answer.text == "2"
    hit = c.get("unknown", keys[0][1], _unit(1, 2), semantic=True)
    assert hit is not None and hit.answer.text == "2"                                  # the evicted row is gone
    time.sleep(0.06)
    assert c.get(*keys[2], None, semantic=False) is None                               # expired
    assert c.get("unknown", keys[0][1], _unit(1, 2), semantic=True) is None


def test_what_is_cacheable_and_long_answers_are_not_kept():
    assert AnswerCache.cacheable(0.0, None) and AnswerCache.cacheable(0.7, 3) and not AnswerCache.cacheable(0.7, None)
    c = AnswerCache(CacheConfig(enabled=True, max_answer_chars=5), dim=2)
    k, s = request_key("", "m", [["user", "x"]], P)
    c.put(k, s, None, CachedAnswer("too long", (), "stop", 1, 2))
    assert len(c) == 0
