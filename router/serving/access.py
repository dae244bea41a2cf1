"""What an API key may spend: request and output-token rates (token buckets), a spend budget per
day or month (a durable ledger), and the audit trail of every write a key makes.

Rates are per process: each replica holds its own buckets (a key limited to R requests/s may get
R from each replica). Spend is durable and shared: a charge returns only once it is committed to
the ``spend`` stream of the system of record (``datastore.storage``), so what a key spent survives
a kill -9 like an acknowledged Feedback does, and replicas on one database read each other's
charges.
"""
from __future__ import annotations

import calendar
import datetime as dt
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from datastore.storage import RecordLog
from router.core.config import AuthConfig
from router.core.errors import RateLimited
from router.policy.selection import Knobs
from router.serving.keys import ApiKey, Caller, Limits

log = logging.getLogger(__name__)
audit_log = logging.getLogger("caprouter.audit")


class TokenBucket:
    """``rate`` tokens a second up to ``capacity``. ``take`` may drive the level below zero (a
    charge known only afterwards, like a generation's output tokens): the debt is paid back by
    refilling before anything is admitted again."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = float(rate), float(capacity)
        self.level = self.capacity
        self.t = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_s(self, need: float, now: float) -> float:
        """Seconds until ``need`` tokens are there (0: now)."""
        self._refill(now)
        return max(0.0, (need - self.level) / self.rate)

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n


def period_bounds(period: str, now: float) -> tuple[str, float]:
    """(the period's name, when it ends as a unix time): UTC days ("d2026-12-02") and months
    ("m2026-12")."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "day":
        start = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
        return f"d{t:%Y-%m-%d}", (start + dt.timedelta(days=1)).timestamp()
    days = calendar.monthrange(t.year, t.month)[1]
    start = dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC)
    return f"m{t:%Y-%m}", (start + dt.timedelta(days=days)).timestamp()


class SpendLedger:
    """Spend per (key id, period), durable: each charge is one record of a RecordLog (the
    ``spend`` stream of the system of record, ``datastore.storage``; a file log in tests and
    tools). What other replicas charged into the same stream is read when a balance is asked for,
    at most every ``follow_s``."""

    def __init__(self, records: RecordLog, *, follow_s: float = 0.5) -> None:
        self._records = records
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], float] = defaultdict(float)
        self._add(records.replayed)
        self.follow_s = follow_s
        self._followed = time.monotonic()

    def _add(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self._spent[(r["key"], r["period"])] += float(r["cost"])

    def spent(self, key_id: str, period: str) -> float:
        now = time.monotonic()
        if now - self._followed >= self.follow_s:
            self._followed = now
            fresh = self._records.follow()
            with self._lock:
                self._add(fresh)
        with self._lock:
            return self._spent.get((key_id, period), 0.0)

    def charge(self, key_id: str, period: str, cost: float) -> None:
        """Durable when it returns."""
        self._records.append([{"key": key_id, "period": period, "cost": float(cost), "t": round(time.time(), 3)}])
        with self._lock:
            self._spent[(key_id, period)] += float(cost)

    def close(self) -> None:
        self._records.close()


class AuditLog:
    """One JSON line per write a caller makes (feedback, onboarding, retraction; the CLI adds key
    changes), to a file and to the ``caprouter.audit`` logger. Lines are appended with one
    ``write`` each (O_APPEND), so the server and the CLI can share the file; they are not
    fsync'ed: the write they record is durable in its own log."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()

    def write(self, caller: Caller, action: str, **fields: Any) -> None:
        """Best effort: the write it records is already durable and acknowledged, so a failing
        audit file (full disk, permissions) is logged, never turned into the request's error."""
        try:
            self._write(caller, action, **fields)
        except OSError as e:
            log.error("audit trail %s: cannot append (%s); the %s of key %s is not audited", self.path, e.strerror,
                      action, caller.key.id if caller.key else "-")

    def _write(self, caller: Caller, action: str, **fields: Any) -> None:
        line = {"t": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "action": action,
                "key_id": caller.key.id if caller.key else "", "key": caller.name, "tenant": caller.tenant,
                **fields}
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":"))
        audit_log.info(text)
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (text + "\n").encode("utf-8"))
            finally:
                os.close(fd)


