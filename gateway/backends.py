"""Building backends from the configuration: the one place that picks a transport for a model."""

from __future__ import annotations

import logging

from gateway.settings import ConfigError, FrugalConfig, ModelConfig
from router.cascade import CascadeRoute
from router.optimizer import Tier
from workers.backend import Backend
from workers.http_backend import HTTPBackend
from workers.litellm_backend import LiteLLMBackend
from workers.remote import OPENAI_COMPATIBLE, RemoteModel

log = logging.getLogger("frugal.backends")

def transport_for(model: ModelConfig) -> str:
    if model.transport != "auto":
        return model.transport
    provider = model.backend.split("/", 1)[0] if "/" in model.backend else "openai"
    if provider in OPENAI_COMPATIBLE and model.resolved_api_base():
        return "http"
    return "litellm"


def build_local_backend(model: ModelConfig) -> Backend:
    """A local ONNX model, built from its packaged source on first use (logged: it takes seconds)."""
    from pathlib import Path  # noqa: PLC0415

    from workers.local.backend import LocalBackend  # noqa: PLC0415
    from workers.local.catalog import DEFAULT_QUANT, resolve  # noqa: PLC0415
    from workers.local.engine import EngineConfig  # noqa: PLC0415

    name = model.backend.removeprefix("local/")
    if model.model_dir:
        folder = Path(model.model_dir)
    else:
        folder = resolve(name, model.quant or DEFAULT_QUANT, compute=model.compute,
                         progress=lambda step: log.info("building local model %s: %s", name, step))
    serving = model.serving
    engine = EngineConfig(max_batch=serving.max_batch, max_queue=serving.max_queue,
                          prefill_chunk=serving.prefill_chunk, max_context=serving.max_context,
                          prefix_cache_bytes=int(serving.prefix_cache_mib * 1024 * 1024),
                          prefix_block_tokens=serving.prefix_block_tokens)
    return LocalBackend(model.name, folder, price=model.price, threads=model.threads, engine=engine,
                        isolate_tenants=serving.isolate_tenants)


def build_backend(model: ModelConfig) -> Backend:
    if model.is_local:
        return build_local_backend(model)
    remote = RemoteModel(
        name=model.name,
        litellm_model=model.backend,
        price=model.price,
        api_base=model.resolved_api_base(),
        api_key=model.resolved_api_key(),
        missing_key_env=model.api_key_env if model.api_key_env and model.resolved_api_key() is None else None,
    )
    if remote.missing_key_env:
        log.warning("model %s: environment variable %s is not set; its requests will fail until it is",
                    model.name, model.api_key_env)
    transport = transport_for(model)
    log.info("model %s: %s via %s", model.name, model.backend, transport)
    if transport == "http":
        return HTTPBackend(remote)
    return LiteLLMBackend(remote)


def build_cascades(config: FrugalConfig) -> dict[str, CascadeRoute]:
    """The cascade routes, each with its scorer loaded (ONNX Runtime sessions)."""
    from scorer.runtime import OnnxScorer, ScorerError  # noqa: PLC0415 - onnxruntime only when needed

    routes: dict[str, CascadeRoute] = {}
    scorers: dict[str, OnnxScorer] = {}
    for route in config.routes:
        if route.kind != "cascade":
            continue
        folder = str(route.scorer)
        try:
            scorer = scorers.get(folder) or OnnxScorer(folder)
        except ScorerError as exc:
            raise ConfigError(f"route {route.name!r}: {exc}") from exc
        scorers[folder] = scorer
        unknown = [t.model for t in route.tiers[:-1] if not scorer.knows(t.model)]
        if unknown:
            raise ConfigError(f"route {route.name!r}: the scorer in {folder} was not trained for "
                              f"{', '.join(unknown)} (every tier but the last is scored)")
        tiers = tuple(Tier(t.model, t.threshold if i < len(route.tiers) - 1 else None)
                      for i, t in enumerate(route.tiers))
        routes[route.name] = CascadeRoute(route.name, tiers, scorer)
        log.info("route %s: cascade %s", route.name,
                 " -> ".join(f"{t.model}" + (f" (>= {t.threshold:.3f})" if t.threshold is not None else "")
                             for t in tiers))
    return routes
