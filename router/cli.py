"""`caprouter`: serve, call (route / generate / feedback / backends), and build data.

    caprouter serve [--config FILE] [--host H] [--port P]
    caprouter route    --address HOST:PORT "prompt" [--cost-weight L] [--min-quality Q] [--max-cost C]
                       [--allow NAME ...] [--deny NAME ...] [--json]
    caprouter generate --address HOST:PORT "prompt" [knobs] [--max-tokens N] [--temperature T] [--stop S ...]
    caprouter feedback --address HOST:PORT --decision-id ID --score S [--backend NAME]
    caprouter backends --address HOST:PORT
    caprouter onboard  --address HOST:PORT NAME --results FILE [--cost-per-request X | --price-in X --price-out Y
                       | --active-parameters N] [--description TEXT]
    caprouter aptitude [--config FILE] [--out FILE] [--backends A,B] [--limit N]
    caprouter build-datastore [--config FILE]
    caprouter train --data FILE.jsonl[.gz] --out DIR [--costs FILE] [--seed N]
    caprouter eval --artifact DIR --data FILE [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence


def _config(args: argparse.Namespace):
    from router.config import load_config

    overrides = {"server.host": getattr(args, "host", None), "server.port": getattr(args, "port", None),
                 "server.http_port": getattr(args, "http_port", None),
                 "routing.cost_weight": getattr(args, "default_cost_weight", None),
                 "cache_dir": getattr(args, "cache_dir", None), "log_level": getattr(args, "log_level", None)}
    if getattr(args, "state_dir", None):
        overrides["datastore.state_dir"] = args.state_dir
    if getattr(args, "artifact_serve", None):
        overrides["artifact"] = args.artifact_serve
        if not args.config:
            # The artifact names the backends; the embedded default's local models are not among them.
            overrides["backends"] = []
    return load_config(args.config, overrides)


def _add_knobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="", help="the prompt (or use --messages)")
    p.add_argument("--messages", help="JSON file ('-' for stdin) with a list of {role, content}")
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of a running caprouter")
    p.add_argument("--cost-weight", type=float, help="lambda: quality given up per unit of cost")
    p.add_argument("--min-quality", type=float)
    p.add_argument("--max-cost", type=float)
    p.add_argument("--allow", nargs="*", default=[], help="only these backends")
    p.add_argument("--deny", nargs="*", default=[], help="never these backends")
    p.add_argument("--budget", type=float, help="average cost per request to keep to over the recent traffic "
                                                "(replaces --cost-weight)")
    p.add_argument("--budget-key", default="", help="which traffic the budget window is shared by")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    from caprouter.v1 import router_pb2 as pb

    msgs = []
    if args.messages:
        raw = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text()
        msgs = [pb.Message(role=m["role"], content=m["content"]) for m in json.loads(raw)]
    knobs = pb.RoutingKnobs(allowed_backends=args.allow, denied_backends=args.deny, budget_key=args.budget_key)
    for f, v in (("cost_weight", args.cost_weight), ("min_quality", args.min_quality), ("max_cost", args.max_cost),
                 ("budget_per_request", args.budget)):
        if v is not None:
            setattr(knobs, f, v)
    return {"prompt": args.prompt, "messages": msgs, "knobs": knobs}


def _stub(address: str):
    import grpc

    from caprouter.v1 import router_pb2_grpc as pb_grpc

    return pb_grpc.RouterStub(grpc.insecure_channel(address))


def _print_decision(backend: str, decision_id: str, candidates, excluded, timings, unit: str) -> None:
    print(f"backend: {backend}   decision: {decision_id}")
    print(f"{'rank':>4}  {'backend':<28} {'quality':>8} {'cost (' + unit + ')':>14} {'utility':>9} {'support':>8}")
    for c in candidates:
        print(f"{c.rank:>4}  {c.backend:<28} {c.predicted_quality:>8.3f} {c.predicted_cost:>14.4g} "
              f"{c.utility:>9.4f} {c.support:>8.2f}")
    for e in excluded:
        print(f"   -  {e.backend:<28} excluded: {e.reason}")
    print(f"timings: embedding {timings.embedding_ms:.2f} ms, prediction {timings.prediction_ms:.2f} ms, "
          f"total {timings.total_ms:.2f} ms")


def _rpc_error(e) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 2


def cmd_route(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from caprouter.v1 import router_pb2 as pb

    try:
        resp = _stub(args.address).Route(pb.RouteRequest(**_request_fields(args)), timeout=args.timeout)
    except grpc.RpcError as e:
        return _rpc_error(e)
    if args.json:
        print(MessageToJson(resp))
    else:
        _print_decision(resp.backend, resp.decision_id, resp.candidates, resp.excluded, resp.timings, resp.cost_unit)
        print(f"cost_weight (lambda): {resp.cost_weight:g}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from caprouter.v1 import router_pb2 as pb

    params = pb.GenerationParams(stop=args.stop)
    if args.max_tokens is not None:
        params.max_tokens = args.max_tokens
    if args.temperature is not None:
        params.temperature = args.temperature
    req = pb.GenerateRequest(params=params, **_request_fields(args))
    try:
        for chunk in _stub(args.address).Generate(req, timeout=args.timeout):
            if chunk.HasField("start"):
                s = chunk.start
                for fb in s.fallbacks:
                    print(f"[fallback] {fb.backend}: {fb.error}", file=sys.stderr)
                _print_decision(s.backend, s.decision_id, s.candidates, s.excluded, s.timings, s.cost_unit)
                print("---")
            if chunk.text:
                print(chunk.text, end="", flush=True)
            if chunk.HasField("end"):
                e = chunk.end
                print("\n---")
                print(f"finish: {pb.FinishReason.Name(e.finish_reason)}  backend: {e.backend}  "
                      f"tokens: {e.usage.prompt_tokens} prompt + {e.usage.completion_tokens} completion  "
                      f"latency: {e.latency_ms:.0f} ms  first token: {e.time_to_first_token_ms:.0f} ms  "
                      f"{e.tokens_per_second:.1f} tokens/s")
    except grpc.RpcError as e:
        print()
        return _rpc_error(e)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    import grpc

    from caprouter.v1 import router_pb2 as pb

    req = pb.FeedbackRequest(decision_id=args.decision_id or "", prompt=args.prompt or "", backend=args.backend or "",
                             score=args.score)
    try:
        resp = _stub(args.address).Feedback(req, timeout=args.timeout)
    except grpc.RpcError as e:
        return _rpc_error(e)
    print(f"recorded {resp.record_id} for backend {resp.backend}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    import grpc

    from caprouter.v1 import router_pb2 as pb

    try:
        resp = _stub(args.address).ListBackends(pb.ListBackendsRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        return _rpc_error(e)
    for b in resp.backends:
        print(f"{b.name:<28} {b.kind:<14} {pb.BackendStatus.Name(b.status):<28} prior {b.prior_quality:.3f} "
              f"({b.outcomes} outcomes)  cost: {b.cost_model.summary}")
        if b.description:
            print(f"{'':<28} {b.description}")
    return 0


def read_aptitude_results(path: str, backend: str) -> list[Any]:
    """Aptitude results from JSONL (.gz): rows {"item_id" | "prompt", "score", "cost"?}, or outcome
    rows in the datastore schema ({"prompt", "scores": {backend: score}, "cost"?: {...}}), of which
    the named backend's scores are taken (what `caprouter aptitude --out` writes)."""
    import gzip

    from caprouter.v1 import router_pb2 as pb
    from router.errors import InvalidArgument

    opener = gzip.open if path.endswith(".gz") else open
    out = []
    try:
        with opener(path, "rt") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "scores" in row:
                    if backend not in row["scores"]:
                        continue
                    r = pb.AptitudeResult(prompt=row["prompt"], score=float(row["scores"][backend]))
                    c = (row.get("cost") or {}).get(backend)
                else:
                    r = pb.AptitudeResult(item_id=str(row.get("item_id") or row.get("id") or ""),
                                          prompt=row.get("prompt", "") if not (row.get("item_id") or row.get("id")) else "",
                                          score=float(row["score"]))
                    c = row.get("cost")
                if c is not None:
                    r.cost = float(c)
                out.append(r)
    except FileNotFoundError:
        raise InvalidArgument(f"results file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{path}: line {n}: not an aptitude result ({type(e).__name__}: {e})") from None
    return out


