"""`caprouter`: serve, call a running server (through ``router.client``), and build data offline.

    caprouter serve [--config FILE] [--host H] [--port P]
    caprouter route    --address HOST:PORT "prompt" [--cost-weight L] [--min-quality Q] [--max-cost C]
                       [--allow NAME ...] [--deny NAME ...] [--json]
    caprouter route-batch --address HOST:PORT FILE [knobs] [--budget B] [--json]
    caprouter generate --address HOST:PORT "prompt" [knobs] [--max-tokens N] [--temperature T] [--stop S ...]
    caprouter feedback --address HOST:PORT (--decision-id ID | --prompt P --backend NAME) --score S [--cost C]
    caprouter backends --address HOST:PORT
    caprouter onboard  --address HOST:PORT NAME --results FILE [--cost-per-request X | --price-in X --price-out Y
                       | --active-parameters N] [--description TEXT]
    caprouter keys create NAME [--tenant T] [--scopes route,generate,...] [--rps R] [--tokens-per-min N]
                       [--budget B --period day|month]  |  keys list  |  keys revoke ID|NAME
    caprouter datastore retract --key NAME [--since T] --address HOST:PORT   (an admin key)
    caprouter aptitude [--config FILE] [--out FILE] [--backends A,B] [--limit N]
    caprouter build-datastore [--config FILE]
    caprouter train --data FILE.jsonl[.gz] --out DIR [--costs FILE] [--seed N]
    caprouter eval --artifact DIR --data FILE [--json OUT]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml

from router.client import AptitudeResult, Client, CostModel, Decision, Retry, Tls
from router.core.config import AppConfig, builtin_data, load_config
from router.core.errors import CaprouterError, ConfigError, InvalidArgument
from router.core.logs import setup_logging

# The commands' own machinery (servers, models, training) is imported inside each command, so
# that `caprouter route` does not pay for loading torch and the servers it never uses.


def _config(args: argparse.Namespace) -> AppConfig:
    overrides = {"server.host": getattr(args, "host", None), "server.port": getattr(args, "port", None),
                 "server.http_port": getattr(args, "http_port", None),
                 "routing.cost_weight": getattr(args, "default_cost_weight", None),
                 "cache_dir": getattr(args, "cache_dir", None), "log_level": getattr(args, "log_level", None),
                 "server.tls_cert": getattr(args, "tls_cert_serve", None),
                 "server.tls_key": getattr(args, "tls_key_serve", None),
                 "server.tls_client_ca": getattr(args, "tls_client_ca", None),
                 "auth.keys_file": getattr(args, "keys_file", None)}
    if getattr(args, "state_dir", None):
        overrides["datastore.state_dir"] = args.state_dir
    if getattr(args, "artifact_serve", None):
        overrides["artifact"] = args.artifact_serve
        if not args.config:
            # The artifact names the backends; the embedded default's local models are not among them.
            overrides["backends"] = []
    for item in getattr(args, "set", None) or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set takes KEY=VALUE (a dotted key, a YAML value), got {item!r}")
        try:
            overrides[key] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {e}") from None
    return load_config(args.config, overrides)


def _add_knobs(p: argparse.ArgumentParser, *, prompt: bool = True) -> None:
    if prompt:
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
    p.add_argument("--max-queue-ms", type=float, help="skip a backend whose queue would hold the request longer")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    _add_connection(p)


def _add_connection(p: argparse.ArgumentParser) -> None:
    """How a client command reaches a server: TLS and the API key (read from a file or the
    environment, never from the command line, where every user of the machine could read it)."""
    p.add_argument("--api-key-file", help="file holding the API key (default: $CAPROUTER_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, verifying against the system's roots")
    p.add_argument("--tls-ca", help="connect with TLS, verifying the server against this CA (PEM)")
    p.add_argument("--tls-cert", help="client certificate (PEM), for a server that requires one")
    p.add_argument("--tls-key", help="the client certificate's private key (PEM)")
    p.add_argument("--tls-server-name", help="the name the server's certificate must carry (default: the host)")


def _client(args: argparse.Namespace) -> Client:
    key = os.environ.get("CAPROUTER_API_KEY") or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip() or None
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    # One attempt, as a shell tool makes: the caller (a person, a script) decides whether to retry.
    return Client(args.address, timeout=args.timeout, retry=Retry(attempts=1), api_key=key, tls=tls)


def _read_messages(path: str | None) -> list[tuple[str, str]] | None:
    if not path:
        return None
    raw = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        return _pairs(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"--messages {path}: not a JSON list of {{role, content}} ({type(e).__name__}: {e})") \
            from None


def _pairs(messages: Any) -> list[tuple[str, str]]:
    """A JSON list of {role, content} as (role, content) pairs (KeyError / TypeError when not)."""
    return [(m["role"], m["content"]) for m in messages]


def _knob_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"cost_weight": args.cost_weight, "min_quality": args.min_quality, "max_cost": args.max_cost,
            "allowed": args.allow, "denied": args.deny, "budget_per_request": args.budget,
            "budget_key": args.budget_key, "max_queue_ms": args.max_queue_ms}


def _query(args: argparse.Namespace) -> dict[str, Any]:
    msgs = _read_messages(args.messages)
    if not msgs:                    # no file, or an empty list: the prompt alone
        return {"prompt": args.prompt}
    if args.prompt:
        raise InvalidArgument("set either prompt or messages, not both")
    return {"messages": msgs}


def _print_json(message: Any) -> None:
    """A response as the wire sent it (protobuf's JSON mapping)."""
    from google.protobuf.json_format import MessageToJson

    print(MessageToJson(message))


def _print_decision(d: Decision) -> None:
    print(f"backend: {d.backend}   decision: {d.decision_id}")
    print(f"{'rank':>4}  {'backend':<28} {'quality':>8} {'cost (' + d.cost_unit + ')':>14} {'utility':>9} {'support':>8}")
    for c in d.candidates:
        print(f"{c.rank:>4}  {c.backend:<28} {c.predicted_quality:>8.3f} {c.predicted_cost:>14.4g} "
              f"{c.utility:>9.4f} {c.support:>8.2f}")
    for b, reason in d.excluded.items():
        print(f"   -  {b:<28} excluded: {reason}")
    t = d.timings
    print(f"timings: embedding {t.embedding_ms:.2f} ms, prediction {t.prediction_ms:.2f} ms, "
          f"total {t.total_ms:.2f} ms")


def _rpc_error(e: grpc.RpcError) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 2


def cmd_route(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            d = c.route(**_query(args), **_knob_args(args))
        except grpc.RpcError as e:
            return _rpc_error(e)
    if args.json:
        _print_json(d.response)
    else:
        _print_decision(d)
        print(f"cost_weight (lambda): {d.cost_weight:g}")
    return 0


def _batch_items(path: str) -> list[str | list[tuple[str, str]]]:
    """One prompt a line, or JSONL of {"prompt": ...} / {"messages": [{role, content}, ...]}."""
    raw = sys.stdin.read() if path == "-" else Path(path).read_text()
    items: list[str | list[tuple[str, str]]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            items.append(line)
            continue
        try:
            row = json.loads(line)
            items.append(_pairs(row["messages"]) if "messages" in row else row["prompt"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"{path}: line {n}: not a prompt or a messages list ({type(e).__name__}: {e})") from None
    return items


def cmd_route_batch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            b = c.route_batch(_batch_items(args.file), **_knob_args(args))
        except grpc.RpcError as e:
            return _rpc_error(e)
    if args.json:
        _print_json(b.response)
        return 0
    for i, d in enumerate(b.decisions):
        top = d.candidates[0]
        print(f"{i:>5}  {d.backend:<28} quality {top.predicted_quality:.3f}  cost {top.predicted_cost:.4g}  "
              f"decision {d.decision_id}")
    print(f"batch: {len(b.decisions)} prompts, lambda {b.cost_weight:g}, predicted mean cost "
          f"{b.predicted_mean_cost:.4g} {b.cost_unit}, predicted mean quality {b.predicted_mean_quality:.3f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            for chunk in c.generate(**_query(args), max_tokens=args.max_tokens, temperature=args.temperature,
                                    stop=args.stop, **_knob_args(args)):
                if chunk.decision is not None:
                    for backend, error in chunk.fallbacks:
                        print(f"[fallback] {backend}: {error}", file=sys.stderr)
                    _print_decision(chunk.decision)
                    print("---")
                if chunk.text:
                    print(chunk.text, end="", flush=True)
                if chunk.finish_reason:
                    print("\n---")
                    print(f"finish: FINISH_REASON_{chunk.finish_reason.upper()}  backend: {chunk.backend}  "
                          f"tokens: {chunk.prompt_tokens} "
                          f"prompt + {chunk.completion_tokens} completion  latency: {chunk.latency_ms:.0f} ms  "
                          f"first token: {chunk.time_to_first_token_ms:.0f} ms  {chunk.tokens_per_second:.1f} tokens/s")
        except grpc.RpcError as e:
            print()
            return _rpc_error(e)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            r = c.feedback(args.decision_id or "", args.score, backend=args.backend or "",
                           prompt=args.prompt, cost=args.cost)
        except grpc.RpcError as e:
            return _rpc_error(e)
    print(f"recorded {r.record_id} for backend {r.backend}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    with _client(args) as c:
        try:
            backends = c.list_backends()
        except grpc.RpcError as e:
            return _rpc_error(e)
    for b in backends:
        status = "BACKEND_STATUS_" + b.status.upper()
        print(f"{b.name:<28} {b.kind:<14} {status:<28} prior {b.prior_quality:.3f} "
              f"({b.outcomes} outcomes)  cost: {b.cost}")
        if b.description:
            print(f"{'':<28} {b.description}")
    return 0


def read_aptitude_results(path: str, backend: str) -> list[AptitudeResult]:
    """Aptitude results from JSONL (.gz): rows {"item_id" | "prompt", "score", "cost"?}, or outcome
    rows in the datastore schema ({"prompt", "scores": {backend: score}, "cost"?: {...}}), of which
    the named backend's scores are taken (what `caprouter aptitude --out` writes)."""
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    n = 0                                     # the line being read, for the error message
    try:
        with opener(path, "rt") as f:
            for line in f:
                n += 1
                if not line.strip():
                    continue
                row = json.loads(line)
                if "scores" in row:
                    if backend not in row["scores"]:
                        continue
                    c = (row.get("cost") or {}).get(backend)
                    out.append(AptitudeResult(score=float(row["scores"][backend]), prompt=_text(row["prompt"]),
                                              cost=None if c is None else float(c)))
                else:
                    item = str(row.get("item_id") or row.get("id") or "")
                    c = row.get("cost")
                    out.append(AptitudeResult(score=float(row["score"]), item_id=item,
                                              prompt="" if item else _text(row.get("prompt", "")),
                                              cost=None if c is None else float(c)))
    except FileNotFoundError:
        raise InvalidArgument(f"results file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{path}: line {n}: not an aptitude result ({type(e).__name__}: {e})") from None
    return out


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"prompt must be a string, got {v!r}")
    return v


def cmd_onboard(args: argparse.Namespace) -> int:
    results = read_aptitude_results(args.results, args.name)
    cost = CostModel.of(per_request=args.cost_per_request, price_in=args.price_in, price_out=args.price_out,
                        active_parameters=args.active_parameters, expected_output_tokens=args.expected_output_tokens)
    with _client(args) as c:
        try:
            r = c.onboard(args.name, results, cost=cost, description=args.description or "")
        except grpc.RpcError as e:
            return _rpc_error(e)
    if args.json:
        _print_json(r.response)
        return 0
    b = r.backend
    print(f"{'registered' if r.created else 'updated'} {b.name} ({b.kind}) from {r.results_used} aptitude "
          f"results, mean score {r.mean_score:.3f}; cost: {b.cost}; capability vector "
          f"{'fitted' if r.capability_fitted else 'not used (datastore only)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from router.adapters.grpc_server import serve
    from router.serving.app import build_app

    cfg = _config(args)
    setup_logging(cfg.log_level, args.log_format)
    if args.ray or args.ray_address:
        return _serve_ray(cfg, args)
    asyncio.run(serve(build_app(cfg), ready_file=args.ready_file, progress=sys.stderr.isatty()))
    return 0


def _serve_ray(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Ray mode: the same service, its backends as Ray Serve deployments (router/adapters/ray.py)."""
    import signal
    import threading

    from router.adapters.ray import RayServing

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


def cmd_keys(args: argparse.Namespace) -> int:
    from router.serving.access import AuditLog
    from router.serving.keys import OPEN, KeyFile, Limits

    cfg = _config(args)
    keys = KeyFile(cfg.auth.keys_path())
    audit = AuditLog(cfg.auth.audit_path())
    if args.keys_cmd == "create":
        limits = Limits(requests_per_s=args.rps, output_tokens_per_min=args.tokens_per_min, budget=args.budget,
                        budget_period=args.period)
        scopes = tuple(x.strip() for x in args.scopes.split(",") if x.strip())
        rec, token = keys.create(args.name, tenant=args.tenant, scopes=scopes, limits=limits)
        audit.write(OPEN, "key.create", key_id=rec.id, name=rec.name, tenant=rec.tenant, scopes=list(rec.scopes),
                    by=os.environ.get("USER", ""))
        print(f"created key {rec.id} ({rec.name}, tenant {rec.tenant}, scopes {','.join(rec.scopes)}) in {keys.path}",
              file=sys.stderr)
        print("store it now; it is not shown again:", file=sys.stderr)
        print(token)
    elif args.keys_cmd == "revoke":
        rec = keys.revoke(args.ref)
        audit.write(OPEN, "key.revoke", key_id=rec.id, name=rec.name, by=os.environ.get("USER", ""))
        print(f"revoked key {rec.id} ({rec.name})")
    else:
        rows = keys.keys()
        if args.json:
            print(json.dumps([{k: v for k, v in r.to_json().items() if k != "sha256"} for r in rows], indent=1))
            return 0
        print(f"{'id':<13} {'name':<20} {'tenant':<16} {'scopes':<34} {'limits':<28} status")
        for r in rows:
            lim = r.limits
            parts = [f"{lim.requests_per_s:g} rps" if lim.requests_per_s else "",
                     f"{lim.output_tokens_per_min} tok/min" if lim.output_tokens_per_min else "",
                     f"{lim.budget:g}/{lim.budget_period}" if lim.budget else ""]
            print(f"{r.id:<13} {r.name:<20} {r.tenant:<16} {','.join(r.scopes):<34} "
                  f"{', '.join(p for p in parts if p) or '-':<28} {'active' if r.active else 'revoked'}")
    return 0


def _unix_time(text: str) -> float:
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"--since {text!r}: give an ISO 8601 time (2026-12-01T09:00Z) or unix seconds") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def cmd_datastore(args: argparse.Namespace) -> int:
    since = _unix_time(args.since) if args.since else None
    with _client(args) as c:
        try:
            n = c.retract_feedback(args.key, since_unix=since)
        except grpc.RpcError as e:
            return _rpc_error(e)
    print(f"retracted {n} feedback record(s) of key {args.key}")
    return 0


def cmd_aptitude(args: argparse.Namespace) -> int:
    from router.offline.aptitude.cli_run import run

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    out = Path(args.out) if args.out else builtin_data("aptitude_outcomes.jsonl")
    run(cfg, out, only=args.backends.split(",") if args.backends else None, limit=args.limit)
    print(f"wrote {out}")
    return 0


def cmd_codes(args: argparse.Namespace) -> int:
    from backends.weights import resolve_weights
    from router.offline.codes import CodeSpec, build_codes
    from router.serving.app import build_encoder

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
    from router.prediction import artifact as art
    from router.serving.app import build_encoder, open_datastore, state_dir

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    encoder = build_encoder(cfg)
    artifact = None
    if cfg.artifact:
        artifact = art.load(Path(cfg.artifact), embedder_id=encoder.model_id, dim=encoder.dim)
    store = open_datastore(cfg, encoder, progress=True, artifact=artifact)
    print(f"datastore at {state_dir(cfg)}: {len(store)} outcomes")
    for name, s in store.stats().items():
        print(f"  {name:<28} {s.outcomes:>7} outcomes, mean score {s.mean_score:.3f}")
    store.close()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from router.offline.candidates import selection_table
    from router.offline.training import train_command

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    m = train_command(cfg, args.data, args.out, costs=args.costs, seed=args.seed, max_epochs=args.epochs,
                      test_share=args.test_share, progress=sys.stderr.isatty(), clip_scores=args.clip_scores,
                      folds=args.folds, router=args.router)
    if m["data"].get("clipped_scores"):
        print(f"clipped {m['data']['clipped_scores']} score(s) into [0, 1] (--clip-scores)")
    print(selection_table(m["metrics"]["selection"]))
    sec = m["metrics"]["seconds"]
    took = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in sec.items())
    if m["router"] == "capability":
        w = {b: sum(v) for b, v in m["knn_weights"].items()}
        print(f"wrote artifact {args.out}: {len(m['backends'])} backends, {m['metrics']['selection']['chosen']}, "
              f"best epoch {m['metrics']['best_epoch']}, datastore weight {min(w.values()):.2f}..{max(w.values()):.2f}"
              f" ({took})")
    elif m["router"] == "ensemble":
        ens = m["ensemble"]
        print(f"wrote artifact {args.out}: {len(m['backends'])} backends, {m['metrics']['selection']['chosen']} "
              f"({len(ens['members'])} learned members, {len(ens['neighbourhoods'])} datastore neighbourhoods) "
              f"({took})")
    else:
        print(f"wrote artifact {args.out}: {len(m['backends'])} backends, the datastore alone (k "
              f"{m['datastore']['k']}, temperature {m['datastore']['temperature']:g}) ({took})")
    test = m["metrics"].get("test")
    if test and test.get("equal_costs"):
        print(f"every backend costs the same (quality-only routing): test accuracy {test['accuracy']:.3f}, "
              f"best single backend {test['best_single']:.3f}, oracle {test['oracle']:.3f}")
    elif test:
        zero = m["metrics"]["test_zero_router"]
        print(f"test AIQ {test['aiq']:.3f} (zero router {zero['aiq']:.3f}); quality at the best single model's "
              f"cost {test['q_at_best_cost']:.3f}; its quality reached at {test['cost_share_for_best_quality']:.0%} "
              "of its cost")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from router.offline.export import export

    cfg = _config(args)
    setup_logging(cfg.log_level, "text")
    s = export(cfg, Path(args.out), offline=not args.no_offline)
    print(f"wrote {args.out}: {s.served_rows} served rows from {s.feedback_records} feedback records "
          f"({s.retracted} retracted left out), {s.offline_rows} offline outcomes")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from router.offline.training import eval_command

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
        sp.add_argument("--state-dir", help="datastore state folder (snapshot, and the SQLite system of record)")
        sp.add_argument("--log-level")

    s = sub.add_parser("serve", help="run the gRPC server")
    with_config(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--default-cost-weight", type=float, help="default lambda for requests that set none")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    s.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on this port (0: any free)")
    s.add_argument("--ready-file", help="write the bound address here once serving")
    s.add_argument("--tls-cert", dest="tls_cert_serve", help="serve both ports over TLS with this certificate chain (PEM)")
    s.add_argument("--tls-key", dest="tls_key_serve", help="the certificate's private key (PEM)")
    s.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--keys-file", help="the API key file (default: auth.keys_file, else $CAPROUTER_HOME/keys.json); "
                                       "keys are required when it exists")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value: dotted key, YAML value; in a list a number or * picks "
                        "(--set routing.max_pending=64 --set 'backends.*.options.max_queue=16'); repeatable")
    s.add_argument("--ray", action="store_true", help="dispatch through Ray Serve, starting a local Ray instance")
    s.add_argument("--ray-address", help="dispatch through Ray Serve on this cluster (e.g. auto, ray://head:10001)")
    s.add_argument("--artifact", dest="artifact_serve",
                   help="a trained router (caprouter train); its unconfigured backends are served route-only")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("route", help="ask a running server for a decision")
    _add_knobs(r)
    r.set_defaults(fn=cmd_route)

    rb = sub.add_parser("route-batch", help="route many prompts at once (RouteBatch; --budget binds their average)")
    _add_knobs(rb, prompt=False)
    rb.add_argument("file", help="one prompt a line, or JSONL of {prompt} / {messages}; '-' for stdin")
    rb.set_defaults(fn=cmd_route_batch)

    g = sub.add_parser("generate", help="route and stream the answer")
    _add_knobs(g)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--stop", nargs="*", default=[])
    g.set_defaults(fn=cmd_generate)

    f = sub.add_parser("feedback", help="report an observed score")
    f.add_argument("--address", default="127.0.0.1:50051")
    f.add_argument("--decision-id")
    f.add_argument("--prompt", help="the prompt the score is for (with --backend), instead of --decision-id")
    f.add_argument("--backend", help="the backend that answered (default: the decision's)")
    f.add_argument("--score", type=float, required=True)
    f.add_argument("--cost", type=float, help="the observed cost of the answer (server's cost unit)")
    f.add_argument("--timeout", type=float, default=30.0)
    _add_connection(f)
    f.set_defaults(fn=cmd_feedback)

    b = sub.add_parser("backends", help="list a server's backends")
    b.add_argument("--address", default="127.0.0.1:50051")
    b.add_argument("--timeout", type=float, default=30.0)
    _add_connection(b)
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
    _add_connection(o)
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
    t.add_argument("--folds", type=int, default=3,
                   help="held-out folds on which the candidate routers are compared (at least 2)")
    t.add_argument("--router", default="auto", choices=("auto", "datastore", "learned", "ensemble"),
                   help="which candidates to compare: all (default), only the datastore's neighbourhoods, "
                        "only the learned routers, or only the ensembles (means of several of them)")
    t.add_argument("--clip-scores", action="store_true",
                   help="clip scores outside [0, 1] into it (and say how many) instead of refusing the file")
    t.set_defaults(fn=cmd_train)

    x = sub.add_parser("export", help="write a server's served feedback (and its offline outcomes) as training data")
    with_config(x)
    x.add_argument("--artifact", dest="artifact_serve", help="the artifact the server ran (`serve --artifact`)")
    x.add_argument("--out", required=True, help="outcomes JSONL to write (.gz: compressed), what `train --data` reads")
    x.add_argument("--no-offline", action="store_true", help="only the served feedback, not the offline outcomes")
    x.set_defaults(fn=cmd_export)

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

    k = sub.add_parser("keys", help="manage the API keys of a server (its key file)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key; prints it once")
    kc.add_argument("name", help="who holds the key (an app, a team)")
    kc.add_argument("--tenant", help="whose traffic and budget it counts as (default: the name)")
    kc.add_argument("--scopes", default="route,generate",
                    help="comma-separated: route, generate, feedback, onboard, metrics (read /metrics), "
                         "admin (all of them)")
    kc.add_argument("--rps", type=float, help="requests per second (token bucket)")
    kc.add_argument("--tokens-per-min", type=int, help="Generate output tokens per minute (token bucket)")
    kc.add_argument("--budget", type=float, help="spend per period in the server's cost unit")
    kc.add_argument("--period", choices=["day", "month"], default="day", help="the budget's period (UTC)")
    kr = ksub.add_parser("revoke", help="revoke a key by id or name (takes effect on the next request)")
    kr.add_argument("ref", help="key id or name")
    kl = ksub.add_parser("list", help="list keys (never the keys themselves)")
    kl.add_argument("--json", action="store_true")
    for sp in (kc, kr, kl):
        sp.add_argument("--config", help="YAML config whose auth.keys_file to use")
        sp.add_argument("--keys-file", help="the key file (default: auth.keys_file, else $CAPROUTER_HOME/keys.json)")
    k.set_defaults(fn=cmd_keys)

    ds = sub.add_parser("datastore", help="act on a running server's datastore")
    dsub = ds.add_subparsers(dest="datastore_cmd", required=True)
    dr = dsub.add_parser("retract", help="withdraw the feedback one API key sent (needs an admin key)")
    dr.add_argument("--key", required=True, help="the API key's name, or its id (a name may have been reused "
                                                 "after a revocation; an id never is)")
    dr.add_argument("--since", help="only feedback sent at or after this time (ISO 8601, or unix seconds)")
    dr.add_argument("--address", default="127.0.0.1:50051")
    dr.add_argument("--timeout", type=float, default=60.0)
    _add_connection(dr)
    ds.set_defaults(fn=cmd_datastore)

    d = sub.add_parser("build-datastore", help="build the datastore snapshot from the configured outcomes")
    with_config(d)
    d.set_defaults(fn=cmd_build_datastore)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()       # a reader that went away shows here, not as noise at exit
        return rc
    except CaprouterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`caprouter route ... | head`): stop quietly, as a shell tool does.
        # Python would report the failed flush of stdout at exit; point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
