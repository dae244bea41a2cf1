"""Per-key limits: token buckets for requests and output tokens, spend budgets that hold across a
kill -9, and the audit trail."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from datastore.log import AppendLog
from datastore.storage import open_storage
from router.core.config import AuthConfig
from router.core.errors import RateLimited
from router.policy.selection import Knobs
from router.serving.access import Access, AuditLog, SpendLedger, TokenBucket, period_bounds
from router.serving.keys import OPEN, KeyFile, Limits
from tests.crash import killed_after_acks


class Clock:
    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t


def _caller(tmp_path, **limits):
    keys = KeyFile(tmp_path / "keys.json")
    _, token = keys.create("app", tenant="team-a", limits=Limits(**limits))
    return keys.authenticate(token)


def test_token_bucket_refills_at_its_rate_and_carries_debt():
    b = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
    assert b.wait_s(1, 0.0) == 0
    b.take(1, 0.0)
    b.take(1, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(0.5)
    assert b.wait_s(1, 0.5) == 0
    b.take(5, 0.5)                         # a charge known afterwards drives it below zero
    assert b.wait_s(1, 0.5) == pytest.approx(2.5)
    assert b.wait_s(1, 100.0) == 0 and b.level == 2.0          # never above capacity


def test_the_request_rate_refuses_with_the_time_to_retry(tmp_path):
    clock = Clock()
    access = Access(AuthConfig(), clock=clock)
    caller = _caller(tmp_path, requests_per_s=2)
    access.admit(caller)
    access.admit(caller)                   # burst of max(1, rate)
    with pytest.raises(RateLimited, match="2 requests/s") as e:
        access.admit(caller)
    assert e.value.retry_after_s == pytest.approx(0.5)
    clock.t += 0.5
    access.admit(caller)
    access.admit(OPEN)                     # an open server's callers are never limited


def test_output_tokens_per_minute_count_what_generations_produced(tmp_path):
    clock = Clock()
    access = Access(AuthConfig(), clock=clock)
    caller = _caller(tmp_path, output_tokens_per_min=60)
    access.admit(caller, tokens=True)
    access.charge(caller, 0.0, output_tokens=90)    # 30 tokens over: 31 s until one is there
    with pytest.raises(RateLimited, match="60 output tokens/min") as e:
        access.admit(caller, tokens=True)
    assert e.value.retry_after_s == pytest.approx(31.0)
    access.admit(caller)                            # Route and Feedback are not token-limited
    clock.t += 31.0
    access.admit(caller, tokens=True)


def test_a_spent_budget_refuses_until_the_period_renews(tmp_path):
    clock = Clock(dt.datetime(2026, 12, 2, 18, 0, tzinfo=dt.UTC).timestamp())
    access = Access(AuthConfig(), SpendLedger(AppendLog.open(tmp_path / "spend.log")), clock=clock)
    caller = _caller(tmp_path, budget=1.0, budget_period="day")
    knobs = access.budgeted(caller, Knobs())
    assert knobs.budget_key == "team-a" and knobs.max_cost is None   # the tenant is the default budget key
    # A key names windows within its tenant only: it cannot spend into another tenant's.
    assert access.budgeted(caller, Knobs(budget_key="billing")).budget_key == "team-a/billing"
    access.charge(caller, 0.6)
    access.charge(caller, 0.5)
    assert access.budget_left(caller) == pytest.approx(-0.1)
    with pytest.raises(RateLimited, match="spent its budget of 1 per day") as e:
        access.budgeted(caller, Knobs())
    assert e.value.retry_after_s == pytest.approx(6 * 3600)         # midnight UTC
    clock.t += 6 * 3600
    assert access.budget_left(caller) == pytest.approx(1.0)


def test_running_requests_hold_their_worst_case_against_the_budget(tmp_path):
    access = Access(AuthConfig(), SpendLedger(AppendLog.open(tmp_path / "spend.log")), clock=Clock())
    caller = _caller(tmp_path, budget=1.0)
    held = access.hold(caller, 0.75)
    assert access.budget_left(caller) == pytest.approx(0.25)
    held2 = access.hold(caller, 0.5)
    with pytest.raises(RateLimited):                    # a third concurrent one finds nothing left
        access.budgeted(caller, Knobs())
    access.charge(caller, 0.1)
    access.release(caller, held)
    access.release(caller, held2)
    assert access.budget_left(caller) == pytest.approx(0.9)
    assert access.hold(OPEN, 5.0) == 0.0


def test_in_fit_mode_what_is_left_becomes_the_max_cost(tmp_path):
    access = Access(AuthConfig(over_budget="fit"), SpendLedger(AppendLog.open(tmp_path / "spend.log")), clock=Clock())
    caller = _caller(tmp_path, budget=1.0)
    access.charge(caller, 0.75)
    assert access.budgeted(caller, Knobs()).max_cost == pytest.approx(0.25)
    assert access.budgeted(caller, Knobs(max_cost=0.1)).max_cost == pytest.approx(0.1)


def test_periods_are_utc_days_and_months():
    t = dt.datetime(2026, 2, 28, 23, 59, tzinfo=dt.UTC).timestamp()
    assert period_bounds("day", t) == ("d2026-02-28", dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp())
    assert period_bounds("month", t) == ("m2026-02", dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp())
    t = dt.datetime(2026, 12, 31, 12, tzinfo=dt.UTC).timestamp()
    assert period_bounds("month", t)[1] == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()


def test_spend_survives_a_kill_9(tmp_path, db_url):
    """A child charges and reports each charge after it returned; killed with SIGKILL mid-stream,
    every charge it reported is in the reopened ledger (SQLite and PostgreSQL)."""
    acked = killed_after_acks(f"""
        from datastore.storage import open_storage
        from router.serving.access import SpendLedger
        led = SpendLedger(open_storage({db_url!r}).stream("spend"))
    """, 'led.charge("k1", "d2020-01-01", 0.25)', at=200)
    led = SpendLedger(open_storage(db_url).stream("spend"))
    assert led.spent("k1", "d2020-01-01") >= (acked + 1) * 0.25


def test_replicas_read_each_others_spend(tmp_path, db_url):
    a = SpendLedger(open_storage(db_url).stream("spend"), follow_s=0.0)
    b = SpendLedger(open_storage(db_url).stream("spend"), follow_s=0.0)
    a.charge("k", "d2026-12-02", 1.5)
    b.charge("k", "d2026-12-02", 0.5)
    assert a.spent("k", "d2026-12-02") == b.spent("k", "d2026-12-02") == 2.0


def test_a_failing_audit_file_is_logged_not_raised(tmp_path, caplog):
    audit = AuditLog(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl").mkdir()                      # cannot be appended to
    audit.write(_caller(tmp_path), "feedback", decision_id="d1")
    assert "cannot append" in caplog.text


def test_the_audit_trail_is_one_json_line_per_write(tmp_path):
    caller = _caller(tmp_path)
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.write(caller, "feedback", decision_id="d1", backend="b", score=1.0)
    audit.write(OPEN, "key.revoke", key_id="abc", name="x")
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["action"] for x in lines] == ["feedback", "key.revoke"]
    assert lines[0]["key"] == "app" and lines[0]["tenant"] == "team-a" and lines[0]["decision_id"] == "d1"
    assert lines[1]["key_id"] == "abc" and lines[0]["t"].endswith("+00:00")