def cmd_onboard(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from caprouter.v1 import router_pb2 as pb

    results = read_aptitude_results(args.results, args.name)
    if args.active_parameters:
        cm = pb.CostModel(kind="compute", active_parameters=args.active_parameters)
    elif args.price_in is not None or args.price_out is not None:
        cm = pb.CostModel(kind="per_token", input_per_million_tokens=args.price_in or 0.0,
                          output_per_million_tokens=args.price_out or 0.0)
    else:
        cm = pb.CostModel(kind="per_request", per_request=args.cost_per_request or 0.0)
    if args.expected_output_tokens:
        cm.expected_output_tokens = args.expected_output_tokens
    req = pb.OnboardRequest(backend=args.name, description=args.description or "", cost_model=cm, results=results)
    try:
        resp = _stub(args.address).Onboard(req, timeout=args.timeout)
    except grpc.RpcError as e:
        return _rpc_error(e)
    if args.json:
        print(MessageToJson(resp))
        return 0
    b = resp.backend
    print(f"{'registered' if resp.created else 'updated'} {b.name} ({b.kind}) from {resp.results_used} aptitude "
          f"results, mean score {resp.mean_score:.3f}; cost: {b.cost_model.summary}; capability vector "
          f"{'fitted' if resp.capability_fitted else 'not used (datastore only)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from router.app import build_app
    from router.grpc_server import serve
    from router.logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.log_level, args.log_format)
    if args.ray or args.ray_address:
        return _serve_ray(cfg, args)
    asyncio.run(serve(build_app(cfg), ready_file=args.ready_file, progress=sys.stderr.isatty()))
    return 0


def _serve_ray(cfg, args: argparse.Namespace) -> int:
    """Ray mode: the same service, its backends as Ray Serve deployments (backends/ray_serve.py)."""
    import signal
    import threading

    from backends.ray_serve import RayServing

    if args.ray_address:
        cfg.ray.address = args.ray_address
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serving = RayServing(cfg)
    try:
        if args.ready_file:
            Path(args.ready_file).write_text(serving.address)
        where = cfg.ray.address or "a local Ray instance"
        print(f"caprouter serving on {serving.address} (Ray Serve on {where})", flush=True)
        stop.wait()
    finally:
        serving.close()
    return 0


def cmd_aptitude(args: argparse.Namespace) -> int:
    from router.aptitude.cli_run import run
    from router.config import builtin_data
    from router.logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    out = Path(args.out) if args.out else builtin_data("aptitude_outcomes.jsonl")
    run(cfg, out, only=args.backends.split(",") if args.backends else None, limit=args.limit)
    print(f"wrote {out}")
    return 0


def cmd_codes(args: argparse.Namespace) -> int:
    from backends.codes import CodeSpec, build_codes
    from backends.weights import resolve_weights
    from router.app import build_encoder
    from router.errors import ConfigError
    from router.logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    keeps = [float(x) for x in args.keep.split(",")]
    shares = [float(x) for x in args.shares.split(",")] if args.shares else [1.0 / len(keeps)] * len(keeps)
    if len(shares) != len(keeps) or not all(0 < k <= 1 for k in keeps) or min(shares) <= 0:
        raise ConfigError("--keep takes shares in (0, 1]; --shares one positive share per code")
    specs = [CodeSpec(f"mlp{round(k * 100)}-{chr(ord('a') + i)}", k, s) for i, (k, s) in enumerate(zip(keeps, shares))]
    m = build_codes(resolve_weights(args.model, cfg.models_dir()), Path(args.out), specs,
                    encoder=build_encoder(cfg), rounds=args.rounds, seed=args.seed, tailoring=args.tailoring,
                    answer_tokens=args.answer_tokens, max_prompts=args.max_prompts, cache=cfg.models_dir(),
                    progress=sys.stderr.isatty())
    ev = m["evaluation"]
    for c in m["codes"]:
        e = ev[c["name"]]
        print(f"{c['name']}: {c['intermediate_size']} MLP neurons, {e['prompts']} held-out prompts "
              f"({', '.join(f'{k} {n}' for k, n in e['categories'])}); answer NLL tailored {e['tailored_nll']} "
              f"vs static {e['static_nll']}")
    print(f"routed mix at {ev['mix']['avg_mlp_keep']:.2f} of the MLP: NLL {ev['mix']['routed_nll']:.3f} vs one static "
          f"mask of that size {ev['mix']['static_same_average_nll']:.3f} (dense {ev['dense_nll']:.3f})")
    print(f"wrote {args.out}; serve a code with kind: transformers, options: {{model: {args.out}/<code>}}")
    return 0


def cmd_build_datastore(args: argparse.Namespace) -> int:
    from router.app import build_encoder, open_datastore, state_dir
    from router.logs import setup_logging

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    encoder = build_encoder(cfg)
    artifact = None
    if cfg.artifact:
        from router import artifact as art

        artifact = art.load(Path(cfg.artifact), embedder_id=encoder.model_id, dim=encoder.dim)
    store = open_datastore(cfg, encoder, progress=True, artifact=artifact)
    print(f"datastore at {state_dir(cfg)}: {len(store)} outcomes")
    for name, s in store.stats().items():
        print(f"  {name:<28} {s.outcomes:>7} outcomes, mean score {s.mean_score:.3f}")
    store.close()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from router.logs import setup_logging
    from router.training import train_command

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    m = train_command(cfg, args.data, args.out, costs=args.costs, seed=args.seed, max_epochs=args.epochs,
                      test_share=args.test_share, progress=sys.stderr.isatty())
    w = {b: sum(v) for b, v in m["knn_weights"].items()}
    print(f"wrote artifact {args.out}: {len(m['backends'])} backends, best epoch {m['metrics']['best_epoch']}, "
          f"datastore weight {min(w.values()):.2f}..{max(w.values()):.2f}")
    test = m["metrics"].get("test")
    if test:
        zero = m["metrics"]["test_zero_router"]
        print(f"test AIQ {test['aiq']:.3f} (zero router {zero['aiq']:.3f}); quality at the best single model's "
              f"cost {test['q_at_best_cost']:.3f}; its quality reached at {test['cost_share_for_best_quality']:.0%} "
              "of its cost")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from router.logs import setup_logging
    from router.training import eval_command

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    report = eval_command(cfg, args.artifact, args.data, json_out=args.json, costs=args.costs)
    print(report["markdown"])
    print("wrote " + ", ".join(report["files"]))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caprouter", description="LLM router and model-selection service")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: the embedded default)")
        sp.add_argument("--cache-dir", help="where converted and pruned weights are cached")
        sp.add_argument("--state-dir", help="datastore state folder (snapshot + feedback log)")
        sp.add_argument("--log-level")

    s = sub.add_parser("serve", help="run the gRPC server")
    with_config(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--default-cost-weight", type=float, help="default lambda for requests that set none")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    s.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on this port (0: any free)")
    s.add_argument("--ready-file", help="write the bound address here once serving")
    s.add_argument("--ray", action="store_true", help="dispatch through Ray Serve, starting a local Ray instance")
    s.add_argument("--ray-address", help="dispatch through Ray Serve on this cluster (e.g. auto, ray://head:10001)")
    s.add_argument("--artifact", dest="artifact_serve",
                   help="a trained router (caprouter train); its unconfigured backends are served route-only")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("route", help="ask a running server for a decision")
    _add_knobs(r)
    r.set_defaults(fn=cmd_route)

    g = sub.add_parser("generate", help="route and stream the answer")
    _add_knobs(g)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--stop", nargs="*", default=[])
    g.set_defaults(fn=cmd_generate)

    f = sub.add_parser("feedback", help="report an observed score")
    f.add_argument("--address", default="127.0.0.1:50051")
    f.add_argument("--decision-id")
    f.add_argument("--prompt")
    f.add_argument("--backend")
    f.add_argument("--score", type=float, required=True)
    f.add_argument("--timeout", type=float, default=30.0)
    f.set_defaults(fn=cmd_feedback)

    b = sub.add_parser("backends", help="list a server's backends")
    b.add_argument("--address", default="127.0.0.1:50051")
    b.add_argument("--timeout", type=float, default=30.0)
    b.set_defaults(fn=cmd_backends)

    o = sub.add_parser("onboard", help="register (or update) a backend on a running server from its aptitude results")
    o.add_argument("name", help="the backend's name")
    o.add_argument("--results", required=True,
                   help="JSONL (.gz) of {item_id | prompt, score, cost?}, or outcome rows with scores[NAME]")
    o.add_argument("--address", default="127.0.0.1:50051")
    o.add_argument("--description")
    o.add_argument("--cost-per-request", type=float, help="flat cost per request (server's cost unit)")
    o.add_argument("--price-in", type=float, help="per million input tokens")
    o.add_argument("--price-out", type=float, help="per million output tokens")
    o.add_argument("--active-parameters", type=int, help="cost by compute: active parameters")
    o.add_argument("--expected-output-tokens", type=int)
    o.add_argument("--timeout", type=float, default=120.0)
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_onboard)

    a = sub.add_parser("aptitude", help="run the backends on the aptitude suite and write outcomes")
    with_config(a)
    a.add_argument("--out", help="outcomes file (default: the bundled one)")
    a.add_argument("--backends", help="comma-separated subset of the configured backends")
    a.add_argument("--limit", type=int, help="first N items only")
    a.set_defaults(fn=cmd_aptitude)

    t = sub.add_parser("train", help="train a router artifact from an outcomes file")
    with_config(t)
    t.add_argument("--data", required=True, help="outcomes JSONL (.gz) in the datastore schema")
    t.add_argument("--out", required=True, help="artifact folder to write")
    t.add_argument("--costs", help="JSON backend -> cost per request, for backends the data gives no cost")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, help="maximum epochs (early stopping decides before)")
    t.add_argument("--test-share", type=float, default=0.2,
                   help="share held out for the test report when the data has no split of its own (0: none)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate an artifact: markdown + JSON report and a cost-quality PNG")
    with_config(e)
    e.add_argument("--artifact", required=True)
    e.add_argument("--data", required=True, help="outcomes file; its test split if it has one, else all rows")
    e.add_argument("--json", help="report path (default: ARTIFACT/eval.json; .md and .png beside it)")
    e.add_argument("--costs")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("codes", help="build prompt-tailored architecture codes (joint OT assignment and pruning)")
    with_config(c)
    c.add_argument("--out", required=True, help="folder to write (one HF folder per code and codes.json)")
    c.add_argument("--model", default="smollm2-135m-instruct", help="weight source name or HF folder")
    c.add_argument("--keep", default="0.9,0.75,0.6", help="share of MLP neurons each code keeps")
    c.add_argument("--shares", help="traffic share of each code (the OT marginals; default: equal)")
    c.add_argument("--rounds", type=int, default=3, help="assignment / pruning rounds")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tailoring", type=float, default=0.5,
                   help="weight of a code's own prompts in its importance (1: only them; 0: one static mask)")
    c.add_argument("--answer-tokens", type=int, default=48, help="length of the dense answers the codes are scored on")
    c.add_argument("--max-prompts", type=int, help="use about this many calibration prompts (quick builds)")
    c.set_defaults(fn=cmd_codes)

    d = sub.add_parser("build-datastore", help="build the datastore snapshot from the configured outcomes")
    with_config(d)
    d.set_defaults(fn=cmd_build_datastore)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    from router.errors import CaprouterError

    try:
        return int(args.fn(args) or 0)
    except CaprouterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
