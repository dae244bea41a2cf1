"""Route latency against the bare embedding time, and the backends' decode speed.

    .venv/bin/python benchmarks/route_latency.py [--prompts 340] [--tokens 64]

For each prompt of the aptitude suite (340 by default), in alternating order: the bare
``encoder.encode([prompt])`` and a full ``RouterService.route`` (validation, the same encode, kNN,
cost prediction, policy, decision record). Reports p50 / p99 of both and the share routing adds
on top of the embedding at p50 (target <= 10%). Also measured in the same run: Route over gRPC on
loopback, and decode tokens/s of each configured backend (same prompts, exactly --tokens tokens).
The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", help="YAML config (default: the embedded default)")
    ap.add_argument("--prompts", type=int, default=340)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--decode-runs", type=int, default=4)
    args = ap.parse_args()

    import grpc

    from backends.base import Finished, GenerationRequest
    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc
    from router.adapters.grpc_server import GrpcServer
    from router.core.config import load_config
    from router.serving.app import build_app
    from router.serving.registrations import load_suite, suite_path
    from router.serving.service import Query

    cfg = load_config(args.config, {"server.port": 0})
    prompts = [it["prompt"] for it in load_suite(suite_path(cfg.aptitude.suite))][: args.prompts]
    app = build_app(cfg)
    # The server's event loop runs on its own thread, as in `caprouter serve`; this thread is the client.
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def make_server():
        return GrpcServer(app, "127.0.0.1", 0)

    server = on_loop(make_server())
    on_loop(server.start())
    on_loop(server.load_and_serve())
    svc = app.service
    enc = svc.encoder

    for p in prompts[:20]:  # warm-up
        enc.encode([p])
        svc.route(Query(prompt=p))
    t_enc, t_route = [], []
    for i, p in enumerate(prompts):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            t = time.perf_counter()
            if which == 0:
                enc.encode([p])
                t_enc.append((time.perf_counter() - t) * 1e3)
            else:
                svc.route(Query(prompt=p))
                t_route.append((time.perf_counter() - t) * 1e3)

    # Route over gRPC on loopback.
    t_grpc = []
    with grpc.insecure_channel(server.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for p in prompts[:20]:
            stub.Route(pb.RouteRequest(prompt=p), timeout=30)
        for p in prompts:
            t = time.perf_counter()
            stub.Route(pb.RouteRequest(prompt=p), timeout=30)
            t_grpc.append((time.perf_counter() - t) * 1e3)

    # Decode speed, backends alternating on the same prompts.
    async def decode(backend, prompt: str) -> float:
        req = GenerationRequest(messages=[("user", prompt)], max_tokens=args.tokens, ignore_eos=True)
        async for ev in backend.generate(req):
            if isinstance(ev, Finished):
                return (ev.completion_tokens - 1) / ev.decode_s
        raise RuntimeError("no finish event")

    tps: dict[str, list[float]] = {n: [] for n in svc.backends}
    for r in range(args.decode_runs + 1):
        for name, b in svc.backends.items():
            v = on_loop(decode(b, prompts[r * 7 % len(prompts)]))
            if r > 0:  # the first round is warm-up
                tps[name].append(v)

    e50, e99, r50, r99 = pct(t_enc, 50), pct(t_enc, 99), pct(t_route, 50), pct(t_route, 99)
    g50, g99 = pct(t_grpc, 50), pct(t_grpc, 99)
    added = (r50 - e50) / e50 * 100
    print(f"prompts: {len(prompts)} (aptitude suite), datastore: {len(svc.datastore)} outcomes, "
          f"backends: {', '.join(svc.backends)}")
    print(f"{'':<26}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'bare encode()':<26}{e50:>10.2f}{e99:>10.2f}")
    print(f"{'RouterService.route()':<26}{r50:>10.2f}{r99:>10.2f}")
    print(f"{'Route over gRPC':<26}{g50:>10.2f}{g99:>10.2f}")
    print(f"routing adds {added:.1f}% to the bare embedding time at p50 (target <= 10%)")
    med = {n: statistics.median(v) for n, v in tps.items()}
    names = list(med)
    dense = names[0]
    for n in names:
        print(f"decode {n:<28} {med[n]:6.1f} tokens/s  ({med[n] / med[dense]:.2f}x {dense})")
    figures = {"prompts": len(prompts), "encode_p50_ms": f"{e50:.2f}", "encode_p99_ms": f"{e99:.2f}",
               "route_p50_ms": f"{r50:.2f}", "route_p99_ms": f"{r99:.2f}", "route_over_encode_p50_pct": f"{added:.1f}",
               "grpc_route_p50_ms": f"{g50:.2f}", "grpc_route_p99_ms": f"{g99:.2f}"}
    for n in names:
        figures[f"tps_{n}"] = f"{med[n]:.1f}"
    if len(names) > 1:
        figures["speedup_" + names[1]] = f"{med[names[1]] / med[dense]:.2f}"
    on_loop(server.stop(0))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
