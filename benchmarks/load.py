"""Load: the server under concurrent callers, against the bare encoder and model measured in the same run.

    .venv/bin/python benchmarks/load.py [--duration 15] [--route-levels 1,4,16,64]
        [--generate-levels 1,4,8,16] [--feedback-levels 1,16] [--overload 128] [--max-tokens 32]
        [--skip-reference] [--quick] [--address HOST:PORT [--server-pid PID] [--write-feedback]]
    .venv/bin/python benchmarks/load.py --soak SECONDS --rate R [--soak-generate-share 0.05]

Starts ``caprouter serve`` on the embedded default as a separate process on 127.0.0.1 (a free
port, a throwaway state folder, its output in benchmarks/out/load-server.log), waits for gRPC
health SERVING and always stops it at the end; ``--address`` uses a running server instead
(its server RSS only with ``--server-pid``; Feedback, which writes to its datastore, only with
``--write-feedback``).

Reference, measured in this process before the server starts (torch on its default threads, as
the server): the bare prompt encoder on the benchmark prompts at batch 1 and 16 (prompts/s),
and the dense model alone, a plain greedy decode loop over a DynamicCache (left padding,
attention mask, position ids), 32 tokens at batch 1 and 8 (tokens/s of the decode steps).

Closed-loop phases over grpc.aio (N callers, each request -> response -> next request, one channel
per 16 callers, a per-call deadline, every loop bounded in time and count): Route at each of
--route-levels, Generate (temperature 0, --max-tokens) at each of --generate-levels, Feedback by
decision id (the ids the Route phases got), and overload (on a second server whose routing and
backend queues hold --overload-queue, 16 by default): --overload callers, 1 in 8 on Generate,
the rest on Route, counting answers, RESOURCE_EXHAUSTED rejections (the caller then waits the
retry-after-ms trailer, at most 1 s) and any other error apart. Each level runs a warm-up, then
a window of --duration seconds: throughput counts completions inside the window (output tokens
pro rata of each answer's streaming time inside it), latencies and errors are those of the
requests in flight at some time inside it (the last ones are let finish). The server's RSS and
CPU (and this process's CPU) are read from /proc.

``--soak S --rate R``: instead of the phases, open-loop arrivals (Poisson, or ``--even``) at R
requests/s for S seconds, Route with a share of Generate, each request its own task (at most
--max-inflight at once; arrivals beyond are shed and counted): errors, p99 of the first minute
and of the whole run, the server's RSS at start and end.

Figures also go to benchmarks/out/load.json. Not a test. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import OUT, ROOT  # noqa: I001 - puts the repository on sys.path

# ---- prompts -----------------------------------------------------------------------------------

_TEMPLATES = [
    "What is {}?",
    "What is the capital of {}?",
    "Write a haiku about {}.",
    "Explain {} in one sentence.",
    "Translate '{}' into French.",
    "Write a Python function that {}.",
    "Name three {}.",
    "Is {} a prime number? Answer yes or no.",
]
_FILLS = [
    ["7 + 5", "12 * 9", "144 / 12", "2 to the power 10", "15% of 80", "the square root of 81", "3.5 + 4.25",
     "1000 - 387"],
    ["France", "Japan", "Kenya", "Canada", "Peru", "Norway", "Vietnam", "Egypt"],
    ["autumn leaves", "a quiet harbour", "the first snow", "a busy kitchen", "an old clock", "the desert at night",
     "a paper boat", "morning coffee"],
    ["photosynthesis", "inflation", "recursion", "gravity", "a hash table", "the water cycle", "supply and demand",
     "entropy"],
    ["good morning", "where is the station?", "I like green tea", "the book is on the table", "see you tomorrow",
     "how much does it cost?", "it is raining", "thank you very much"],
    ["reverses a string", "checks if a number is even", "sums a list", "finds the largest of three numbers",
     "counts vowels in a word", "returns the factorial of n", "removes duplicates from a list",
     "converts Celsius to Fahrenheit"],
    ["fruits", "planets", "programming languages", "musical instruments", "European rivers", "birds",
     "board games", "primary colours"],
    ["17", "21", "29", "51", "97", "91", "2", "1"],
]
# 64 short prompts, consecutive ones of different kinds; cycled by every phase.
PROMPTS = [_TEMPLATES[k % 8].format(_FILLS[k % 8][k // 8]) for k in range(64)]


# ---- small helpers -----------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of a process (MB), from /proc (Linux); None when unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc (Linux); None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def fmt(v: float | None, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.{nd}f}"


def codes_text(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


# ---- reference: the bare encoder and the model alone -------------------------------------------

def reference(prompts: list[str], tokens: int, runs: int, seconds: float) -> dict[str, Any]:
    import inspect

    import torch

    from router.core.config import load_config
    from router.serving.app import build_encoder

    cfg = load_config(None)
    ref: dict[str, Any] = {"torch_threads": torch.get_num_threads()}

    enc = build_encoder(cfg)  # as the server builds it, on the calling thread
    enc.encode(prompts[:4])   # warm-up
    for batch in (1, 16):
        n, t0 = 0, time.perf_counter()
        while True:
            for s in range(0, len(prompts), batch):
                enc.encode(prompts[s:s + batch])
            n += len(prompts)
            if time.perf_counter() - t0 >= seconds or n >= 64 * len(prompts):
                break
        ref[f"encoder_batch{batch}_pps"] = n / (time.perf_counter() - t0)
    ref["encoder"] = f"{cfg.encoder.kind} ({getattr(enc, 'model_id', '?')}, max_tokens {cfg.encoder.max_tokens})"
    del enc
    gc.collect()

    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from backends.weights import resolve_weights

    dense = next(b for b in cfg.backends if b.kind == "transformers" and not b.options.get("prune"))
    source = dense.options.get("model", "smollm2-135m-instruct")
    path = resolve_weights(source, cfg.models_dir())
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dense.options.get("dtype", "float32")))
    model = model.eval()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def decode(batch: list[list[int]], n: int) -> tuple[float, float]:
        """(tokens/s of the decode steps, tokens/s including the prefill) of a greedy loop."""
        b, width = len(batch), max(len(r) for r in batch)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{kw: cache})
            nxt = out.logits[:, -1].argmax(-1)
            cache = getattr(out, kw)
            last = pos[:, -1:]
            t1 = time.perf_counter()
            for _ in range(n - 1):
                mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
                last = last + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                            logits_to_keep=1, **{kw: cache})
                cache = getattr(out, kw)
                nxt = out.logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
        return b * (n - 1) / (t2 - t1), b * n / (t2 - t0)

    decode(rows[:1], 4)  # warm-up
    decode(rows[:8], 4)
    for b in (1, 8):
        steps, whole = [], []
        for r in range(runs):
            s, w = decode([rows[(r * b + i) % len(rows)] for i in range(b)], tokens)
            steps.append(s)
            whole.append(w)
        ref[f"decode_b{b}_tps"] = statistics.median(steps)
        ref[f"decode_b{b}_with_prefill_tps"] = statistics.median(whole)
    ref["model"] = f"{dense.name} ({source}, {dense.options.get('dtype', 'float32')})"
    return ref  # the model goes with this frame


# ---- the server ------------------------------------------------------------------------------

class Server:
    """``caprouter serve`` as a child process on loopback, or a running server (``address``)."""

    def __init__(self, args: argparse.Namespace, extra_args: str = "") -> None:
        self.args = args
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.state: Path | None = None
        self.log = OUT / "load-server.log"
        self.address: str = args.address or ""
        self.pid: int | None = args.server_pid
        self.ready_s = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        if not self.args.address:
            exe = Path(sys.executable).parent / "caprouter"
            if not exe.exists():
                exe = ROOT / ".venv" / "bin" / "caprouter"
            host = "127.0.0.1"
            port = free_port(host)
            self.address = f"{host}:{port}"
            self.state = Path(tempfile.mkdtemp(prefix="caprouter-load-state-"))
            cmd = [str(exe), "serve", "--host", host, "--port", str(port), "--state-dir", str(self.state),
                   "--log-format", "text", *shlex.split(self.args.server_args), *shlex.split(self.extra_args)]
            # Keys on or off, the server's own key file: never the developer's in $CAPROUTER_HOME.
            cmd += ["--keys-file", str(self.state / "keys.json")]
            if self.args.api_keys:
                from router.serving.keys import KeyFile

                self.args.token = KeyFile(self.state / "keys.json").create("load", scopes=("admin",))[1]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            OUT.mkdir(parents=True, exist_ok=True)
            with open(self.log, "w") as logf:
                logf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
                logf.flush()
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                             env=env, cwd=str(ROOT))
            self.pid = self.proc.pid
        self.wait_serving(self.args.start_timeout)
        self.ready_s = time.perf_counter() - t0

    def wait_serving(self, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from caprouter.v1 import router_pb2 as pb

        service = pb.DESCRIPTOR.services_by_name["Router"].full_name
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {self.proc.returncode} while loading:\n"
                                       + self.log_tail())
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f} s\n" + self.log_tail())
                time.sleep(0.5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)


# ---- calls -----------------------------------------------------------------------------------

@dataclass
class Rec:
    """One request: start and end (perf_counter seconds), outcome, what it carried."""

    kind: str
    t0: float
    t1: float = 0.0
    code: str = "OK"
    t_first: float | None = None      # first chunk with text (Generate)
    tokens: int = 0                   # completion tokens, from the last chunk's usage (Generate)
    backend: str = ""
    decision_id: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1e3


class Calls:
    """The RPCs as the benchmark makes them: raw stubs (no client-side retries), a deadline each."""

    def __init__(self, address: str, n_channels: int, args: argparse.Namespace) -> None:
        import grpc

        from caprouter.v1 import router_pb2 as pb
        from caprouter.v1 import router_pb2_grpc

        self.grpc, self.pb, self.args = grpc, pb, args
        token = getattr(args, "token", None)
        self.md = (("authorization", f"Bearer {token}"),) if token else ()
        # A local subchannel pool: each channel its own connection (channels with the same target
        # and arguments otherwise share one).
        self.channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(n_channels)]
        self.stubs = [router_pb2_grpc.RouterStub(c) for c in self.channels]

    def stub(self, caller: int, callers: int) -> Any:
        """One channel per 16 callers of a phase."""
        used = max(1, min(len(self.stubs), math.ceil(callers / 16)))
        return self.stubs[caller % used]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def _guard(self, rec: Rec, coro: Awaitable[None]) -> Rec:
        try:
            await coro
        except self.grpc.aio.AioRpcError as e:
            rec.code = e.code().name
            for k, v in e.trailing_metadata() or ():
                if k == "retry-after-ms":
                    try:
                        rec.retry_after_s = float(v) / 1e3
                    except ValueError:
                        pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a client-side failure is a figure, not a crash
            rec.code = f"CLIENT_{type(e).__name__}"
        rec.t1 = time.perf_counter()
        return rec

    async def route(self, stub: Any, prompt: str) -> Rec:
        rec = Rec("route", time.perf_counter())

        async def go() -> None:
            r = await stub.Route(self.pb.RouteRequest(prompt=prompt), timeout=self.args.deadline, metadata=self.md)
            rec.backend, rec.decision_id = r.backend, r.decision_id
        return await self._guard(rec, go())

    async def generate(self, stub: Any, prompt: str) -> Rec:
        rec = Rec("generate", time.perf_counter())
        params = self.pb.GenerationParams(max_tokens=self.args.max_tokens, temperature=0.0)
        knobs = self.pb.RoutingKnobs(allowed_backends=self.args.generate_allow.split(",")
                                     if self.args.generate_allow else [])

        async def go() -> None:
            ended = False
            async for chunk in stub.Generate(self.pb.GenerateRequest(prompt=prompt, params=params, knobs=knobs),
                                             timeout=self.args.deadline, metadata=self.md):
                if chunk.text and rec.t_first is None:
                    rec.t_first = time.perf_counter()
                if chunk.HasField("start"):
                    rec.decision_id = chunk.start.decision_id
                if chunk.HasField("end"):
                    rec.tokens = chunk.end.usage.completion_tokens
                    rec.backend = chunk.end.backend
                    ended = True
            if not ended:
                rec.code = "NO_END_CHUNK"
        return await self._guard(rec, go())

    async def feedback(self, stub: Any, decision_id: str, score: float) -> Rec:
        rec = Rec("feedback", time.perf_counter(), decision_id=decision_id)

        async def go() -> None:
            await stub.Feedback(self.pb.FeedbackRequest(decision_id=decision_id, score=score),
                                timeout=self.args.deadline, metadata=self.md)
        return await self._guard(rec, go())

    async def list_backends(self) -> list[tuple[str, str, str]]:
        r = await self.stubs[0].ListBackends(self.pb.ListBackendsRequest(), timeout=self.args.deadline,
                                             metadata=self.md)
        return [(b.name, self.pb.BackendStatus.Name(b.status), b.kind) for b in r.backends]


# ---- closed loop -----------------------------------------------------------------------------

Caller = Callable[[int, int], Awaitable[Rec]]   # (caller index, its request number) -> Rec


@dataclass
class Window:
    recs: list[Rec]
    ws: float
    we: float
    issued: int
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    rss_end_mb: float | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> float:
        return self.we - self.ws

    def measured(self, kind: str | None = None) -> list[Rec]:
        """The requests in flight at some time inside the window: a request longer than the
        window (Generate under load) is still seen."""
        return [r for r in self.recs if r.t0 < self.we and r.t1 >= self.ws and (kind is None or r.kind == kind)]

    def done_ok(self, kind: str | None = None) -> list[Rec]:
        return [r for r in self.recs if r.ok and self.ws <= r.t1 < self.we and (kind is None or r.kind == kind)]

    def rate(self, kind: str | None = None) -> float:
        return len(self.done_ok(kind)) / self.d

    def tokens_per_s(self) -> float:
        """Output tokens inside the window: each answer's tokens pro rata of its streaming time
        (first text to end) inside the window."""
        total = 0.0
        for r in self.recs:
            if not r.ok or r.kind != "generate" or not r.tokens:
                continue
            a, b = (r.t_first if r.t_first is not None else r.t0), r.t1
            if b <= a:
                total += r.tokens if self.ws <= b < self.we else 0
            else:
                total += r.tokens * max(0.0, min(b, self.we) - max(a, self.ws)) / (b - a)
        return total / self.d

    def errors(self, kind: str | None = None) -> Counter:
        return Counter(r.code for r in self.measured(kind) if not r.ok)


async def closed_loop(server: Server, callers: list[Caller], warmup: float, duration: float, deadline: float,
                      max_requests: int) -> Window:
    """len(callers) coroutines, each request -> response -> next request, from now until the end
    of the window (warm-up + duration); the requests still in flight then are let finish (each
    has its deadline; a safety cap cancels what would outlive it)."""
    # The client's own full collections walked every object the reference models and earlier
    # phases left behind: a 247 ms pause of this process in an overload phase, which delays reading
    # every answer then in flight (the refusals' p99 went from 35 to 67 ms). Out of sight before
    # each window, as the server does once loaded.
    gc.collect()
    gc.freeze()
    t_start = time.perf_counter()
    ws, we = t_start + warmup, t_start + warmup + duration
    recs: list[Rec] = []
    issued = 0
    cpu0, ccpu0 = cpu_s(server.pid), time.process_time()

    async def worker(i: int) -> None:
        nonlocal issued
        seq = 0
        while time.perf_counter() < we and issued < max_requests:
            issued += 1
            r = await callers[i](i, seq)
            seq += 1
            recs.append(r)
            if r.code == "RESOURCE_EXHAUSTED":
                # As a well-behaved client: wait what the server asks (at most 1 s), then retry.
                wait = r.retry_after_s if r.retry_after_s is not None else 0.05
                await asyncio.sleep(max(0.0, min(wait, 1.0, we - time.perf_counter())))
            elif not r.ok:
                await asyncio.sleep(0.01)   # no hot loop against a server that fails at once

    tasks = [asyncio.create_task(worker(i)) for i in range(len(callers))]
    _done, pending = await asyncio.wait(tasks, timeout=warmup + duration + deadline + 10)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu1 = cpu_s(server.pid)
    w = Window(recs, ws, we, issued)
    w.wall_s = time.perf_counter() - t_start
    w.server_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    w.client_cpu_s = time.process_time() - ccpu0
    w.rss_end_mb = rss_mb(server.pid)
    w.extra["cancelled_at_cap"] = len(pending)
    return w


def cpu_share(w: Window) -> str:
    srv = "?" if w.server_cpu_s is None else f"{w.server_cpu_s / w.wall_s * 100:.0f}"
    return f"{srv}/{w.client_cpu_s / w.wall_s * 100:.0f}"


# ---- phases ----------------------------------------------------------------------------------

@dataclass
class GenStats:
    """A Generate level over its windows: their records pooled, rates the windows' median."""

    ok: list[Rec]
    ttft: list[float]
    lat: list[float]
    tps: float
    rate: float
    errors: Counter[str]

    @classmethod
    def of(cls, ws: list[Window]) -> GenStats:
        ok = [r for w in ws for r in w.measured("generate") if r.ok]
        errors: Counter[str] = Counter()
        for w in ws:
            errors.update(w.errors())
        return cls(ok, [r.t_first - r.t0 for r in ok if r.t_first is not None], [r.t1 - r.t0 for r in ok],
                   statistics.median(w.tokens_per_s() for w in ws), statistics.median(w.rate() for w in ws), errors)


