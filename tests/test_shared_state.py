"""Shared state in Redis (a redis-server of the tests' own): rate limits and cooldowns that several replicas
enforce as one, their failure policies when Redis is away, and the Redis roles of the configuration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import APIError
from gateway.ratelimit import RateLimiter, RedisRateLimiter
from gateway.settings import ConfigError, parse_config
from gateway.shared_state import StateErrors, state_client
from router.shared_cooldown import SharedCooldown
from tests.harness import Clock, TempRedis, free_port


def errors() -> tuple[StateErrors, CollectorRegistry]:
    registry = CollectorRegistry()
    return StateErrors(registry), registry


def test_in_process_limits_count_requests_and_tokens() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)

    async def run() -> None:
        assert await limiter.admit("k", 2, None) is None
        assert await limiter.admit("k", 2, None) is None
        refused = await limiter.admit("k", 2, None)
        assert refused is not None and refused.what == "requests" and refused.retry_after_s == pytest.approx(30)
        clock.now += 30  # half a minute refills one request of two per minute
        assert await limiter.admit("k", 2, None) is None
        assert await limiter.admit("t", None, 100) is None
        limiter.spend("t", 150)  # an answer larger than what was left: the key is in debt
        refused = await limiter.admit("t", None, 100)
        assert refused is not None and refused.what == "tokens" and refused.retry_after_s == pytest.approx(30.6)
        clock.now += 31
        assert await limiter.admit("t", None, 100) is None
        assert await limiter.admit("other", None, 100) is None  # keys are separate

    asyncio.run(run())


def test_replicas_share_one_request_limit_in_redis(redis_url: str) -> None:
    async def run() -> None:
        clients = [state_client(redis_url, 0.5) for _ in range(2)]
        one, two = (RedisRateLimiter(c, errors()[0]) for c in clients)
        # 20 requests at once, alternating between the two replicas, against a limit of 5 per minute
        results = await asyncio.gather(*((one if i % 2 else two).admit("shared", 5, None) for i in range(20)))
        assert sum(r is None for r in results) == 5
        assert all(r.what == "requests" and r.per_minute == 5 for r in results if r is not None)
        assert (await one.admit("someone-else", 5, None)) is None
        for client in clients:
            await client.aclose()

    asyncio.run(run())


def test_tokens_spent_on_one_replica_limit_the_other(redis_url: str) -> None:
    async def run() -> None:
        clients = [state_client(redis_url, 0.5) for _ in range(2)]
        one, two = (RedisRateLimiter(c, errors()[0]) for c in clients)
        assert await one.admit("k", None, 1000) is None
        one.spend("k", 1200)
        await one.drain()
        refused = await two.admit("k", None, 1000)
        assert refused is not None and refused.what == "tokens" and refused.retry_after_s > 10
        for client in clients:
            await client.aclose()

    asyncio.run(run())


def test_rate_limits_fail_open_or_closed_when_redis_is_away() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"

    async def run() -> None:
        client = state_client(dead, 0.2)
        reporter, registry = errors()
        assert await RedisRateLimiter(client, reporter, policy="open").admit("k", 5, None) is None
        assert registry.get_sample_value("frugal_state_errors_total",
                                         {"mechanism": "rate_limits", "policy": "open"}) == 1
        with pytest.raises(APIError) as refused:
            await RedisRateLimiter(client, reporter, policy="closed").admit("k", 5, None)
        assert refused.value.status == 503 and refused.value.code == "rate_limit_unavailable"
        await client.aclose()

    asyncio.run(run())


def test_failures_on_two_replicas_add_up_to_one_cooldown(redis_url: str) -> None:
    async def run() -> None:
        clients = [state_client(redis_url, 0.5) for _ in range(2)]
        one, two = (SharedCooldown(3, 60, 30, c, models=["m", "n"]) for c in clients)
        one.failed("m")
        two.failed("m")
        await asyncio.gather(one.stop(), two.stop())
        assert one.remaining("m") == 0 and two.remaining("m") == 0  # two failures of three
        assert one.failed("m") is False  # the third, on replica one: replica one alone has seen two
        await one.stop()
        assert one.remaining("m") > 25  # but the replicas together reached three
        await two.sync()
        assert 25 < two.remaining("m") <= 30 and two.remaining("n") == 0
        assert sorted(two.cooling()) == ["m"]
        for client in clients:
            await client.aclose()

    asyncio.run(run())


def test_a_cooldown_reached_on_one_replica_reaches_the_other(redis_url: str) -> None:
    async def run() -> None:
        clients = [state_client(redis_url, 0.5) for _ in range(2)]
        one, two = (SharedCooldown(2, 60, 30, c, models=["m"], sync_s=0.05) for c in clients)
        two.start()
        one.failed("m")
        assert one.failed("m") is True
        await one.stop()
        for _ in range(100):  # the follower reads every 50 ms
            if two.remaining("m") > 0:
                break
            await asyncio.sleep(0.05)
        assert two.remaining("m") > 25
        await two.stop()
        for client in clients:
            await client.aclose()

    asyncio.run(run())


def test_cooldowns_go_on_locally_when_redis_is_away() -> None:
    async def run() -> None:
        seen: list[BaseException] = []
        client = state_client(f"redis://127.0.0.1:{free_port()}/0", 0.2)
        cooldown = SharedCooldown(2, 60, 30, client, models=["m"], on_error=seen.append)
        cooldown.failed("m")
        assert cooldown.failed("m") is True and cooldown.remaining("m") > 0
        await cooldown.stop()
        assert seen  # reported, not raised
        await client.aclose()

    asyncio.run(run())


def test_redis_url_sets_every_role_and_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://common:6379/0")
    config = parse_config("models: []\n")
    assert config.redis.broker == config.redis.state == config.cache.redis_url == "redis://common:6379/0"
    split = parse_config("redis: {broker_url: 'redis://broker/0', state_url: 'redis://state/0'}\n"
                         "cache: {redis_url: 'redis://cache/0'}\n")
    assert (split.redis.broker, split.redis.state, split.cache.redis_url) == \
        ("redis://broker/0", "redis://state/0", "redis://cache/0")


def test_a_pooled_model_needs_a_broker_and_a_local_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    pooled = "models: [{name: p, backend: local/smollm2-135m-instruct, pool: {}}]\n"
    with pytest.raises(ConfigError, match="need a broker"):
        parse_config(pooled)
    config = parse_config(pooled + "redis: {url: 'redis://r/0'}\n")
    assert config.model("p").queue == "frugal.local.smollm2-135m-instruct"
    with pytest.raises(ConfigError, match="pool is for local models"):
        parse_config("models: [{name: r, backend: openai/gpt-4o, pool: {}}]\nredis: {url: 'redis://r/0'}\n")


def test_a_restarted_redis_fails_no_call_on_the_connections_it_closed(tmp_path: Path) -> None:
    """After a Redis restart every pooled connection is dead; each is retried once on a fresh connection
    instead of failing the first call made on it (redis-py retries nothing by default)."""
    server = TempRedis(tmp_path)
    url = server.start()

    async def run() -> list[object]:
        client = state_client(url, 0.25)
        try:
            await asyncio.gather(*(client.incr("calls") for _ in range(8)))  # eight pooled connections
            server.stop()
            server.start()  # the same port, empty
            return await asyncio.gather(*(client.incr("calls") for _ in range(8)), return_exceptions=True)
        finally:
            await client.aclose()

    try:
        results = asyncio.run(run())
    finally:
        server.stop()
    assert sorted(results) == list(range(1, 9)), results  # no error; counted from zero in the new server
