"""The composition root: ``build_app(config)`` builds and wires every component."""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import BACKENDS, register_builtin_backends
from backends.base import Backend
from backends.route_only import RouteOnlyBackend
from backends.shared_base import share_batches
from datastore import DATASTORES
from datastore.base import Datastore
from datastore.log import AppendLog
from datastore.storage import RecordLog, Storage, open_storage
from datastore.store import AnnSettings
from encoders import ENCODERS, register_builtin_encoders
from encoders.base import PromptEncoder
from router import __version__
from router.core.compute import Compute, ComputeThread
from router.core.config import AppConfig, BackendConfig, CostModelConfig, builtin_data, caprouter_home
from router.prediction import artifact as art
from router.serving.access import Access, AuditLog, SpendLedger
from router.serving.keys import KeyFile
from router.serving.registrations import log_path
from router.serving.service import RouterService
from router.serving.telemetry import PrometheusTelemetry, Telemetry
from router.serving.tracing import tracer_provider

log = logging.getLogger(__name__)

BackendFactory = Callable[[AppConfig, Compute, PromptEncoder], dict[str, Backend]]


def build_backends(config: AppConfig, compute: Compute | None = None,
                   encoder: PromptEncoder | None = None) -> dict[str, Backend]:
    """Construct (not load) every configured backend, found in the registry by kind. ``encoder``
    is the router's prompt encoder, for kinds that gate on the prompt embedding (moe)."""
    register_builtin_backends()
    return {b.name: BACKENDS.get(b.kind)(b, cost_unit=config.routing.cost_unit, models_dir=config.models_dir(),
                                         compute=compute, encoder=encoder)
            for b in config.backends}


def build_encoder(config: AppConfig, compute: Compute | None = None) -> PromptEncoder:
    """The configured PromptEncoder, found in the registry by kind (loads the model)."""
    register_builtin_encoders()
    e = config.encoder
    extra = {} if e.runtime == "torch" else {"runtime": e.runtime, "cache_dir": config.models_dir()}
    encoder: PromptEncoder = ENCODERS.get(e.kind)(e.model_path, max_tokens=e.max_tokens, batch_size=e.batch_size,
                                                  device=e.device, compute=compute, **extra)
    return encoder


def encoder_settings(config: AppConfig) -> str:
    """What, besides the encoder's model id, makes its embeddings differ: part of the key of the
    datastore snapshot, so a change re-embeds the outcomes."""
    e = config.encoder
    # ONNX fp32 computes torch's embeddings (to 2e-7): both share a snapshot. int8 does not.
    return f"max_tokens={e.max_tokens}" + (f"|runtime={e.runtime}" if e.runtime == "onnx-int8" else "")


def open_datastore(config: AppConfig, encoder: PromptEncoder, *, progress: bool = False,
                   artifact: art.Artifact | None = None, log: RecordLog | None = None) -> Datastore:
    """Load (or build) the datastore snapshot of the configured outcomes (or of a trained
    artifact's outcomes) and replay its feedback (``log``: the system of record's stream; None: a
    file log in the state folder)."""
    ds = config.datastore
    base = None
    if artifact is not None:
        # The neighbourhood `caprouter train` chose and trained the router's inputs at.
        ds = ds.model_copy(update=artifact.manifest.get("datastore", {}))
        base = (artifact.embeddings, artifact.records,
                f"{artifact.manifest['data']['sha256']}|{artifact.manifest['created_unix']}")
    return DATASTORES.get("faiss-knn").open(
        state_dir(config), encoder, [] if base else outcome_files(config), k=ds.k, prior_strength=ds.prior_strength,
        temperature=ds.temperature, encoder_settings=encoder_settings(config), progress=progress,
        base=base, feedback_log=log,
        ann=AnnSettings(ds.ann, ds.ann_min_size, ds.hnsw_m, ds.hnsw_ef_search, ds.hnsw_ef_construction,
                        ds.ivf_nprobe))


def route_only_backends(config: AppConfig, artifact: art.Artifact,
                        configured: dict[str, Backend]) -> dict[str, Backend]:
    """A route-only backend for every backend of the artifact that the config does not define,
    priced at its mean cost per request in the training data."""
    out: dict[str, Backend] = {}
    for name in artifact.backends:
        if name not in configured:
            cost = CostModelConfig(kind="per_request", per_request=artifact.manifest["cost"]["mean_per_request"][name])
            out[name] = RouteOnlyBackend(BackendConfig(name=name, kind="route-only", cost=cost),
                                         cost_unit=config.routing.cost_unit)
    return out


def storage_url(config: AppConfig) -> str:
    """The system of record's URL: ``storage.url``, else SQLite in the datastore's state folder."""
    return config.storage.url or f"sqlite:///{(state_dir(config) / 'caprouter.db').resolve()}"


def _read_file_log(path: Path) -> list[dict[str, Any]]:
    log_ = AppendLog.open(path)
    try:
        return log_.replayed
    finally:
        log_.close()


def open_system_of_record(config: AppConfig) -> Storage:
    """Open (and migrate) the system of record, and import, once, the file logs an earlier version
    kept in the state folder: feedback, registrations, spend."""
    storage = open_storage(storage_url(config))
    state = state_dir(config)
    for stream, path in (("feedback", state / "feedback.log"), ("registry", log_path(state)),
                         ("spend", config.auth.spend_log_path())):
        storage.import_file_log(stream, path, _read_file_log)
    return storage