def gen_row(n: int, ws: list[Window], speed: float) -> str:
    """One line of the Generate table: ``n`` callers over the windows ``ws``."""
    g = GenStats.of(ws)
    cpu = cpu_share(ws[0]) if len(ws) == 1 else ""
    return (f"  {n:>7} {g.tps:>7.1f} {speed:>6.2f} {g.rate:>6.2f} {fmt(pct(g.ttft, 50), 2):>11} "
            f"{fmt(pct(g.ttft, 99), 2):>11} {fmt(pct(g.lat, 50), 2):>7} {fmt(pct(g.lat, 99), 2):>7} "
            f"{cpu:>14}  {codes_text(g.errors)}")


async def run_phases(server: Server, args: argparse.Namespace, ref: dict[str, Any], fig: dict[str, Any],
                     report: dict[str, Any]) -> None:
    max_callers = max([*args.route_levels, *args.generate_levels, *args.feedback_levels, args.overload, 1])
    calls = Calls(server.address, math.ceil(max_callers / 16), args)
    try:
        backends = await calls.list_backends()
        print("backends: " + ", ".join(f"{n} ({k}, {s})" for n, s, k in backends))
        report["backends"] = backends
        # A few requests of each kind before any window: one-off costs are nobody's figure.
        stub = calls.stubs[0]
        for p in PROMPTS[:4]:
            await calls.route(stub, p)
        await calls.generate(stub, PROMPTS[0])
        report["rss_after_warmup_mb"] = rss_mb(server.pid)
        decision_ids: list[str] = []
        window = f"{args.duration:g} s per level after {args.warmup:g} s of warm-up"

        # Route
        print(f"\nRoute, closed loop ({window}):")
        print(f"  {'callers':>7} {'routes/s':>9} {'x 1':>6} {'p50 ms':>8} {'p99 ms':>8} {'cpu srv/cli %':>14}  errors")
        rows: dict[int, Window] = {}
        for n in args.route_levels:
            def route_caller(i: int, seq: int, n: int = n) -> Awaitable[Rec]:
                return calls.route(calls.stub(i, n), PROMPTS[(i * 7 + seq) % len(PROMPTS)])
            w = await closed_loop(server, [route_caller] * n, args.warmup, args.duration, args.deadline,
                                  args.max_requests)
            rows[n] = w
            decision_ids += [r.decision_id for r in w.recs if r.ok and r.decision_id]
            lat = [r.ms for r in w.measured("route") if r.ok]
            base = rows[args.route_levels[0]].rate()
            fig[f"route_rps_{n}"] = w.rate()
            fig[f"route_p50_ms_{n}"] = pct(lat, 50)
            fig[f"route_p99_ms_{n}"] = pct(lat, 99)
            report["route"][n] = {"rps": w.rate(), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                                  "errors": dict(w.errors()), "requests": w.issued, "server_rss_mb": w.rss_end_mb,
                                  "server_cpu_s": w.server_cpu_s, "client_cpu_s": w.client_cpu_s, "wall_s": w.wall_s,
                                  "backends": dict(Counter(r.backend for r in w.measured() if r.ok))}
            print(f"  {n:>7} {w.rate():>9.1f} {w.rate() / base if base else math.nan:>6.2f} {fmt(pct(lat, 50)):>8} "
                  f"{fmt(pct(lat, 99)):>8} {cpu_share(w):>14}  {codes_text(w.errors())}", flush=True)
        one = rows[args.route_levels[0]].rate()
        for n in args.route_levels[1:]:
            enc = ""
            if "encoder_batch16_pps" in ref:
                enc = (f"; bare encoder batch 1: {ref['encoder_batch1_pps']:.0f}, batch 16: "
                       f"{ref['encoder_batch16_pps']:.0f} prompts/s")
            print(f"  Route {n} callers: {rows[n].rate():.0f} routes/s "
                  f"({args.route_levels[0]} caller(s): {one:.0f}/s{enc})")

        # Generate
        print(f"\nGenerate, closed loop, max_tokens {args.max_tokens}, temperature 0 ({window}):")
        print(f"  {'callers':>7} {'tok/s':>7} {'x 1':>6} {'req/s':>6} {'ttft p50 s':>11} {'ttft p99 s':>11} "
              f"{'p50 s':>7} {'p99 s':>7} {'cpu srv/cli %':>14}  errors")
        # The machine's speed drifts (by up to 1.5x from one minute to the next here), so with
        # --generate-rounds the levels are measured in turn that many times and each level's
        # speed-up is the median of its ratios to the first level of the same round.
        grows: dict[int, list[Window]] = {n: [] for n in args.generate_levels}
        ratios: dict[int, list[float]] = {n: [] for n in args.generate_levels}
        first = args.generate_levels[0]
        for rnd in range(args.generate_rounds):
            if args.generate_rounds > 1:
                print(f"  round {rnd + 1} of {args.generate_rounds}")
            for n in args.generate_levels:
                def gen_caller(i: int, seq: int, n: int = n) -> Awaitable[Rec]:
                    return calls.generate(calls.stub(i, n), PROMPTS[(i * 5 + seq) % len(PROMPTS)])
                w = await closed_loop(server, [gen_caller] * n, args.warmup, args.duration, args.deadline,
                                      args.max_requests)
                grows[n].append(w)
                decision_ids += [r.decision_id for r in w.recs if r.ok and r.decision_id]
                base = grows[first][-1].tokens_per_s()
                ratios[n].append(w.tokens_per_s() / base if base else math.nan)
                print(gen_row(n, [w], ratios[n][-1]), flush=True)
        if args.generate_rounds > 1:
            print(f"  median of {args.generate_rounds} rounds (speed-up: the median of each round's ratio):")
        for n in args.generate_levels:
            ws = grows[n]
            g = GenStats.of(ws)
            ok, ttft, lat, tps, rate = g.ok, g.ttft, g.lat, g.tps, g.rate
            speed = statistics.median(ratios[n])
            fig[f"gen_tps_{n}"] = tps
            fig[f"gen_rps_{n}"] = rate
            fig[f"gen_speedup_{n}"] = speed
            fig[f"gen_ttft_p50_s_{n}"] = pct(ttft, 50)
            fig[f"gen_ttft_p99_s_{n}"] = pct(ttft, 99)
            fig[f"gen_p99_s_{n}"] = pct(lat, 99)
            report["generate"][n] = {
                "tokens_per_s": tps, "speedup": speed, "rps": rate, "ttft_p50_s": pct(ttft, 50),
                "ttft_p99_s": pct(ttft, 99), "p50_s": pct(lat, 50), "p99_s": pct(lat, 99),
                "mean_tokens": statistics.mean(r.tokens for r in ok) if ok else math.nan,
                "errors": dict(g.errors), "requests": sum(w.issued for w in ws), "server_rss_mb": ws[-1].rss_end_mb,
                "server_cpu_s": sum(w.server_cpu_s for w in ws), "client_cpu_s": sum(w.client_cpu_s for w in ws),
                "wall_s": sum(w.wall_s for w in ws), "backends": dict(Counter(r.backend for r in ok)),
                "rounds": [{"tokens_per_s": w.tokens_per_s(), "speedup": x} for w, x in zip(ws, ratios[n])]}
            if args.generate_rounds > 1:
                print(gen_row(n, ws, speed), flush=True)
        if args.generate_rounds > 1:
            fig["gen_rounds"] = args.generate_rounds
        for n in args.generate_levels[1:]:
            alone = ""
            if n > 1 and "decode_b8_tps" in ref:
                alone = f" (model alone batch 8: {ref['decode_b8_tps']:.0f} tok/s, batch 1: {ref['decode_b1_tps']:.0f})"
            print(f"  Generate {n} callers: {fig[f'gen_tps_{n}']:.1f} tok/s = {fig[f'gen_speedup_{n}']:.2f} x the "
                  f"{first}-caller figure{alone}")

        # Feedback
        if args.feedback_levels and (not args.address or args.write_feedback):
            if not decision_ids:
                for p in PROMPTS:
                    r = await calls.route(stub, p)
                    if r.ok:
                        decision_ids.append(r.decision_id)
            ids = decision_ids
            nxt = 0

            async def fb_caller(i: int, seq: int, n: int) -> Rec:
                nonlocal nxt
                d = ids[nxt % len(ids)]
                nxt += 1
                return await calls.feedback(calls.stub(i, n), d, 1.0 if nxt % 2 else 0.0)

            print(f"\nFeedback by decision id, closed loop ({window}; {len(ids)} distinct ids from the phases "
                  f"above, reused in turn when spent):")
            print(f"  {'callers':>7} {'writes/s':>9} {'x 1':>6} {'p50 ms':>8} {'p99 ms':>8} {'cpu srv/cli %':>14}  errors")
            frows: dict[int, Window] = {}
            for n in args.feedback_levels:
                def fcall(i: int, seq: int, n: int = n) -> Awaitable[Rec]:
                    return fb_caller(i, seq, n)
                w = await closed_loop(server, [fcall] * n, args.warmup, args.duration, args.deadline,
                                      args.max_requests)
                frows[n] = w
                lat = [r.ms for r in w.measured() if r.ok]
                base = frows[args.feedback_levels[0]].rate()
                fig[f"feedback_wps_{n}"] = w.rate()
                fig[f"feedback_p99_ms_{n}"] = pct(lat, 99)
                report["feedback"][n] = {"wps": w.rate(), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                                         "errors": dict(w.errors()), "requests": w.issued,
                                         "server_cpu_s": w.server_cpu_s, "client_cpu_s": w.client_cpu_s,
                                         "wall_s": w.wall_s}
                print(f"  {n:>7} {w.rate():>9.1f} {w.rate() / base if base else math.nan:>6.2f} "
                      f"{fmt(pct(lat, 50)):>8} {fmt(pct(lat, 99)):>8} {cpu_share(w):>14}  "
                      f"{codes_text(w.errors())}", flush=True)
            report["feedback_ids"] = {"distinct": len(ids), "used": nxt}
        elif args.feedback_levels:
            print("\nFeedback: skipped (a running server's datastore; --write-feedback to run it)")

    finally:
        await calls.close()


