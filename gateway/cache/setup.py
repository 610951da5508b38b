"""Building the response cache the configuration asks for."""

from __future__ import annotations

import logging

from gateway.cache.response_cache import ResponseCache, SemanticLayer
from gateway.cache.store import MemoryResponseStore, RedisResponseStore, ResponseStore
from gateway.settings import CacheConfig

log = logging.getLogger("frugal.cache")


def build_response_cache(config: CacheConfig) -> ResponseCache | None:
    """The cache for `config`, or None when every cache is off. The semantic layer loads the MiniLM
    encoder (building it on first use, torch-free: docs/local.md)."""
    if not config.exact.enabled and not config.semantic.enabled:
        return None
    store: ResponseStore
    if config.redis_url:
        store = RedisResponseStore(config.redis_url, prefix=config.redis_prefix + "cache:")
    else:
        store = MemoryResponseStore(config.exact.max_entries, int(config.exact.max_mib * 1024 * 1024))
    semantic = _semantic_layer(config) if config.semantic.enabled else None
    log.info("response cache: exact in %s%s%s", "Redis" if config.redis_url else "process",
             f", semantic at similarity >= {semantic.threshold:.3f}" if semantic else "",
             " with the verifier" if semantic and semantic.verifier_threshold is not None else "")
    return ResponseCache(store, ttl_s=config.exact.ttl_s, only_deterministic=config.exact.only_deterministic,
                         shared=config.scope == "shared", semantic=semantic)


def _semantic_layer(config: CacheConfig) -> SemanticLayer:
    from gateway.cache.embedder import Embedder  # noqa: PLC0415 (loads ONNX Runtime and the encoder)
    from gateway.cache.semantic_index import DEFAULT_SIMILARITY_THRESHOLD, MemorySemanticIndex  # noqa: PLC0415
    from gateway.cache.semantic_redis import RedisSemanticIndex  # noqa: PLC0415 (the redis client)

    semantic = config.semantic
    index = (RedisSemanticIndex(config.redis_url, prefix=config.redis_prefix + "sem:", max_entries=semantic.max_entries)
             if config.redis_url else MemorySemanticIndex(max_entries=semantic.max_entries))
    verifier_threshold = None
    default_threshold = DEFAULT_SIMILARITY_THRESHOLD
    if semantic.verifier:
        from gateway.cache.verifier import DEFAULT_VERIFIER_THRESHOLD, lookup_floor  # noqa: PLC0415

        default_threshold = lookup_floor()
        verifier_threshold = semantic.verifier_threshold or DEFAULT_VERIFIER_THRESHOLD
    threshold = semantic.threshold if semantic.threshold is not None else default_threshold
    return SemanticLayer(Embedder(), index, threshold, semantic.ttl_s, verifier_threshold)
