"""Route-only backends: models caprouter decides for but does not call (the app calls them)."""
from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from backends.base import BACKENDS, Backend, Finished, GenerationRequest, Status, TextChunk
from router.core.config import BackendConfig
from router.core.costs import CostModel
from router.core.errors import FailedPrecondition


@BACKENDS.register("route-only")
class RouteOnlyBackend(Backend):
    kind = "route-only"

    def __init__(self, cfg: BackendConfig, *, cost_unit: str, models_dir: Path | None = None, compute: Any = None,
                 encoder: Any = None) -> None:
        self.name = cfg.name
        self.capabilities_config = cfg.capabilities
        self.description = cfg.description or "route-only: caprouter decides, the app calls the model itself"
        self._cost = CostModel.from_config(cfg.cost, cost_unit)

    async def load(self) -> None:
        pass

    def status(self) -> tuple[Status, str]:
        return Status.READY, "route-only (decisions only; no dispatch)"

    def cost_model(self) -> CostModel:
        return self._cost

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]:
        raise FailedPrecondition(
            f"backend {self.name!r} is route-only: caprouter can choose it but cannot call it. Use Route and call "
            f"the model yourself, or exclude it from Generate with denied_backends=[{self.name!r}]")
        yield  # pragma: no cover - makes this an async generator