async def run_overload(server: Server, args: argparse.Namespace, fig: dict[str, Any], report: dict[str, Any]) -> None:
    """Overload: --overload callers against the server (restarted with queues of --overload-queue
    when this run started it)."""
    calls = Calls(server.address, math.ceil(args.overload / 16), args)
    window = f"{args.duration:g} s after {args.warmup:g} s of warm-up"
    try:
        await calls.route(calls.stubs[0], PROMPTS[0])
        await calls.generate(calls.stubs[0], PROMPTS[0])
        n_gen = args.overload_generate if args.overload_generate is not None else max(1, args.overload // 8)
        n_gen = min(n_gen, args.overload)
        n_route = args.overload - n_gen

        def ov_caller(i: int, seq: int) -> Awaitable[Rec]:
            stub = calls.stub(i, args.overload)
            if i < n_gen:
                return calls.generate(stub, PROMPTS[(i * 5 + seq) % len(PROMPTS)])
            return calls.route(stub, PROMPTS[(i * 7 + seq) % len(PROMPTS)])
        print(f"\nOverload: {args.overload} callers ({n_route} Route + {n_gen} Generate), {window}; a rejected "
              "caller waits the retry-after-ms trailer (at most 1 s):")
        w = await closed_loop(server, [ov_caller] * args.overload, args.warmup, args.duration, args.deadline,
                              args.max_requests)
        st = w.measured()
        rej = [r for r in st if r.code == "RESOURCE_EXHAUSTED"]
        other = Counter(r.code for r in st if not r.ok and r.code != "RESOURCE_EXHAUSTED")
        rej_ms = [r.ms for r in rej]
        retry = [r.retry_after_s for r in rej if r.retry_after_s is not None]
        ov: dict[str, Any] = {"callers": args.overload, "route_callers": n_route, "generate_callers": n_gen,
                              "requests": w.issued, "rejected": len(rej),
                              "reject_p50_ms": pct(rej_ms, 50), "reject_p99_ms": pct(rej_ms, 99),
                              "retry_after_p50_s": pct(retry, 50), "other_errors": dict(other),
                              "server_rss_mb": w.rss_end_mb, "server_cpu_s": w.server_cpu_s,
                              "client_cpu_s": w.client_cpu_s, "wall_s": w.wall_s,
                              "cancelled_at_cap": w.extra["cancelled_at_cap"]}
        print(f"  {'':<9} {'seen':>8} {'ok':>6} {'ok/s':>7} {'ok p50':>9} {'ok p99':>9} {'rejected':>9} "
              f"{'rej p99':>9} {'other errors':>13}")
        for kind, unit, scale in (("route", "ms", 1e3), ("generate", "s", 1.0)):
            ks = w.measured(kind)
            ok = [(r.t1 - r.t0) * scale for r in ks if r.ok]
            krej_ms = [r.ms for r in ks if r.code == "RESOURCE_EXHAUSTED"]
            krej = len(krej_ms)
            koth = sum(not r.ok and r.code != "RESOURCE_EXHAUSTED" for r in ks)
            ov[kind] = {"seen": len(ks), "ok": len(ok), "ok_per_s": w.rate(kind), f"ok_p50_{unit}": pct(ok, 50),
                        f"ok_p99_{unit}": pct(ok, 99), "rejected": krej, "reject_p99_ms": pct(krej_ms, 99),
                        "other_errors": koth}
            print(f"  {kind:<9} {len(ks):>8} {len(ok):>6} {w.rate(kind):>7.1f} "
                  f"{fmt(pct(ok, 50), 1 if unit == 'ms' else 2) + ' ' + unit:>9} "
                  f"{fmt(pct(ok, 99), 1 if unit == 'ms' else 2) + ' ' + unit:>9} {krej:>9} "
                  f"{fmt(pct(krej_ms, 99)) + ' ms':>9} {koth:>13}")
        print(f"  RESOURCE_EXHAUSTED: {len(rej)} (answered in p50 {fmt(pct(rej_ms, 50))} ms, "
              f"p99 {fmt(pct(rej_ms, 99))} ms; retry-after p50 {fmt(pct(retry, 50), 2)} s); "
              f"other errors: {sum(other.values())} ({codes_text(other)}) (should be 0); "
              f"server/client CPU {cpu_share(w)} %; the phase took {w.wall_s:.0f} s with the last answers")
        report["overload"] = ov
        fig["overload_ok"] = sum(r.ok for r in st)
        fig["overload_rejected"] = len(rej)
        fig["overload_other_errors"] = sum(other.values())
        fig["overload_reject_p99_ms"] = pct(rej_ms, 99)
        fig["overload_route_ok_p99_ms"] = ov["route"]["ok_p99_ms"]
    finally:
        await calls.close()


# ---- soak ------------------------------------------------------------------------------------

async def run_soak(server: Server, args: argparse.Namespace, fig: dict[str, Any], report: dict[str, Any]) -> None:
    calls = Calls(server.address, max(1, math.ceil(min(args.max_inflight, 256) / 16)), args)
    try:
        stub = calls.stubs[0]
        for p in PROMPTS[:8]:
            await calls.route(stub, p)
        await calls.generate(stub, PROMPTS[0])
        rng = random.Random(args.seed)
        gc.collect()
        gc.freeze()          # as in closed_loop: the client's collections must not pause the measurement
        t_start = time.perf_counter()
        end = t_start + args.soak
        rss: list[tuple[float, float | None]] = [(0.0, rss_mb(server.pid))]
        recs: list[Rec] = []
        inflight: set[asyncio.Task] = set()
        shed = 0
        k = 0
        share = args.soak_generate_share
        max_arrivals = int(args.rate * args.soak * 2) + 10

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(args.rss_every)
                rss.append((time.perf_counter() - t_start, rss_mb(server.pid)))

        def done(t: asyncio.Task) -> None:
            inflight.discard(t)
            if not t.cancelled() and t.exception() is None:
                recs.append(t.result())

        sampler = asyncio.create_task(sample_rss())
        next_t = t_start
        last_report = t_start
        while k < max_arrivals:
            next_t += rng.expovariate(args.rate) if not args.even else 1.0 / args.rate
            if next_t >= end:
                break
            delay = next_t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= args.max_inflight:
                shed += 1
                continue
            is_gen = math.floor((k + 1) * share) > math.floor(k * share)
            s = calls.stubs[k % len(calls.stubs)]
            task = asyncio.create_task(calls.generate(s, PROMPTS[k % len(PROMPTS)]) if is_gen
                                       else calls.route(s, PROMPTS[k % len(PROMPTS)]))
            inflight.add(task)
            task.add_done_callback(done)
            k += 1
            if time.perf_counter() - last_report >= 60:
                last_report = time.perf_counter()
                errs = sum(not r.ok for r in recs)
                print(f"  soak {last_report - t_start:5.0f} s: {k} sent, {len(recs)} answered, {errs} errors, "
                      f"{len(inflight)} in flight, {shed} shed, server RSS {fmt(rss_mb(server.pid), 0)} MB",
                      flush=True)
        sent_s = time.perf_counter() - t_start
        if inflight:
            await asyncio.wait(set(inflight), timeout=args.deadline + 10)
        late = list(inflight)
        for t in late:
            t.cancel()
        sampler.cancel()
        await asyncio.gather(sampler, *late, return_exceptions=True)
        rss.append((time.perf_counter() - t_start, rss_mb(server.pid)))
    finally:
        await calls.close()

    head = t_start + args.soak_head
    out: dict[str, Any] = {"seconds": args.soak, "rate": args.rate, "sent": k, "answered": len(recs), "shed": shed,
                           "achieved_rate": k / sent_s if sent_s else math.nan, "rss_mb": rss}
    print(f"\nSoak: {args.soak:g} s at {args.rate:g} requests/s ({'evenly spaced' if args.even else 'Poisson'}), "
          f"{share:.0%} Generate; {k} sent, {shed} shed by the client (more than {args.max_inflight} in flight)")
    print(f"  {'':<9} {'sent':>6} {'ok':>6} {'p50':>10} {'p99 first ' + str(int(args.soak_head)) + ' s':>16} "
          f"{'p99 all':>10} {'ratio':>6}  errors")
    for kind, unit, scale in (("route", "ms", 1e3), ("generate", "s", 1.0)):
        ks = [r for r in recs if r.kind == kind]
        ok = [r for r in ks if r.ok]
        lat = [(r.t1 - r.t0) * scale for r in ok]
        first = [(r.t1 - r.t0) * scale for r in ok if r.t0 < head]
        p_all, p_first = pct(lat, 99), pct(first, 99)
        ratio = p_all / p_first if first and p_first else math.nan
        errs = Counter(r.code for r in ks if not r.ok)
        out[kind] = {"sent": len(ks), "ok": len(ok), f"p50_{unit}": pct(lat, 50), f"p99_first_{unit}": p_first,
                     f"p99_all_{unit}": p_all, "p99_ratio": ratio, "errors": dict(errs)}
        nd = 1 if unit == "ms" else 2
        print(f"  {kind:<9} {len(ks):>6} {len(ok):>6} {fmt(pct(lat, 50), nd) + ' ' + unit:>10} "
              f"{fmt(p_first, nd) + ' ' + unit:>16} {fmt(p_all, nd) + ' ' + unit:>10} {fmt(ratio, 2):>6}  "
              f"{codes_text(errs)}")
        short = "gen" if kind == "generate" else kind
        fig[f"soak_{short}_p99_{unit}_first"] = p_first
        fig[f"soak_{short}_p99_{unit}_all"] = p_all
        fig[f"soak_{short}_p99_ratio"] = ratio
    r0, r1 = rss[0][1], rss[-1][1]
    growth = (r1 - r0) / r0 * 100 if r0 and r1 else math.nan
    print(f"  server RSS: {fmt(r0, 0)} MB at start, {fmt(r1, 0)} MB at the end ({fmt(growth, 1)}%), "
          f"peak {fmt(max((v for _, v in rss if v is not None), default=None), 0)} MB")
    out["rss_growth_pct"] = growth
    report["soak"] = out
    fig["soak_sent"] = k
    fig["soak_errors"] = sum(not r.ok for r in recs)
    fig["soak_shed"] = shed
    fig["soak_rss_start_mb"] = r0
    fig["soak_rss_end_mb"] = r1
    fig["soak_rss_growth_pct"] = growth


# ---- main ------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--server-pid", type=int, help="with --address: its process, for RSS and CPU")
    ap.add_argument("--write-feedback", action="store_true", help="with --address: run the Feedback phase too")
    ap.add_argument("--server-args", default="", help="extra arguments of `caprouter serve` (one string)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for health SERVING")
    ap.add_argument("--duration", type=float, help="seconds of each measured window (default 15)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up before each window (default 3)")
    ap.add_argument("--route-levels", help="Route callers (default 1,4,16,64)")
    ap.add_argument("--generate-levels", help="Generate callers (default 1,4,8,16)")
    ap.add_argument("--generate-rounds", type=int, default=1,
                    help="measure the Generate levels this many times in turn; report medians (the "
                         "machine's speed drifts between windows)")
    ap.add_argument("--feedback-levels", help="Feedback callers (default 1,16; '' to skip)")
    ap.add_argument("--overload", type=int, help="callers of the overload phase (default 128; 0 to skip)")
    ap.add_argument("--overload-generate", type=int, help="of those, on Generate (default 1 in 8)")
    ap.add_argument("--generate-allow", default="",
                    help="Generate only on these backends (comma-separated; default: wherever the router sends "
                         "each prompt, which splits the callers over the backends, each batching its share)")
    ap.add_argument("--overload-queue", type=int, default=16,
                    help="the overload phase runs on a server whose routing and backend queues hold this many "
                         "(0: the same server as the other phases)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--deadline", type=float, default=60.0, help="per-call deadline, seconds")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap on the requests of one level")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--reference", action="store_true", help="measure the reference even with --quick")
    ap.add_argument("--ref-runs", type=int, default=3, help="decode runs per batch size of the reference")
    ap.add_argument("--ref-seconds", type=float, default=3.0, help="seconds per encoder batch size of the reference")
    ap.add_argument("--quick", action="store_true", help="smoke run: levels 1,4, 3 s windows, no reference")
    ap.add_argument("--soak", type=float, help="soak mode: open-loop arrivals for this many seconds")
    ap.add_argument("--rate", type=float, default=20.0, help="soak: arrivals per second")
    ap.add_argument("--soak-generate-share", type=float, default=0.05, help="soak: share of Generate arrivals")
    ap.add_argument("--soak-head", type=float, default=60.0, help="soak: seconds of the 'first minute'")
    ap.add_argument("--even", action="store_true", help="soak: evenly spaced arrivals (default Poisson)")
    ap.add_argument("--max-inflight", type=int, default=512, help="soak: requests in flight at most")
    ap.add_argument("--rss-every", type=float, default=10.0, help="soak: seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-keys", action="store_true",
                    help="the server requires API keys (a key file of its own) and every call sends one: "
                         "what authentication costs, against a run without")
    ap.add_argument("--api-key-file", help="with --address: the key to send (a server with keys)")
    ap.add_argument("--json", default=str(OUT / "load.json"))
    args = ap.parse_args()
    q = args.quick
    args.duration = args.duration if args.duration is not None else (3.0 if q else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 3.0)
    args.route_levels = levels(args.route_levels if args.route_levels is not None else ("1,4" if q else "1,4,16,64"))
    args.generate_levels = levels(args.generate_levels if args.generate_levels is not None
                                  else ("1,4" if q else "1,4,8,16"))
    args.feedback_levels = levels(args.feedback_levels if args.feedback_levels is not None else ("1,4" if q else "1,16"))
    args.overload = args.overload if args.overload is not None else (32 if q else 128)
    if (q or args.soak) and not args.reference:
        args.skip_reference = True
    if args.generate_rounds < 1:
        ap.error("--generate-rounds must be >= 1")
    if not args.route_levels or not args.generate_levels:
        ap.error("--route-levels and --generate-levels need at least one level each")
    if args.soak is not None and (args.soak <= 0 or args.rate <= 0):
        ap.error("--soak and --rate must be > 0")
    args.token = Path(args.api_key_file).read_text().strip() if args.api_key_file else None
    if args.api_keys and args.address:
        ap.error("--api-keys starts a server with keys; for a running one, send its key with --api-key-file")
    return args


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # SIGTERM ends the run through the finally below (the server is stopped), as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    fig: dict[str, Any] = {}
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "route": {}, "generate": {},
                              "feedback": {}, "prompts": len(PROMPTS)}
    ref: dict[str, Any] = {}
    if not args.skip_reference:
        t = time.perf_counter()
        ref = reference(PROMPTS, args.max_tokens, args.ref_runs, args.ref_seconds)
        print(f"reference, this process before the server starts (torch threads {ref['torch_threads']}, "
              f"{time.perf_counter() - t:.0f} s):")
        print(f"  bare encoder {ref['encoder']}: batch 1: {ref['encoder_batch1_pps']:.1f} prompts/s, batch 16: "
              f"{ref['encoder_batch16_pps']:.1f} prompts/s")
        print(f"  model alone {ref['model']}, greedy over a DynamicCache, {args.max_tokens} tokens: "
              f"batch 1: {ref['decode_b1_tps']:.1f} tok/s, batch 8: {ref['decode_b8_tps']:.1f} tok/s (decode steps; "
              f"with the prefill: {ref['decode_b1_with_prefill_tps']:.1f} and {ref['decode_b8_with_prefill_tps']:.1f})",
              flush=True)
        report["reference"] = ref
        for k in ("encoder_batch1_pps", "encoder_batch16_pps", "decode_b1_tps", "decode_b8_tps"):
            fig[k] = ref[k]

    server = Server(args)
    try:
        server.start()
        rss0 = rss_mb(server.pid)
        where = f"started by this run, pid {server.pid}, log {server.log}" if server.proc else "running server"
        print(f"server {server.address} ({where}): SERVING after {server.ready_s:.0f} s, RSS {fmt(rss0, 0)} MB",
              flush=True)
        report["server"] = {"address": server.address, "pid": server.pid, "ready_s": server.ready_s,
                            "rss_start_mb": rss0, "started_here": server.proc is not None}
        if args.soak:
            asyncio.run(run_soak(server, args, fig, report))
        else:
            asyncio.run(run_phases(server, args, ref, fig, report))
        if args.overload > 0 and not args.soak:
            if server.proc is not None and args.overload_queue:
                # Queues sized for --overload-queue callers: a fresh server, the same models.
                q = args.overload_queue
                tight = Server(args, f"--set routing.max_pending={q} --set 'backends.*.options.max_queue={q}'")
                print(f"\noverload server: routing.max_pending={q}, every backend's max_queue={q} "
                      f"(max_batch as configured)", flush=True)
                try:
                    tight.start()
                    asyncio.run(run_overload(tight, args, fig, report))
                finally:
                    tight.stop()
            else:
                asyncio.run(run_overload(server, args, fig, report))
        rss1 = rss_mb(server.pid)
        report["server"]["rss_end_mb"] = rss1
        if not server.alive():
            print(f"the server died during the run (exit code {server.proc.returncode if server.proc else '?'}):\n"
                  + server.log_tail())
            fig["server_died"] = 1
        print(f"server RSS: {fmt(rss0, 0)} MB at start, {fmt(rss1, 0)} MB at the end")
        fig["rss_start_mb"] = rss0
        fig["rss_end_mb"] = rss1
    finally:
        server.stop()
    report["figures"] = fig
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str, allow_nan=True) + "\n")
    print(f"wrote {path}")

    def kv(v: Any) -> str:
        if v is None:
            return "nan"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        return str(v)
    print(" ".join(f"{k}={kv(v)}" for k, v in fig.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
