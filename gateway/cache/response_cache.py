"""The response cache as the gateway uses it: look a request up (exact, then by meaning), store an answer.

Policy (docs/caching.md): by default only deterministic requests (temperature 0 or a fixed seed) are
cached, since a sampled answer is one draw among many; the client's `Cache-Control` can refuse the cache
(`no-cache`), refuse storing (`no-store`), or bound the age of what it accepts (`max-age`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.cache.directives import CacheDirectives
from gateway.cache.entry import CachedResponse
from gateway.cache.keys import exact_key, is_deterministic, semantic_partition, semantic_question
from gateway.cache.store import ErrorLog, ResponseStore
from workers.backend import GenerationRequest

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("frugal.cache")

CacheResult = Literal["hit", "semantic-hit", "miss", "bypass"]
#: Results that answered the request from the cache.
HITS = ("hit", "semantic-hit")


class Embedder(Protocol):
    def load(self) -> None: ...
    async def embed(self, text: str) -> np.ndarray: ...


class Match(Protocol):
    entry_key: str
    similarity: float


class VectorIndex(Protocol):
    async def lookup(self, partition: str, vector: np.ndarray, threshold: float) -> Match | None: ...
    async def add(self, partition: str, vector: np.ndarray, entry_key: str, ttl_s: float) -> None: ...
    async def aclose(self) -> None: ...


@dataclass(slots=True)
class SemanticLayer:
    """Matching by meaning: an embedder for the question, an index of the questions answered before,
    and the similarity a match needs."""

    embedder: Embedder
    index: VectorIndex
    threshold: float
    ttl_s: float
    #: Verifier (docs/semantic-cache.md): candidates from `threshold` up (then `MIN_SIMILARITY`) are served
    #: only when `verify(cached question, new question, cosine)` reaches this; None = cosine alone.
    verifier_threshold: float | None = None


@dataclass(slots=True)
class CacheLookup:
    result: CacheResult
    #: The cached answer, for hits.
    entry: CachedResponse | None = None
    #: Cosine similarity of the matched question (semantic hits).
    similarity: float | None = None
    key: str | None = None
    partition: str | None = None
    question: str | None = None
    vector: Any = None
    #: May the answer to this request be stored?
    write: bool = False


class ResponseCache:
    def __init__(self, store: ResponseStore, *, ttl_s: float, only_deterministic: bool = True,
                 shared: bool = False, semantic: SemanticLayer | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.only_deterministic = only_deterministic
        self.shared = shared
        self.semantic = semantic
        self._semantic_errors = ErrorLog()

    def _tenant(self, tenant: str) -> str:
        return "*" if self.shared else tenant

    async def lookup(self, tenant: str, route: str, generation: GenerationRequest, directives: CacheDirectives,
                     variant: dict[str, Any] | None = None) -> CacheLookup:
        """Is there an answer for this request? (Never raises for a store that fails: that is a miss.)"""
        if not directives.write and not directives.read:
            return CacheLookup("bypass")
        if self.only_deterministic and not is_deterministic(generation):
            return CacheLookup("bypass")
        tenant = self._tenant(tenant)
        lookup = CacheLookup("miss", key=exact_key(tenant, route, generation, variant), write=directives.write)
        if self.semantic is not None:
            lookup.question = semantic_question(generation)
            if lookup.question is not None:
                lookup.partition = semantic_partition(tenant, route, generation, variant)
        if not directives.read:
            return lookup
        entry = await self._load(lookup.key, directives)
        if entry is not None:
            lookup.result, lookup.entry = "hit", entry
            return lookup
        if self.semantic is not None and lookup.question is not None and lookup.partition is not None:
            try:
                await self._semantic_lookup(lookup, directives)
            except Exception as exc:  # an index in an unreachable Redis, an encoder failure: a miss, not a 500
                self._semantic_errors.report("semantic lookup", exc)
        return lookup

    async def _semantic_lookup(self, lookup: CacheLookup, directives: CacheDirectives) -> None:
        assert self.semantic is not None and lookup.question is not None and lookup.partition is not None
        lookup.vector = await self.semantic.embedder.embed(lookup.question)
        match = await self.semantic.index.lookup(lookup.partition, lookup.vector, self.semantic.threshold)
        if match is not None and match.entry_key != lookup.key:
            entry = await self._load(match.entry_key, directives)
            if entry is not None and self._verified(entry, lookup.question, match.similarity):
                lookup.result, lookup.entry, lookup.similarity = "semantic-hit", entry, match.similarity

    def _verified(self, entry: CachedResponse, question: str, similarity: float) -> bool:
        assert self.semantic is not None
        if self.semantic.verifier_threshold is None:
            return True
        from gateway.cache.verifier import verify  # noqa: PLC0415 (loads the shipped trees once)

        return entry.question is not None and verify(entry.question, question, similarity) >= \
            self.semantic.verifier_threshold

    async def _load(self, key: str, directives: CacheDirectives) -> CachedResponse | None:
        raw = await self.store.get(key)
        if raw is None:
            return None
        try:
            entry = CachedResponse.from_bytes(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("cache entry %s is unreadable; ignoring it", key[:16])
            return None
        if directives.max_age_s is not None and entry.age_s() > directives.max_age_s:
            return None
        return entry

    async def save(self, lookup: CacheLookup, entry: CachedResponse) -> None:
        """Store the answer to a request that missed (and may be stored)."""
        if not lookup.write or lookup.key is None or lookup.entry is not None:
            return
        entry.question = lookup.question
        await self.store.set(lookup.key, entry.to_bytes(), self.ttl_s)
        if self.semantic is not None and lookup.question is not None and lookup.partition is not None:
            try:
                if lookup.vector is None:
                    lookup.vector = await self.semantic.embedder.embed(lookup.question)
                await self.semantic.index.add(lookup.partition, lookup.vector, lookup.key, self.semantic.ttl_s)
            except Exception as exc:
                self._semantic_errors.report("semantic add", exc)

    async def aclose(self) -> None:
        await self.store.aclose()
        if self.semantic is not None:
            await self.semantic.index.aclose()
