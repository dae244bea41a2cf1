"""RouterService with the real datastore, scripted backends, and either encoder (``any_encoder``)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from backends.base import Status, TextChunk
from datastore.store import FaissKnnDatastore
from router.core.config import AppConfig
from router.core.errors import BackendError, InvalidArgument, NoEligibleBackend, NotFound, Unavailable, UnknownBackend
from router.policy.selection import KnobsInput
from router.serving.service import GenEnd, GenParams, GenStart, Query, RouterService
from tests.fakes import OUTCOMES, ScriptedBackend, write_outcomes


@pytest.fixture
def make_service(tmp_path, any_encoder):
    def make(backends, **routing):
        src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
        ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=8, progress=False)
        cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000, **routing},
                                        "limits": {"max_prompt_chars": 2000, "max_messages": 4}})
        return RouterService(cfg, any_encoder, ds, {b.name: b for b in backends})
    return make


def run(agen):
    async def collect():
        return [ev async for ev in agen]
    return asyncio.run(collect())


def test_route_follows_neighbour_outcomes(make_service):
    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    assert svc.route(Query(prompt="What is 40 + 2?")).backend == "mathy"
    d = svc.route(Query(prompt="Write a poem about the stars."))
    assert d.backend == "wordy"
    assert [c.rank for c in d.selection.ranked] == [1, 2]
    assert d.timings.total_ms >= d.timings.embedding_ms > 0
    np.testing.assert_allclose(np.linalg.norm(d.embedding), 1.0, atol=1e-5)


def test_cost_weight_moves_the_decision(make_service):
    svc = make_service([ScriptedBackend("mathy", per_request=10.0), ScriptedBackend("wordy", per_request=0.1)])
    q = "What is 40 + 2?"
    assert svc.route(Query(prompt=q, knobs=KnobsInput(cost_weight=0.0))).backend == "mathy"
    assert svc.route(Query(prompt=q, knobs=KnobsInput(cost_weight=1.0))).backend == "wordy"


@pytest.mark.parametrize("query,err,part", [
    (Query(prompt=""), InvalidArgument, "prompt is empty"),
    (Query(prompt="   "), InvalidArgument, "prompt is empty"),
    (Query(prompt="x" * 2001), InvalidArgument, "prompt too long"),
    (Query(prompt="hi", messages=(("user", "hi"),)), InvalidArgument, "not both"),
    (Query(messages=(("robot", "hi"),)), InvalidArgument, "role must be one of"),
    (Query(messages=(("user", ""),)), InvalidArgument, "content is empty"),
    (Query(messages=(("assistant", "hello"),)), InvalidArgument, "at least one 'user'"),
    (Query(messages=(("user", "a"),) * 5), InvalidArgument, "too many messages"),
    (Query(prompt="hi", knobs=KnobsInput(allowed=("nope",))), UnknownBackend, "unknown backend"),
    (Query(prompt="hi", knobs=KnobsInput(cost_weight=-0.5)), InvalidArgument, "cost_weight"),
    (Query(prompt="hi", knobs=KnobsInput(min_quality=2)), InvalidArgument, "min_quality"),
    (Query(prompt="hi", knobs=KnobsInput(min_quality=1.0)), NoEligibleBackend, "no backend satisfies"),
])
def test_route_errors(make_service, query, err, part):
    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    with pytest.raises(err) as ei:
        svc.route(query)
    assert part in str(ei.value)


def test_generate_streams_start_text_end(make_service):
    svc = make_service([ScriptedBackend("mathy", ["4", "2"]), ScriptedBackend("wordy")])
    evs = run(svc.generate(Query(prompt="What is 40 + 2?"), GenParams()))
    assert isinstance(evs[0], GenStart) and evs[0].backend == "mathy" and not evs[0].fallbacks
    assert "".join(e.text for e in evs if isinstance(e, TextChunk)) == "42"
    assert isinstance(evs[-1], GenEnd) and evs[-1].finished.completion_tokens == 2


def test_fallback_before_first_token(make_service):
    bad = ScriptedBackend("mathy", fail_at=0)
    svc = make_service([bad, ScriptedBackend("wordy", ["ok"])])
    evs = run(svc.generate(Query(prompt="What is 40 + 2?"), GenParams()))
    assert evs[0].backend == "wordy" and evs[0].fallbacks[0][0] == "mathy"
    assert "injected failure" in evs[0].fallbacks[0][1] and bad.calls == 1


def test_failure_after_first_token_ends_the_stream_with_an_error(make_service):
    svc = make_service([ScriptedBackend("mathy", ["4", "2", "!"], fail_at=2), ScriptedBackend("wordy")])
    got = []

    async def consume():
        async for ev in svc.generate(Query(prompt="What is 40 + 2?"), GenParams()):
            got.append(ev)
    with pytest.raises(BackendError, match="after streaming began"):
        asyncio.run(consume())
    assert [e.text for e in got if isinstance(e, TextChunk)] == ["4", "2"]


def test_all_backends_failing_is_unavailable(make_service):
    svc = make_service([ScriptedBackend("mathy", fail_at=0), ScriptedBackend("wordy", fail_at=0)])
    with pytest.raises(Unavailable, match="every eligible backend failed"):
        run(svc.generate(Query(prompt="hi"), GenParams()))


def test_unavailable_backend_is_skipped_with_reason(make_service):
    svc = make_service([ScriptedBackend("mathy", status=Status.UNAVAILABLE), ScriptedBackend("wordy")])
    d = svc.route(Query(prompt="What is 40 + 2?"))
    assert d.backend == "wordy" and "unavailable" in d.selection.excluded[0].reason


@pytest.mark.parametrize("params,part", [
    (GenParams(max_tokens=0), "max_tokens"), (GenParams(max_tokens=10**6), "max_tokens"),
    (GenParams(temperature=-1), "temperature"), (GenParams(stop=("",)), "stop"),
])
def test_generation_param_errors(make_service, params, part):
    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    with pytest.raises(InvalidArgument, match=part):
        run(svc.generate(Query(prompt="hi"), params))


def test_feedback_by_decision_changes_later_routing(make_service):
    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    q = "Compose a limerick about a frog."
    d = svc.route(Query(prompt=q))
    assert d.backend == "wordy"
    for _ in range(6):
        svc.feedback(d.decision_id, 0.0)
        svc.feedback("", 1.0, backend="mathy", prompt=q)
    assert svc.route(Query(prompt=q)).backend == "mathy"


def test_a_prompts_own_feedback_is_pooled_into_its_next_estimate(make_service, any_encoder):
    """datastore.repeats: a prompt the store holds outcomes for is estimated from them (pooled
    with the neighbourhood's prediction as one more record), from the first Feedback on."""
    from router.prediction.predictor import Predictor

    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    q = "Compose a limerick about a frog."
    x = any_encoder.encode([q])
    svc.feedback("", 1.0, backend="mathy", prompt=q)
    pooled = svc.predict(x, [len(q)]).quality[0]
    svc.predictor = Predictor(svc.datastore, repeats=False)
    plain = svc.predict(x, [len(q)]).quality[0]
    np.testing.assert_allclose(pooled[0], (1.0 + plain[0]) / 2, atol=1e-6)    # mathy: its one record
    assert pooled[1] == plain[1]                                                # wordy: none recorded


@pytest.mark.parametrize("kwargs,err,part", [
    (dict(decision_id="nope", score=1.0), NotFound, "unknown decision_id"),
    (dict(decision_id="", score=1.0), InvalidArgument, "needs a decision_id"),
    (dict(decision_id="", score=1.5, backend="mathy", prompt="x"), InvalidArgument, "score must be in [0, 1]"),
    (dict(decision_id="", score=float("nan"), backend="mathy", prompt="x"), InvalidArgument, "score"),
    (dict(decision_id="", score=0.5, backend="ghost", prompt="x"), UnknownBackend, "unknown backend"),
    (dict(decision_id="", score=0.5, backend="mathy", prompt=""), InvalidArgument, "prompt is empty"),
    (dict(decision_id="", score=0.5, backend="mathy", prompt="x", cost=-1.0), InvalidArgument, "cost"),
])
def test_feedback_errors(make_service, kwargs, err, part):
    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    args = dict(kwargs)
    with pytest.raises(err) as ei:
        svc.feedback(args.pop("decision_id"), args.pop("score"), **args)
    assert part in str(ei.value)


def test_list_backends_reports_priors_and_costs(make_service):
    svc = make_service([ScriptedBackend("mathy", per_request=2.0), ScriptedBackend("wordy")])
    views = {v.name: v for v in svc.list_backends()}
    assert views["mathy"].outcomes == 24 and 0.4 < views["mathy"].prior_quality < 0.6
    assert views["mathy"].cost_model.predict(10) == 2.0 and views["wordy"].status == Status.READY


def test_capability_encoder_takes_the_datastore_as_input_so_feedback_still_moves_it(make_service):
    import torch

    from encoders.capability import CapabilityConfig, build_model
    from router.prediction.predictor import Capability

    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    model = build_model(384, 2, CapabilityConfig(dim=8, hidden=16, codes=2)).eval()
    with torch.no_grad():
        model.w.fill_(1.0)
    svc.predictor = svc.predictor.with_capability(Capability(model, ["mathy", "wordy"]))
    q = "Compose a limerick about a frog."
    before = svc.route(Query(prompt=q)).selection
    for _ in range(6):
        svc.feedback("", 1.0, backend="mathy", prompt=q)
    after = svc.route(Query(prompt=q)).selection
    qb = {s.backend: s.quality for s in before.ranked}
    qa = {s.backend: s.quality for s in after.ranked}
    assert qa["mathy"] > qb["mathy"] + 0.1


def test_route_batch_keeps_the_batch_budget_and_spends_it_where_it_pays(make_service):
    from router.core.errors import InvalidArgument

    svc = make_service([ScriptedBackend("mathy", per_request=10.0), ScriptedBackend("wordy", per_request=1.0)])
    items = [Query(prompt=f"What is {i} + {2 * i}?") for i in range(4)] + \
            [Query(prompt=f"Write a poem about {t}.") for t in ("dogs", "fog", "the sun", "salt")]
    free = svc.route_batch(items, KnobsInput(cost_weight=0.0))
    assert [d.backend for d in free.decisions] == ["mathy"] * 4 + ["wordy"] * 4 and free.cost_weight == 0.0
    budget = (2 * 10.0 + 6 * 1.0) / 8            # room for two prompts on the expensive backend
    b = svc.route_batch(items, KnobsInput(budget=budget))
    chosen = [d.backend for d in b.decisions]
    assert b.mean_cost <= budget + 1e-9 and chosen.count("mathy") == 2
    assert all(chosen[i] == "wordy" for i in range(4, 8))             # the expensive slots go to math prompts
    assert b.cost_weight > 0 and all(d.selection.cost_weight == b.cost_weight for d in b.decisions)
    # Each decision is remembered for Feedback.
    svc.feedback(b.decisions[0].decision_id, 1.0)
    with pytest.raises(InvalidArgument, match="below the cheapest"):
        svc.route_batch(items, KnobsInput(budget=0.5))
    with pytest.raises(InvalidArgument, match=r"items\[1\]: prompt is empty"):
        svc.route_batch([items[0], Query(prompt="")], KnobsInput())
    with pytest.raises(InvalidArgument, match="at least one item"):
        svc.route_batch([], KnobsInput())
    with pytest.raises(InvalidArgument, match="budget_per_request must be >= 0"):
        svc.route_batch(items, KnobsInput(budget=-1.0))


def test_a_cost_models_price_is_reported_and_compared_exactly(make_service):
    # 0.1 is not a float32: a price rounded on the way would exceed max_cost=0.1.
    svc = make_service([ScriptedBackend("mathy", per_request=0.1), ScriptedBackend("wordy", per_request=0.3)])
    for q in (Query(prompt="What is 1 + 2?", knobs=KnobsInput(max_cost=0.1)),):
        d = svc.route(q)
        assert d.backend == "mathy" and d.selection.chosen.cost == 0.1
        assert [e.backend for e in d.selection.excluded] == ["wordy"]
    b = svc.route_batch([Query(prompt="What is 1 + 2?")], KnobsInput(max_cost=0.1))
    assert b.decisions[0].selection.chosen.cost == 0.1


def test_route_batch_predicts_what_route_predicts_one_by_one(make_service):
    svc = make_service([ScriptedBackend("mathy", per_request=3.0), ScriptedBackend("wordy", per_request=1.0)])
    items = [Query(prompt="What is 8 + 13?"), Query(prompt="Write a poem about the fog."),
             Query(messages=(("user", "Write a poem."), ("assistant", "On which theme?"), ("user", "Numbers: 2 + 2")))]
    batch = svc.route_batch(items, KnobsInput(cost_weight=0.1))
    for q, b in zip(items, batch.decisions):
        one = svc.route(Query(prompt=q.prompt, messages=q.messages, knobs=KnobsInput(cost_weight=0.1)))
        assert [s.backend for s in one.selection.ranked] == [s.backend for s in b.selection.ranked]
        for x, y in zip(one.selection.ranked, b.selection.ranked):
            assert x.quality == pytest.approx(y.quality, abs=1e-6) and x.cost == pytest.approx(y.cost, rel=1e-6)
            assert x.support == pytest.approx(y.support, rel=1e-5, abs=1e-6)


def test_window_budget_spends_where_it_pays_and_keeps_the_average(make_service):
    svc = make_service([ScriptedBackend("mathy", per_request=10.0), ScriptedBackend("wordy", per_request=1.0)])
    topics = ["dogs", "fog", "the sun", "salt", "ice", "a lake", "a bell", "smoke", "glass", "wool"]
    traffic = [(p, kind) for i in range(10) for p, kind in ((f"What is {i} + {3 * i + 1}?", "math"),
                                                            (f"Write a poem about {topics[i]}.", "poem"))]
    picks = [(svc.route(Query(prompt=p, knobs=KnobsInput(budget=4.0, budget_key="mix"))).selection, kind)
             for p, kind in traffic]
    assert np.mean([s.chosen.cost for s, _ in picks]) <= 4.0
    assert all(s.chosen.backend == "wordy" for s, kind in picks if kind == "poem")
    assert any(s.chosen.backend == "mathy" for s, kind in picks if kind == "math") and max(s.cost_weight for s, _ in picks) > 0


@pytest.mark.slow  # MiniLM only: the word encoder gives these near-identical prompts tied predictions
def test_window_budget_on_route_reports_the_solved_lambda(tmp_path, encoder):
    src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
    ds = FaissKnnDatastore.open(tmp_path / "state", encoder, [src], k=8, progress=False)
    cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000}})
    svc = RouterService(cfg, encoder, ds, {b.name: b for b in (ScriptedBackend("mathy", per_request=10.0),
                                                                ScriptedBackend("wordy", per_request=1.0))})
    prompts = [f"What is {i} + {i + 5}?" for i in range(20)]
    picks = [svc.route(Query(prompt=p, knobs=KnobsInput(budget=4.0, budget_key="t1"))).selection for p in prompts]
    costs = [s.chosen.cost for s in picks]
    assert any(s.cost_weight > 0 for s in picks) and np.mean(costs[5:]) <= 4.0 + 1e-9
    # Another key has its own window; no budget leaves the default lambda.
    assert svc.route(Query(prompt=prompts[0], knobs=KnobsInput(budget=100.0, budget_key="t2"))).backend == "mathy"
    assert svc.route(Query(prompt=prompts[0])).selection.cost_weight == svc.defaults.cost_weight


