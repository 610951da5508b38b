"""Building backends from the configuration: a registry of backend kinds, each claiming the models it serves.

A configured model is built by the first registered kind that claims it: local models (`local/NAME`), then
the direct HTTP transport (OpenAI-compatible providers with an `api_base`, or `transport: http`), then
litellm (every other provider). A new kind of backend joins by registering itself; nothing else changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.settings import ConfigError, LocalServingConfig, ModelConfig, RedisConfig
from workers.backend import Backend
from workers.http_backend import HTTPBackend
from workers.litellm_backend import LiteLLMBackend
from workers.remote import RemoteModel, speaks_openai

if TYPE_CHECKING:
    from workers.local.backend import LocalBackend

log = logging.getLogger("frugal.backends")


@dataclass(frozen=True)
class BackendKind:
    """One way of serving a configured model."""

    name: str
    #: Whether this kind serves `model` (kinds are asked in registration order).
    claims: Callable[[ModelConfig], bool]
    build: Callable[[ModelConfig], Backend]


class BackendRegistry:
    """The backend kinds a gateway can build, in the order they are asked."""

    def __init__(self, kinds: Iterable[BackendKind] = ()) -> None:
        self._kinds: list[BackendKind] = []
        for kind in kinds:
            self.register(kind)

    def register(self, kind: BackendKind, *, first: bool = False) -> None:
        """Add `kind`, asked after those already registered (before them with `first`)."""
        if any(k.name == kind.name for k in self._kinds):
            raise ValueError(f"a backend kind named {kind.name!r} is already registered")
        self._kinds.insert(0 if first else len(self._kinds), kind)

    def __contains__(self, name: object) -> bool:
        """Whether a kind named `name` is registered."""
        return any(k.name == name for k in self._kinds)

    def kind_for(self, model: ModelConfig) -> BackendKind:
        for kind in self._kinds:
            if kind.claims(model):
                return kind
        raise ConfigError(f"model {model.name!r}: no backend serves {model.backend!r} "
                          f"(transport {model.transport}; kinds: {', '.join(k.name for k in self._kinds)})")

    def build(self, model: ModelConfig) -> Backend:
        kind = self.kind_for(model)
        log.info("model %s: %s via %s", model.name, model.backend, kind.name)
        return kind.build(model)


def remote_model(model: ModelConfig) -> RemoteModel:
    """A remote model's settings, with its secrets read from the environment (a missing key is logged)."""
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
    return remote


def isolates_tenants(serving: LocalServingConfig, cache_scope: str = "key") -> bool:
    """Whether a local model salts its prefix cache with the tenant: `serving.isolate_tenants` when set, else
    as the response cache does (`cache.scope`): isolated unless the cache is shared by every key."""
    if serving.isolate_tenants is not None:
        return serving.isolate_tenants
    return cache_scope != "shared"


def build_local_backend(model: ModelConfig, provider: str = "auto", cache_scope: str = "key") -> LocalBackend:
    """A local ONNX model, built from its packaged source on first use (logged: it takes seconds); `provider`:
    auto, cpu or cuda (ONNX Runtime's execution provider); `cache_scope`: the config's `cache.scope`, which
    decides whether tenants share cached prefixes when `serving.isolate_tenants` is unset."""
    from workers.local.backend import LocalBackend  # noqa: PLC0415 (onnxruntime, only when a local model is served)
    from workers.local.catalog import DEFAULT_QUANT, resolve  # noqa: PLC0415
    from workers.local.engine import EngineConfig  # noqa: PLC0415

    name = model.backend.removeprefix("local/")
    if model.model_dir:
        folder = Path(model.model_dir)
    else:
        try:
            folder = resolve(name, model.quant or DEFAULT_QUANT, compute=model.compute,
                             progress=lambda step: log.info("building local model %s: %s", name, step))
        except FileNotFoundError as exc:  # e.g. a catalogue model not fetched yet: the message says how
            raise ConfigError(f"model {model.name!r}: {exc}") from exc
    serving = model.serving
    engine = EngineConfig(max_batch=serving.max_batch, max_queue=serving.max_queue,
                          prefill_chunk=serving.prefill_chunk, max_context=serving.max_context,
                          prefix_cache_bytes=int(serving.prefix_cache_mib * 1024 * 1024),
                          prefix_block_tokens=serving.prefix_block_tokens)
    return LocalBackend(model.name, folder, price=model.price, threads=model.threads, engine=engine,
                        isolate_tenants=isolates_tenants(serving, cache_scope), provider=provider)


def pooled_kind(redis: RedisConfig) -> BackendKind:
    """Local models with a `pool`: served by Celery workers (`frugal worker`) through `redis`'s broker and state."""

    def build(model: ModelConfig) -> Backend:
        from workers.pool.backend import PooledBackend, PoolSettings  # noqa: PLC0415 (Celery, only when pooled)

        pool = model.pool
        assert pool is not None and redis.broker and redis.state  # checked when the config was validated
        settings = PoolSettings(model.queue, max_queue_depth=pool.max_queue_depth, max_wait_s=pool.max_wait_s,
                                expires_s=pool.expires_s, enqueue_timeout_s=pool.enqueue_timeout_s,
                                worker_timeout_s=pool.worker_timeout_s, probe_interval_s=pool.probe_interval_s,
                                redis_timeout_s=redis.timeout_s)
        return PooledBackend(model.name, settings, broker_url=redis.broker, state_url=redis.state, price=model.price)

    return BackendKind("pooled", lambda m: m.pool is not None, build)


def _direct_http(model: ModelConfig) -> bool:
    """`transport: http`, or `auto` for a provider that speaks OpenAI's protocol unchanged at an `api_base`."""
    if model.is_local:
        return False
    return model.transport == "http" or (model.transport == "auto" and speaks_openai(model.backend)
                                         and bool(model.resolved_api_base()))


def local_kind(cache_scope: str = "key") -> BackendKind:
    """Local models served in this process; `cache_scope` as for `build_local_backend`."""
    return BackendKind("local", lambda m: m.is_local, lambda m: build_local_backend(m, cache_scope=cache_scope))


LOCAL = local_kind()
HTTP = BackendKind("http", _direct_http, lambda m: HTTPBackend(remote_model(m)))
LITELLM = BackendKind("litellm", lambda m: not m.is_local and m.transport in ("litellm", "auto"),
                      lambda m: LiteLLMBackend(remote_model(m)))


def default_backends(cache_scope: str = "key") -> BackendRegistry:
    """The kinds every gateway has: local, direct HTTP, litellm. `cache_scope` is the config's `cache.scope`
    (local models isolate tenants unless it is "shared" or `serving.isolate_tenants` says otherwise)."""
    return BackendRegistry([local_kind(cache_scope), HTTP, LITELLM])
