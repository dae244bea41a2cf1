"""`caprouter aptitude`: run the configured backends on the suite and write their outcomes."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from router.core.compute import ComputeThread
from router.core.config import AppConfig
from router.core.errors import ConfigError
from router.offline.aptitude.runner import run_suite
from router.serving.app import build_backends, build_encoder
from router.serving.registrations import load_suite, suite_path


def run(config: AppConfig, out: Path, *, only: list[str] | None = None, limit: int | None = None,
        progress: bool = True) -> dict[str, dict[str, float]]:
    compute = ComputeThread()
    # Backends that gate on the prompt embedding (moe) embed with the router's encoder.
    encoder = compute.run(build_encoder, config, compute)
    backends = build_backends(config, compute, encoder)
    if only:
        missing = sorted(set(only) - set(backends))
        if missing:
            raise ConfigError(f"unknown backend(s) {', '.join(missing)}; configured: {', '.join(backends)}")
        backends = {n: backends[n] for n in only}
    items = load_suite(suite_path(config.aptitude.suite))
    if limit:
        items = items[:limit]

    async def go() -> dict[str, dict[str, float]]:
        for b in backends.values():
            await b.load()
        try:
            return await run_suite(list(backends.values()), items, out, max_tokens=config.aptitude.max_tokens,
                                   progress=progress)
        finally:
            for b in backends.values():
                await b.close()
            compute.shutdown()

    summary = asyncio.run(go())
    print(json.dumps(summary, indent=2))
    return summary