def outcome_files(config: AppConfig) -> list[Path]:
    return [Path(p) for p in config.datastore.outcomes] or [builtin_data("aptitude_outcomes.jsonl")]


def state_dir(config: AppConfig) -> Path:
    if config.datastore.state_dir:
        return Path(config.datastore.state_dir).expanduser()
    # Keyed by which files feed the store (not their contents), so feedback survives a rebuild
    # of the snapshot when the outcome files are edited.
    sources = [Path(config.artifact)] if config.artifact else outcome_files(config)
    key = hashlib.sha256("\n".join(str(p.resolve()) for p in sources).encode()).hexdigest()[:12]
    return caprouter_home() / "datastore" / key


def default_telemetry() -> Telemetry:
    """Prometheus metrics when prometheus_client is installed, else none."""
    try:
        return PrometheusTelemetry()
    except ImportError:
        return Telemetry()


@dataclass
class App:
    """Everything ``caprouter serve`` runs, wired from one config. ``load`` does the slow part
    (models, datastore) so that a server can answer health checks while it happens."""

    config: AppConfig
    service: RouterService | None = None
    loading_detail: str = "not started"
    compute: ComputeThread = field(default_factory=ComputeThread)
    # Builds the dispatch targets; default: in-process backends from the registry. Ray mode
    # passes one that returns adapters around Serve deployment handles.
    backend_factory: BackendFactory | None = None
    telemetry: Telemetry = field(default_factory=default_telemetry)
    keys: KeyFile = field(init=False)    # API keys (config.auth); read on every authentication
    storage: Storage | None = None       # the system of record, opened by load
    _backends: dict[str, Backend] = field(default_factory=dict)
    # Where spans go (router/serving/tracing.py); None: what config.tracing asks for.
    tracer_provider: Any = None
    _owns_tracer: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.keys = KeyFile(self.config.auth.keys_path(), required=self.config.auth.required)
        self._owns_tracer = self.tracer_provider is None      # one handed in is its owner's to shut down
        if self.tracer_provider is None:
            self.tracer_provider = tracer_provider(self.config.tracing)

    @property
    def ready(self) -> bool:
        return self.service is not None

    async def load(self, *, progress: bool = False) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.loading_detail = "loading the prompt encoder"
        encoder = await loop.run_in_executor(None, lambda: self.compute.run(build_encoder, cfg, self.compute))
        await loop.run_in_executor(None, encoder.encode, ["warm-up: the first forward pays one-off costs"])
        artifact = capability = None
        if cfg.artifact:
            self.loading_detail = "loading the router artifact"
            path = Path(cfg.artifact)
            artifact = await loop.run_in_executor(None, lambda: self.compute.run(
                art.load, path, embedder_id=encoder.model_id, dim=encoder.dim))
            capability = artifact.capability(self.compute)
        self.loading_detail = "opening the system of record"
        storage = self.storage = await loop.run_in_executor(None, open_system_of_record, cfg)
        self.loading_detail = "loading the datastore"
        store = await loop.run_in_executor(None, lambda: open_datastore(cfg, encoder, progress=progress,
                                                                        artifact=artifact,
                                                                        log=storage.stream("feedback")))
        self.loading_detail = "loading backends"
        self._backends = (self.backend_factory or build_backends)(cfg, self.compute, encoder)
        if artifact is not None:
            self._backends.update(route_only_backends(cfg, artifact, self._backends))
        for b in self._backends.values():
            self.loading_detail = f"loading backend {b.name}"
            await b.load()
        # Width-pruned codes decode in their base model's batch (backends/shared_base.py).
        await loop.run_in_executor(None, self.compute.run, share_batches, self._backends)
        access = Access(cfg.auth, lambda: SpendLedger(storage.stream("spend")), AuditLog(cfg.auth.audit_path()))
        if self.keys.enabled():
            await loop.run_in_executor(None, lambda: access.ledger)     # replay what keys spent, now
        service = RouterService(cfg, encoder, store, self._backends, capability=capability, telemetry=self.telemetry,
                                access=access, tracer=self.tracer_provider.get_tracer("caprouter", __version__))
        self.loading_detail = "restoring onboarded backends"
        restored = await loop.run_in_executor(None, service.attach_registry, storage.stream("registry"))
        if restored:
            log.info("restored %d onboarded backend(s)", restored)
        if cfg.storage.follow_ms > 0:
            service.start_following(cfg.storage.follow_ms / 1e3)
        self.service = service
        self.loading_detail = "ready"
        log.info("caprouter ready: %d backends, %d outcomes in the datastore", len(self._backends), len(store))

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()
        else:
            for b in self._backends.values():
                await b.close()
        if self.storage is not None:
            self.storage.close()
        self.compute.shutdown()
        shutdown = getattr(self.tracer_provider, "shutdown", None)
        if self._owns_tracer and shutdown is not None:
            # Exports what is buffered (the spans of requests cut off by the close too): blocking.
            await asyncio.get_running_loop().run_in_executor(None, shutdown)


def build_app(config: AppConfig, *, tracer_provider: Any = None) -> App:
    """The composition root. Nothing is loaded until ``await app.load()``. ``tracer_provider``:
    where spans go (default: what ``config.tracing`` asks for)."""
    return App(config, tracer_provider=tracer_provider)
