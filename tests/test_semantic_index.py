"""The semantic cache's index: exact best match, partitions, TTL, bounded size, and sharing through Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.cache.semantic_index import MemorySemanticIndex, SemanticIndex, entry_ident
from gateway.cache.semantic_redis import RedisSemanticIndex
from gateway.cache.vector_store import PROJECT_MIN_ROWS
from tests.harness import Clock


def run(coroutine):  # noqa: ANN001, ANN201 - a tiny helper for async calls from sync tests
    return asyncio.run(coroutine)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, dim: int = 384) -> np.ndarray:
    """Vectors shaped like sentence embeddings: most energy in a few dozen shared directions (so the
    projection's bound is tight for some rows and loose for others), near-duplicates included."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(48, dim))
    rows = rng.normal(size=(n, 48)) @ mixing + 0.8 * rng.normal(size=(n, dim)) * np.sqrt(48 / dim) * 3
    rows[n // 2:] = rows[: n - n // 2] + 0.3 * rng.normal(size=(n - n // 2, dim))  # near-duplicates
    return unit_rows(rows)


def distinct(n: int, seed: int) -> np.ndarray:
    """Unrelated vectors (random directions: cosine near 0 between any two)."""
    return unit_rows(np.random.default_rng(seed).normal(size=(n, 384)))


def brute_force(rows: np.ndarray, query: np.ndarray, threshold: float) -> tuple[int, float] | None:
    scores = rows @ (query / np.linalg.norm(query))
    best = int(np.argmax(scores))
    return (best, float(scores[best])) if scores[best] >= threshold else None


def test_best_match_is_the_brute_force_best_in_small_and_projected_partitions() -> None:
    async def check() -> None:
        for n in (300, PROJECT_MIN_ROWS + 2000):  # full scan, then the projected path
            rows = clustered(n, seed=n)
            index = MemorySemanticIndex(max_entries=n)
            for i, row in enumerate(rows):
                await index.add("p", row, f"k{i}", ttl_s=3600)
            rng = np.random.default_rng(7)
            queries = np.vstack([rows[rng.integers(0, n, 40)] + 0.05 * rng.normal(size=(40, 384)),
                                 rng.normal(size=(20, 384))]).astype(np.float32)
            compared = hits = 0
            for threshold in (0.2, 0.6, 0.9):
                for query in queries:
                    match = await index.lookup("p", query, threshold)
                    expected = brute_force(rows, query, threshold)
                    compared += 1
                    if expected is None:
                        assert match is None
                        continue
                    hits += 1
                    assert match is not None
                    # Ties aside, the same row; the similarity always equals the brute-force best.
                    assert match.similarity == pytest.approx(expected[1], abs=1e-5)
                    assert float(rows[int(match.entry_key[1:])] @ (query / np.linalg.norm(query))) == \
                        pytest.approx(expected[1], abs=1e-5)
            assert 0 < hits < compared  # both outcomes were exercised

    run(check())


def test_partitions_never_cross() -> None:
    async def check() -> None:
        index = MemorySemanticIndex()
        vector, other = distinct(2, seed=1)
        await index.add("tenant-a", vector, "answer-a", ttl_s=60)
        assert await index.lookup("tenant-b", vector, 0.0) is None
        match = await index.lookup("tenant-a", vector, 0.99)
        assert match is not None and match.entry_key == "answer-a" and match.similarity == pytest.approx(1.0)
        await index.add("tenant-b", other, "answer-b", ttl_s=60)  # b's only entry is another question
        assert await index.lookup("tenant-b", vector, 0.99) is None
        match = await index.lookup("tenant-b", vector, -1.0)
        assert match is not None and match.entry_key == "answer-b"

    run(check())


def test_entries_expire_by_the_injected_clock_and_are_reclaimed() -> None:
    async def check() -> None:
        clock = Clock()
        index = MemorySemanticIndex(clock=clock)
        vectors = distinct(2, seed=2)
        await index.add("p", vectors[0], "short", ttl_s=10)
        await index.add("p", vectors[1], "long", ttl_s=100)
        clock.now += 9.9
        assert (await index.lookup("p", vectors[0], 0.99)).entry_key == "short"
        clock.now += 0.1
        assert await index.lookup("p", vectors[0], 0.99) is None
        assert len(index) == 1  # the expired entry was reclaimed, the other one kept
        assert (await index.lookup("p", vectors[1], 0.99)).entry_key == "long"

    run(check())


def test_size_is_bounded_and_the_soonest_to_expire_goes_first() -> None:
    async def check() -> None:
        clock = Clock()
        index = MemorySemanticIndex(max_entries=3, clock=clock)
        vectors = distinct(5, seed=3)
        for i, vector in enumerate(vectors):
            await index.add("p", vector, f"k{i}", ttl_s=60)
            clock.now += 1
        assert len(index) == 3
        for i, vector in enumerate(vectors):
            match = await index.lookup("p", vector, 0.999)
            assert (match is not None and match.entry_key == f"k{i}") == (i >= 2)

    run(check())


def test_adding_the_same_key_again_replaces_the_entry() -> None:
    async def check() -> None:
        clock = Clock()
        index = MemorySemanticIndex(clock=clock)
        first, second = distinct(2, seed=4)
        await index.add("p", first, "same", ttl_s=10)
        clock.now += 5
        await index.add("p", second, "same", ttl_s=10)
        assert len(index) == 1
        clock.now += 7  # past the first add's expiry, within the second's
        assert (await index.lookup("p", second, 0.999)).entry_key == "same"

    run(check())


def test_bad_input_is_refused() -> None:
    async def check() -> None:
        index = MemorySemanticIndex()
        with pytest.raises(ValueError):
            await index.add("p", np.zeros(384), "k", ttl_s=10)
        with pytest.raises(ValueError):
            await index.add("p", np.ones(10), "k", ttl_s=10)
        with pytest.raises(ValueError):
            await index.add("p", np.ones(384), "k", ttl_s=0)

    run(check())


def redis_index(url: str, clock: Clock, **options: object) -> RedisSemanticIndex:
    return RedisSemanticIndex(url, prefix="test:sem:", clock=clock, **options)


def test_two_redis_indexes_share_adds_replacements_and_evictions(redis_url: str) -> None:
    async def check() -> None:
        clock = Clock()
        a = redis_index(redis_url, clock, max_entries=3)
        b = redis_index(redis_url, clock, max_entries=3)
        vectors = distinct(5, seed=5)
        assert await b.lookup("p", vectors[0], 0.5) is None  # b is loaded (empty) before a writes
        await a.add("p", vectors[0], "k0", ttl_s=60)
        match = await b.lookup("p", vectors[0], 0.99)
        assert match is not None and match.entry_key == "k0"
        assert await b.lookup("other", vectors[0], 0.0) is None
        for i in range(1, 5):
            clock.now += 1
            await (a if i % 2 else b).add("p", vectors[i], f"k{i}", ttl_s=60)
        await a.sync()
        await b.sync()
        assert len(a) == len(b) == 3
        for index in (a, b):
            for i, vector in enumerate(vectors):
                match = await index.lookup("p", vector, 0.999)
                assert (match is not None and match.entry_key == f"k{i}") == (i >= 2)
        import redis

        raw = redis.Redis.from_url(redis_url)
        assert raw.zcard("test:sem:z") == 3
        assert sorted(k.decode() for k in raw.scan_iter("test:sem:e:*")) == sorted(
            f"test:sem:e:{entry_ident('p', f'k{i}')}" for i in range(2, 5))
        raw.close()
        await a.aclose()
        await b.aclose()

    run(check())


def test_redis_entries_expire_and_are_reclaimed_in_redis(redis_url: str) -> None:
    async def check() -> None:
        import redis

        clock = Clock()
        a, b = redis_index(redis_url, clock), redis_index(redis_url, clock)
        vectors = distinct(3, seed=6)
        await a.add("p", vectors[0], "old", ttl_s=10)
        ttl = redis.Redis.from_url(redis_url).ttl(f"test:sem:e:{entry_ident('p', 'old')}")
        assert 10 < ttl <= 10 + 60  # Redis reclaims the hash by itself too
        assert (await b.lookup("p", vectors[0], 0.99)).entry_key == "old"
        clock.now += 10
        assert await b.lookup("p", vectors[0], 0.99) is None
        await a.add("p", vectors[1], "new", ttl_s=10)  # the add script reclaims what has expired
        raw = redis.Redis.from_url(redis_url)
        assert raw.zrange("test:sem:z", 0, -1) == [entry_ident("p", "new").encode()]
        assert not raw.exists(f"test:sem:e:{entry_ident('p', 'old')}")
        raw.close()
        await a.aclose()
        await b.aclose()

    run(check())


def test_a_replica_that_fell_behind_the_capped_log_reloads(redis_url: str) -> None:
    async def check() -> None:
        import redis

        clock = Clock()
        a = redis_index(redis_url, clock, log_len=5)
        b = redis_index(redis_url, clock, log_len=5)
        vectors = distinct(60, seed=7)
        await b.sync()
        for i, vector in enumerate(vectors):
            await a.add("p", vector, f"k{i}", ttl_s=60)
        raw = redis.Redis.from_url(redis_url)
        assert raw.xlen("test:sem:log") < 60  # the stream is capped, so b cannot replay it all
        raw.close()
        for i in (0, 30, 59):
            assert (await b.lookup("p", vectors[i], 0.999)).entry_key == f"k{i}"
        assert len(b) == 60
        # A third replica, started later, loads the current entries.
        c = redis_index(redis_url, clock)
        assert (await c.lookup("p", vectors[3], 0.999)).entry_key == "k3"
        for index in (a, b, c):
            await index.aclose()

    run(check())


def test_a_replica_drops_its_mirror_when_redis_lost_its_data(redis_url: str) -> None:
    async def check() -> None:
        import redis

        clock = Clock()
        a, b = redis_index(redis_url, clock), redis_index(redis_url, clock)
        old, new = distinct(2, seed=9)
        await a.add("p", old, "old", ttl_s=60)
        assert (await b.lookup("p", old, 0.99)).entry_key == "old"
        raw = redis.Redis.from_url(redis_url)
        raw.flushdb()  # as a restarted Redis without persistence
        raw.close()
        await a.add("p", new, "new", ttl_s=60)
        assert await b.lookup("p", old, 0.99) is None
        assert (await b.lookup("p", new, 0.99)).entry_key == "new"
        assert len(b) == 1
        await a.aclose()
        await b.aclose()

    run(check())


def test_both_indexes_satisfy_the_protocol(redis_url: str) -> None:
    def typed(index: SemanticIndex) -> SemanticIndex:
        return index

    async def check() -> None:
        for index in (MemorySemanticIndex(), RedisSemanticIndex(redis_url, prefix="test:proto:")):
            await typed(index).add("p", distinct(2, seed=8)[0], "k", ttl_s=5)
            assert len(index) == 1
            await index.aclose()

    run(check())