class Access:
    """Admission by key (rates, budget) and the spend and audit records, for RouterService."""

    def __init__(self, config: AuthConfig, ledger: SpendLedger | Callable[[], SpendLedger] | None = None,
                 audit: AuditLog | None = None, clock: Any = time) -> None:
        """``ledger``: the spend ledger, or how to open it on first use (None: budgets are not
        enforced, for a service without a system of record)."""
        self.config = config
        self.audit = audit or AuditLog(None)
        self._clock = clock
        self._lock = threading.Lock()
        self._ledger: SpendLedger | None = ledger if isinstance(ledger, SpendLedger) else None
        self._open_ledger = None if isinstance(ledger, SpendLedger) else ledger
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._held: dict[str, float] = defaultdict(float)    # key id -> cost reserved by running requests

    def _bucket(self, table: dict[str, TokenBucket], key_id: str, rate: float, capacity: float,
                now: float) -> TokenBucket:
        b = table.get(key_id)
        if b is None or b.rate != rate or b.capacity != capacity:     # new key, or its limits changed
            b = table[key_id] = TokenBucket(rate, capacity, now)
        return b

    def _token_bucket(self, key: ApiKey, per_min: int, now: float) -> TokenBucket:
        """The key's bucket of output tokens: ``per_min`` a minute, a minute's worth at most."""
        return self._bucket(self._tokens, key.id, per_min / 60.0, per_min, now)

    def admit(self, caller: Caller, *, tokens: bool = False) -> None:
        """One request of ``caller``: RateLimited when its request rate or its output-token rate
        (``tokens``: a Generate) is used up."""
        key = caller.key
        if key is None:
            return
        lim = key.limits
        now = self._clock.monotonic()
        with self._lock:
            if lim.requests_per_s is not None:
                b = self._bucket(self._requests, key.id, lim.requests_per_s, max(1.0, lim.requests_per_s), now)
                wait = b.wait_s(1.0, now)
                if wait > 0:
                    raise RateLimited(f"API key {key.id} ({key.name}) is over its rate limit of "
                                      f"{lim.requests_per_s:g} requests/s; retry in {wait:.2f} s", retry_after_s=wait)
                b.take(1.0, now)
            if tokens and lim.output_tokens_per_min is not None:
                wait = self._token_bucket(key, lim.output_tokens_per_min, now).wait_s(1.0, now)
                if wait > 0:
                    raise RateLimited(f"API key {key.id} ({key.name}) is over its limit of "
                                      f"{lim.output_tokens_per_min} output tokens/min; retry in {wait:.1f} s",
                                      retry_after_s=wait)

    def budgeted(self, caller: Caller, knobs: Knobs) -> Knobs:
        """``knobs`` for a request of ``caller``: RateLimited when its spend budget is used up; the
        key's tenant as the default budget key; in "fit" mode, what is left of the budget as
        max_cost."""
        key = caller.key
        if key is None:
            return knobs
        # A key's traffic-budget windows are its tenant's: a caller cannot spend into (and steer)
        # another tenant's window by naming it.
        knobs = replace(knobs, budget_key=f"{key.tenant}/{knobs.budget_key}" if knobs.budget_key else key.tenant)
        left = self.budget_left(caller)
        if left is None:
            return knobs
        if left <= 0:
            raise self.over_budget(caller, "has spent its budget")
        if self.config.over_budget == "fit":
            knobs = replace(knobs, max_cost=left if knobs.max_cost is None else min(knobs.max_cost, left))
        return knobs

    def over_budget(self, caller: Caller, what: str) -> RateLimited:
        """The refusal of a key whose budget cannot pay for the request, until the period renews."""
        key = caller.key
        assert key is not None and key.limits.budget is not None
        lim = key.limits
        _, end = period_bounds(lim.budget_period, self._clock.time())
        wait = max(1.0, end - self._clock.time())
        return RateLimited(f"API key {key.id} ({key.name}) {what} of {lim.budget:g} per {lim.budget_period}; "
                           f"it renews in {wait / 3600:.1f} h", retry_after_s=wait)

    @property
    def ledger(self) -> SpendLedger | None:
        """The spend ledger, opened on first use (a server without budgeted keys never writes one)."""
        if self._ledger is None and self._open_ledger is not None:
            with self._lock:
                if self._ledger is None:
                    self._ledger = self._open_ledger()
        return self._ledger

    def budget_left(self, caller: Caller) -> float | None:
        lim: Limits = caller.limits
        if caller.key is None or lim.budget is None or self.ledger is None:
            return None
        period, _ = period_bounds(lim.budget_period, self._clock.time())
        with self._lock:
            held = self._held.get(caller.key.id, 0.0)
        return lim.budget - self.ledger.spent(caller.key.id, period) - held

    def hold(self, caller: Caller, amount: float) -> float:
        """Reserve ``amount`` of the caller's budget while a request runs (its worst case), so that
        concurrent requests cannot all start on the same remainder. Returns what was held (0
        without a budget); give it back with ``release`` once the real cost is charged."""
        if caller.key is None or caller.limits.budget is None or not math.isfinite(amount) or amount <= 0:
            return 0.0
        with self._lock:
            self._held[caller.key.id] += amount
        return amount

    def release(self, caller: Caller, amount: float) -> None:
        if caller.key is None or amount <= 0:
            return
        with self._lock:
            left = self._held[caller.key.id] - amount
            if left <= 1e-12:
                del self._held[caller.key.id]
            else:
                self._held[caller.key.id] = left

    def charges(self, caller: Caller) -> bool:
        """Whether ``charge`` records anything for this caller (it has a budget or a token limit)."""
        lim = caller.limits
        return caller.key is not None and (lim.budget is not None or lim.output_tokens_per_min is not None)

    def charge(self, caller: Caller, cost: float, output_tokens: int = 0) -> None:
        """What an answered request cost (blocking: the ledger's fsync, when the key has a budget)."""
        key = caller.key
        if key is None:
            return
        lim = key.limits
        if output_tokens and lim.output_tokens_per_min is not None:
            now = self._clock.monotonic()
            with self._lock:
                self._token_bucket(key, lim.output_tokens_per_min, now).take(output_tokens, now)
        if lim.budget is not None and self.ledger is not None and math.isfinite(cost) and cost > 0:
            period, _ = period_bounds(lim.budget_period, self._clock.time())
            self.ledger.charge(key.id, period, cost)

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
