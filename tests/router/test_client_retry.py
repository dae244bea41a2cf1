"""Which failures the client retries, and how long it waits (no server needed)."""
from __future__ import annotations

import grpc
import pytest

from router.client import Retry, _backoff


class Refused(grpc.RpcError):
    def __init__(self, code, trailers=()):
        self._code, self._trailers = code, trailers

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailers


def test_a_refusal_waits_at_least_the_servers_hint_and_other_errors_are_not_retried():
    delays = Retry(attempts=3, initial_s=0.2).delays()
    assert _backoff(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "1500"),)), delays) == 1.5
    assert 0.1 <= _backoff(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED), delays) <= 0.4     # no hint: the policy
    with pytest.raises(Refused):                                                           # attempts spent
        _backoff(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED), delays)
    with pytest.raises(Refused):
        _backoff(Refused(grpc.StatusCode.INVALID_ARGUMENT), Retry().delays())
    with pytest.raises(Refused):              # a stream that already yielded is never replayed
        _backoff(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED), Retry().delays(), started=True)
