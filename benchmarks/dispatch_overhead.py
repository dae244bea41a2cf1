"""What Ray Serve dispatch costs against in-process dispatch, in one run.

    .venv/bin/python benchmarks/dispatch_overhead.py [--requests 60] [--clients 4] [--tokens 16]
        [--threads N] [--latency-only]

Both servers run the embedded default (same config, fresh state) and are called over real gRPC
from this process. Per-request overhead: Generate with max_tokens=1 forced to the dense backend
(routing, dispatch, prefill, one token), requests alternating between the two servers; the
overhead is the difference of the latency percentiles (and the median of the paired
differences). Reference in the same run: Serve's floor, a bare deployment-to-deployment call
streaming two items. Throughput: --clients concurrent clients
streaming --tokens tokens each from the dense backend, in-process, then Ray with 1 replica (torch on
as many threads as in-process) and with 2 replicas (one thread each, Ray's default). The last
line is key=value figures.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

from common import ROOT  # noqa: F401,I001 - puts the repository on sys.path


def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def one_token(stub, pb, prompt: str) -> float:
    t = time.perf_counter()
    chunks = list(stub.Generate(pb.GenerateRequest(prompt=prompt, knobs=pb.RoutingKnobs(allowed_backends=["smollm2-135m"]),
                                                   params=pb.GenerationParams(max_tokens=1)), timeout=60))
    assert chunks[-1].HasField("end")
    return (time.perf_counter() - t) * 1e3


def serve_floor(samples: int = 100) -> tuple[float, float]:
    """(p50, p99) ms of the cheapest streamed call Serve offers, measured here: a deployment
    calling another through a handle, two streamed items (one text, one end, as a 1-token
    Generate), nothing else. Runs as its own application on the current Ray instance."""
    import asyncio

    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def generate(self, n: int):
            for _ in range(n):
                yield ("text", "x")
            yield ("end", "length")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Caller:
        def __init__(self, echo) -> None:
            self.echo = echo.options(stream=True)

        async def measure(self, n: int) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                async for _ev in self.echo.generate.remote(1):
                    pass
                out.append((time.perf_counter() - t) * 1e3)
                await asyncio.sleep(0)
            return out

    h = serve.run(Caller.bind(Echo.bind()), name="serve-floor", route_prefix=None)
    h.measure.remote(20).result()           # warm-up
    v = h.measure.remote(samples).result()
    serve.delete("serve-floor")
    return statistics.median(v), pct(v, 0.99)


def throughput(address: str, pb, grpc_mod, clients: int, per_client: int, tokens: int) -> float:
    from caprouter.v1 import router_pb2_grpc

    done = [0]
    lock = threading.Lock()

    def work(i: int) -> None:
        with grpc_mod.insecure_channel(address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for j in range(per_client):
                chunks = list(stub.Generate(pb.GenerateRequest(
                    prompt=f"Tell me a fact about the number {i * 100 + j}.",
                    knobs=pb.RoutingKnobs(allowed_backends=["smollm2-135m"]),
                    params=pb.GenerationParams(max_tokens=tokens)), timeout=300))
                with lock:
                    done[0] += chunks[-1].end.usage.completion_tokens

    t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done[0] / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the model in-process and in the 1-replica Ray server (0: torch's default)")
    ap.add_argument("--latency-only", action="store_true")
    args = ap.parse_args()

    import tempfile
    from pathlib import Path

    import grpc
    import torch

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc
    from router.adapters.ray import RayServing
    from router.core.config import caprouter_home, load_config
    from tests.conftest import LiveServer

    tmp = Path(tempfile.mkdtemp(prefix="caprouter-dispatch-"))

    def config(name: str, replicas: int | None = None, threads: int | None = None):
        cfg = load_config(None, {"server.port": 0, "cache_dir": str(caprouter_home() / "models"),
                                 "datastore.state_dir": str(tmp / name), "log_level": "WARNING"})
        cfg.ray.torch_threads = threads
        if replicas:
            cfg.ray.deployments["smollm2-135m"] = cfg.ray.default.model_copy(update={"num_replicas": replicas})
        return cfg

    local = LiveServer(config("local"))
    threads = args.threads or torch.get_num_threads()
    local.app.compute.run(torch.set_num_threads, threads)
    local.call(local.server.load_and_serve())
    # Latency: replicas with the in-process thread count, so that the difference is dispatch.
    ray1 = RayServing(config("ray1", threads=threads))
    prompts = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello."]
    stubs = {"in-process": router_pb2_grpc.RouterStub(grpc.insecure_channel(local.address)),
             "ray": router_pb2_grpc.RouterStub(grpc.insecure_channel(ray1.address))}
    for s in stubs.values():          # warm-up
        for p in prompts:
            one_token(s, pb, p)
    lat: dict[str, list[float]] = {k: [] for k in stubs}
    for i in range(args.requests):
        for k, s in stubs.items():
            lat[k].append(one_token(s, pb, prompts[i % len(prompts)]))
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: pct(v, 0.99) for k, v in lat.items()}
    print(f"Generate, 1 token, {args.requests} requests each, alternating (ms):")
    for k in stubs:
        print(f"  {k:<11} p50 {p50[k]:7.1f}  p99 {p99[k]:7.1f}")
    over50, over99 = p50["ray"] - p50["in-process"], p99["ray"] - p99["in-process"]
    # The same prompt went to both servers back to back: the median of those paired differences
    # is less exposed to the machine's drift than the difference of the two medians.
    paired = statistics.median(r - i for r, i in zip(lat["ray"], lat["in-process"]))
    print(f"  Ray dispatch overhead: p50 {over50:+.1f} ms, p99 {over99:+.1f} ms, median paired difference {paired:+.1f} ms")
    floor50, floor99 = serve_floor()
    print(f"  reference, Serve's floor here (deployment -> deployment, 2 streamed items, nothing else): "
          f"p50 {floor50:.1f} ms, p99 {floor99:.1f} ms")

    figs = {"threads": threads, "inproc_p50_ms": p50["in-process"], "ray_p50_ms": p50["ray"],
            "inproc_p99_ms": p99["in-process"], "ray_p99_ms": p99["ray"], "ray_overhead_p50_ms": over50,
            "ray_overhead_p99_ms": over99, "ray_overhead_paired_ms": paired, "serve_floor_p50_ms": floor50,
            "serve_floor_p99_ms": floor99}
    if args.latency_only:
        ray1.close()
        local.stop()
        print(" ".join(f"{k}={v:.1f}" for k, v in figs.items()))
        return 0
    tput = {"in-process": throughput(local.address, pb, grpc, args.clients, args.per_client, args.tokens),
            "ray-1-replica": throughput(ray1.address, pb, grpc, args.clients, args.per_client, args.tokens)}
    ray1.close()
    local.stop()
    # Throughput with two replicas: Ray's default of one thread each (they share the cores).
    ray2 = RayServing(config("ray2", replicas=2))
    tput["ray-2-replicas"] = throughput(ray2.address, pb, grpc, args.clients, args.per_client, args.tokens)
    ray2.close()
    print(f"throughput, {args.clients} concurrent clients x {args.per_client} requests x {args.tokens} tokens (tokens/s):")
    for k, v in tput.items():
        print(f"  {k:<15} {v:7.1f}  ({v / tput['in-process']:.2f}x in-process)")
    figs.update({f"tput_{k.replace('-', '_')}": v for k, v in tput.items()})
    print(" ".join(f"{k}={v:.1f}" for k, v in figs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