def test_capability_with_a_broad_neighbourhood_asks_the_datastore_for_it(make_service):
    from encoders.capability import CapabilityConfig, build_model
    from router.prediction.predictor import Capability

    svc = make_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    cfg = CapabilityConfig(dim=8, hidden=16, codes=2, knn_scales=[[0, 0], [24, 1.0]])
    model = build_model(384, 2, cfg).eval()
    calls = []
    real = svc.datastore.estimate_many

    def spy(emb, scales, *, recorded=False):
        calls.append((list(scales), recorded))
        return real(emb, scales, recorded=recorded)

    svc.datastore.estimate_many = spy
    svc.predictor = svc.predictor.with_capability(Capability(model, ["mathy", "wordy"], config=cfg))
    d = svc.route(Query(prompt="What is 3 + 9?"))
    # One search: both scales, and the repeats' records (datastore.repeats, on by default).
    assert calls == [([(0.0, 0.0), (24.0, 1.0)], True)] and len(d.selection.ranked) == 2
    # The same numbers as asking for each neighbourhood on its own.
    e = svc.encoder.encode(["What is 3 + 9?"])[0]
    many = real(e[None], [(0, 0), (24, 1.0)])
    for got, k, t in zip(many, (None, 24), (None, 1.0)):
        one = svc.datastore.estimate(e[None], k=k, temperature=t)
        np.testing.assert_allclose(got.quality, one.quality, atol=1e-6)


# ---- API keys: provenance, audit, budgets charged with what answers cost ------------------------

@pytest.fixture
def keyed_service(tmp_path, any_encoder):
    import json as _json

    from datastore.log import AppendLog
    from router.serving.access import Access, AuditLog, SpendLedger
    from router.serving.keys import KeyFile, Limits

    def make(backends, *, weights=None, name="app", **limits):
        src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
        ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=8, progress=False)
        cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000},
                                        "auth": {"feedback_weights": weights or {}}})
        access = Access(cfg.auth, SpendLedger(AppendLog.open(tmp_path / "spend.log")), AuditLog(tmp_path / "audit.jsonl"))
        svc = RouterService(cfg, any_encoder, ds, {b.name: b for b in backends}, access=access)
        keys = KeyFile(tmp_path / "keys.json")
        _, token = keys.create(name, tenant="team", scopes=("admin",), limits=Limits(**limits) if limits else None)
        caller = keys.authenticate(token)

        def audit():
            p = tmp_path / "audit.jsonl"
            return [_json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
        return svc, caller, audit
    return make


def test_feedback_carries_its_key_and_is_audited(keyed_service, tmp_path):
    svc, caller, audit = keyed_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")])
    d = svc.route(Query(prompt="What is 40 + 2?", caller=caller))
    res = svc.feedback(d.decision_id, 1.0, caller=caller)
    logged = (tmp_path / "state" / "feedback.log").read_text()
    assert f'"key":"app","key_id":"{caller.key.id}"' in logged and res.record_id in logged
    (line,) = audit()
    assert line["action"] == "feedback" and line["key"] == "app" and line["decision_id"] == d.decision_id
    assert line["weight"] == 1.0 and "prompt" not in line             # prompts stay out unless configured
    assert svc.retract_feedback("app", caller=caller) == 1
    assert audit()[-1]["action"] == "feedback.retract" and audit()[-1]["records"] == 1


def test_feedback_from_an_ignored_key_is_acknowledged_but_not_learned(keyed_service):
    svc, caller, audit = keyed_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")], weights={"app": 0.0})
    n = len(svc.datastore)
    res = svc.feedback("", 0.0, prompt="What is 40 + 2?", backend="mathy", caller=caller)
    assert res.record_id == "" and len(svc.datastore) == n
    assert audit()[0]["weight"] == 0.0


def test_a_light_keys_feedback_moves_the_estimate_less(keyed_service, any_encoder):
    from router.prediction.predictor import Predictor

    moved, plain_moved = {}, {}
    for i, w in enumerate((1.0, 0.1)):
        svc, caller, _ = keyed_service([ScriptedBackend("mathy"), ScriptedBackend("wordy")], weights={f"app{i}": w},
                                       name=f"app{i}")
        q = "What is 40 + 2?"
        x = any_encoder.encode([q])
        plain = Predictor(svc.datastore, repeats=False)      # the neighbourhood alone

        def mathy(p, x=x):
            return p.predict(x, ["mathy"], np.zeros(1)).quality[0, 0]
        before, before_plain = svc.predict(x, [len(q)]).quality[0, 0], mathy(plain)
        for _ in range(4):
            svc.feedback("", 0.0, prompt=q, backend="mathy", caller=caller)
        after, after_plain = svc.predict(x, [len(q)]).quality[0, 0], mathy(plain)
        moved[w], plain_moved[w] = before - after, before_plain - after_plain
        # The served estimate pools the prompt's own records, each at its key's weight (datastore.repeats).
        rec = svc.datastore.recorded(x)
        m, r = rec.support[0, rec.column("mathy")], rec.quality[0, rec.column("mathy")]
        assert after == pytest.approx((m * r + after_plain) / (m + 1), abs=1e-6)
        svc.datastore.close()
        import shutil
        shutil.rmtree(svc.datastore.state_dir)
    assert 0 < plain_moved[0.1] < 0.6 * plain_moved[1.0]
    assert 0 < moved[0.1] < moved[1.0]


def test_generate_is_charged_its_realized_cost_and_a_spent_budget_refuses(keyed_service):
    from router.core.errors import RateLimited

    svc, caller, _ = keyed_service([ScriptedBackend("mathy", per_request=2.0), ScriptedBackend("wordy", per_request=2.0)],
                                   budget=3.0)
    evs = run(svc.generate(Query(prompt="What is 40 + 2?", caller=caller), GenParams(max_tokens=2)))
    assert isinstance(evs[-1], GenEnd)
    assert svc.access.budget_left(caller) == pytest.approx(1.0)
    svc.route(Query(prompt="What is 40 + 2?", caller=caller))        # a route is charged its predicted cost
    assert svc.access.budget_left(caller) == pytest.approx(-1.0)
    with pytest.raises(RateLimited, match="spent its budget"):
        run(svc.generate(Query(prompt="What is 40 + 2?", caller=caller), GenParams(max_tokens=2)))
    with pytest.raises(RateLimited):
        svc.route_batch([Query(prompt="hi")], KnobsInput(), caller=caller)


def test_in_fit_mode_an_over_budget_key_gets_what_it_can_still_pay_for(keyed_service, tmp_path):
    from router.core.errors import RateLimited

    svc, caller, _ = keyed_service([ScriptedBackend("mathy", per_request=2.0), ScriptedBackend("wordy", per_request=0.5)],
                                   budget=3.0)
    svc.config.auth.over_budget = "fit"
    q = Query(prompt="What is 40 + 2?", caller=caller)
    assert svc.route(q).backend == "mathy"                   # 3 left: the better one
    d = svc.route(q)                                          # 1 left: only the cheap one fits
    assert d.backend == "wordy" and [x.backend for x in d.selection.excluded] == ["mathy"]
    assert svc.route(q).backend == "wordy"                   # 0.5 left, then 0
    with pytest.raises(RateLimited, match="spent its budget"):
        svc.route(q)
    svc2, caller2, _ = keyed_service([ScriptedBackend("mathy", per_request=2.0)], budget=1.0, name="other")
    svc2.config.auth.over_budget = "fit"
    with pytest.raises(RateLimited, match="too little left"):
        svc2.route(Query(prompt="What is 40 + 2?", caller=caller2))


def test_a_cut_off_generation_is_charged_for_what_it_streamed(keyed_service):
    from router.serving.access import period_bounds

    svc, caller, _ = keyed_service([ScriptedBackend("mathy", words=("a", "b", "c", "d"), delay=0.01, per_request=2.0)],
                                   budget=100.0, output_tokens_per_min=60)

    async def go():
        agen = svc.generate(Query(prompt="What is 40 + 2?", caller=caller), GenParams(max_tokens=4))
        assert isinstance(await agen.__anext__(), GenStart)
        assert (await agen.__anext__()).text == "a"
        assert svc.access.budget_left(caller) == pytest.approx(98.0)       # its worst case is held meanwhile
        await agen.aclose()                                                # the caller goes away
        for _ in range(100):
            if not svc.access._held:
                break
            await asyncio.sleep(0.01)
    asyncio.run(go())
    period = period_bounds("day", __import__("time").time())[0]
    assert svc.access.ledger.spent(caller.key.id, period) == pytest.approx(2.0)
    assert not svc.access._held and svc.access._tokens[caller.key.id].level == pytest.approx(59.0, abs=0.5)


def test_in_fit_mode_a_batch_is_paid_from_what_is_left_as_a_whole(keyed_service):
    from router.core.errors import RateLimited

    svc, caller, _ = keyed_service([ScriptedBackend("mathy", per_request=2.0), ScriptedBackend("wordy", per_request=0.5)],
                                   budget=3.0)
    svc.config.auth.over_budget = "fit"
    prompts = [Query(prompt="What is 40 + 2?")] * 4
    b = svc.route_batch(prompts, KnobsInput(), caller=caller)
    assert sum(d.selection.chosen.cost for d in b.decisions) <= 3.0 + 1e-9      # not 4 x 2.0
    assert svc.access.budget_left(caller) >= -1e-9
    with pytest.raises(RateLimited, match="too little left"):
        svc.route_batch([Query(prompt="What is 40 + 2?")] * 8, KnobsInput(), caller=caller)
