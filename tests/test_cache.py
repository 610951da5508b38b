"""The exact response cache: keys, the client's Cache-Control, stores (in process and real Redis), and
the gateway serving hits (plain and streamed), recording them in the ledger and metrics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway.cache.directives import parse_cache_control
from gateway.cache.entry import CachedResponse
from gateway.cache.keys import exact_key, is_deterministic, semantic_partition, semantic_question
from gateway.cache.store import MemoryResponseStore, RedisResponseStore
from gateway.errors import APIError
from tests.harness import Clock, Gateway, Service, free_port, model_entry
from workers.backend import Choice, GenerationRequest, TokenLogprob, TopLogprob, Usage


def chat(messages: list[dict[str, Any]], **params: Any) -> GenerationRequest:
    return GenerationRequest(kind="chat", messages=messages, params=params)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --- keys -----------------------------------------------------------------------------------------------

def test_exact_key_covers_everything_that_changes_the_answer_and_nothing_else() -> None:
    base = exact_key("k", "m", chat(QUESTION, temperature=0, max_tokens=5))
    reordered = exact_key("k", "m", chat([{"content": "What is the capital of France?", "role": "user"}],
                                         max_tokens=5, temperature=0))
    assert base == reordered
    assert exact_key("k", "m", chat(QUESTION, temperature=0, max_tokens=5, user="alice")) == base
    different = [
        exact_key("other-key", "m", chat(QUESTION, temperature=0, max_tokens=5)),
        exact_key("k", "other-model", chat(QUESTION, temperature=0, max_tokens=5)),
        exact_key("k", "m", chat(QUESTION, temperature=0, max_tokens=6)),
        exact_key("k", "m", chat(QUESTION, temperature=0, max_tokens=5, logprobs=True)),
        exact_key("k", "m", chat([{"role": "user", "content": "What is the capital of Spain?"}],
                                 temperature=0, max_tokens=5)),
        exact_key("k", "m", GenerationRequest(kind="completion", prompt="What is the capital of France?",
                                              params={"temperature": 0, "max_tokens": 5})),
        exact_key("k", "m", chat(QUESTION, temperature=0, max_tokens=5), variant={"compress": False}),
    ]
    assert len({base, *different}) == len(different) + 1


def test_only_greedy_or_seeded_requests_are_deterministic() -> None:
    assert is_deterministic(chat(QUESTION, temperature=0))
    assert is_deterministic(chat(QUESTION, temperature=0.7, seed=3))
    assert not is_deterministic(chat(QUESTION))
    assert not is_deterministic(chat(QUESTION, temperature=0.2))


def test_semantic_partition_is_the_context_and_the_question_is_the_last_user_message() -> None:
    system = {"role": "system", "content": "Answer briefly."}
    one = chat([system, {"role": "user", "content": "Capital of France?"}], temperature=0)
    two = chat([system, {"role": "user", "content": "What's France's capital city?"}], temperature=0)
    other_system = chat([{"role": "system", "content": "Answer at length."}, *one.messages[1:]], temperature=0)
    assert semantic_partition("k", "m", one) == semantic_partition("k", "m", two)
    assert semantic_partition("k", "m", one) != semantic_partition("k", "m", other_system)
    assert semantic_partition("k", "m", one) != semantic_partition("k2", "m", one)
    assert semantic_question(two) == "What's France's capital city?"
    parts = chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert semantic_question(parts) == "a\nb"
    image = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}])
    assert semantic_question(image) is None
    assert semantic_question(chat([*QUESTION, {"role": "assistant", "content": "Paris"}])) is None


# --- the client's Cache-Control --------------------------------------------------------------------------

def test_cache_control_directives() -> None:
    assert parse_cache_control(None) == parse_cache_control("private")  # unknown directives are ignored
    default = parse_cache_control(None)
    assert (default.read, default.write, default.max_age_s) == (True, True, None)
    no_cache = parse_cache_control("no-cache")
    assert (no_cache.read, no_cache.write) == (False, True)
    no_store = parse_cache_control("No-Store, max-age=5")
    assert (no_store.read, no_store.write) == (False, False)
    assert parse_cache_control('max-age="60"').max_age_s == 60
    assert not parse_cache_control("max-age=0").read
    with pytest.raises(APIError) as raised:
        parse_cache_control("max-age=soon")
    assert raised.value.status == 400 and raised.value.code == "invalid_cache_control"


# --- entries and stores ---------------------------------------------------------------------------------

def test_cached_response_round_trips_with_logprobs() -> None:
    logprobs = [TokenLogprob("Paris", -0.1, [TopLogprob("Paris", -0.1), TopLogprob("Lyon", -3.0)])]
    entry = CachedResponse("alpha", [Choice(0, "Paris", "stop", logprobs), Choice(1, "Paris.", "length")],
                           Usage(14, 2, True), 3.2e-5, stored_at=100.0)
    again = CachedResponse.from_bytes(entry.to_bytes())
    assert again == entry
    assert again.age_s(now=160.0) == 60.0



def test_memory_store_expires_entries_and_evicts_the_least_recently_used() -> None:
    clock = Clock()
    store = MemoryResponseStore(max_entries=2, max_bytes=1000, clock=clock)

    async def scenario() -> None:
        await store.set("a", b"1", ttl_s=10)
        await store.set("b", b"2", ttl_s=100)
        assert await store.get("a") == b"1"  # "a" is now the most recently used
        await store.set("c", b"3", ttl_s=100)
        assert await store.get("b") is None  # the least recently used went
        assert await store.get("a") == b"1" and await store.get("c") == b"3"
        clock.now += 10
        assert await store.get("a") is None  # expired
        assert len(store) == 1 and store.evictions == 1
        await store.set("big", b"x" * 600, ttl_s=100)
        await store.set("big2", b"y" * 600, ttl_s=100)  # over the byte bound: the older one goes
        assert await store.get("big") is None and await store.get("big2") == b"y" * 600
        assert store.bytes_held <= 1000
        await store.set("huge", b"z" * 2000, ttl_s=100)  # larger than the whole store: not kept
        assert await store.get("huge") is None

    asyncio.run(scenario())


def test_redis_store_keeps_entries_with_an_expiry(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisResponseStore(redis_url, prefix="t:")
        await store.set("k", b"value", ttl_s=30)
        assert await store.get("k") == b"value"
        assert await store.get("missing") is None
        await store.aclose()

    asyncio.run(scenario())
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.pttl("t:k") <= 30_000
    client.close()


def test_an_unreachable_redis_is_a_miss_not_an_error() -> None:
    async def scenario() -> None:
        store = RedisResponseStore(f"redis://127.0.0.1:{free_port()}/0", prefix="t:")
        await store.set("k", b"value", ttl_s=30)
        assert await store.get("k") is None
        await store.aclose()

    asyncio.run(scenario())


# --- through the gateway --------------------------------------------------------------------------------

def upstream_calls(standin: Service, model: str) -> int:
    return httpx.get(standin.url + "/_standin/stats").json()["requests"].get(model, 0)


def metric(gw: Gateway, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
            if got == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def gateway_config(standin: Service, upstream: str, **cache: Any) -> dict[str, Any]:
    return {"models": [model_entry("alpha", upstream, standin.url, "http")], "cache": cache}


def ask(gw: Gateway, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "alpha", "messages": QUESTION, "temperature": 0, **extra}
    return gw.post("/v1/chat/completions", body, headers=headers)


def test_a_repeated_deterministic_request_is_answered_from_the_cache_for_free(
        make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(gateway_config(standin_server, upstream))
    first = ask(gw)
    assert first.status_code == 200 and first.headers["x-frugal-cache"] == "miss"
    cost = float(first.headers["x-frugal-cost-usd"])
    assert cost > 0
    second = ask(gw)
    assert second.status_code == 200 and second.headers["x-frugal-cache"] == "hit"
    assert upstream_calls(standin_server, upstream) == 1
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert second.json()["id"] != first.json()["id"]
    assert float(second.headers["x-frugal-cost-usd"]) == 0.0
    assert float(second.headers["x-frugal-saved-usd"]) == pytest.approx(cost)
    assert second.headers["x-frugal-model"] == "alpha" and "age" in second.headers

    row = gw.ledger_row(second.headers["x-request-id"])
    assert (row["cache"], row["status"], row["cost_usd"], row["model"]) == ("hit", 200, 0.0, "alpha")
    assert row["models_tried"] == []
    assert row["trace"]["cache"]["saved_usd"] == pytest.approx(cost)
    assert gw.ledger_row(first.headers["x-request-id"])["cache"] == "miss"

    assert metric(gw, "frugal_cache_requests_total", route="alpha", result="hit") == 1
    assert metric(gw, "frugal_cache_requests_total", route="alpha", result="miss") == 1
    assert metric(gw, "frugal_cache_saved_usd_total", route="alpha", result="hit") == pytest.approx(cost)
    assert metric(gw, "frugal_cost_usd_total", model="alpha") == pytest.approx(cost)  # spent once


def test_sampled_requests_and_client_directives_bypass_the_cache(
        make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(gateway_config(standin_server, upstream))
    sampled = {"temperature": 0.8}
    assert ask(gw, **sampled).headers["x-frugal-cache"] == "bypass"
    assert ask(gw, **sampled).headers["x-frugal-cache"] == "bypass"
    assert upstream_calls(standin_server, upstream) == 2
    assert ask(gw, seed=7, **sampled).headers["x-frugal-cache"] == "miss"
    assert ask(gw, seed=7, **sampled).headers["x-frugal-cache"] == "hit"

    no_store = {"cache-control": "no-store"}
    assert ask(gw, headers=no_store).headers["x-frugal-cache"] == "bypass"
    assert ask(gw, headers={"cache-control": "no-cache"}).headers["x-frugal-cache"] == "miss"  # … and stored
    calls = upstream_calls(standin_server, upstream)
    assert ask(gw).headers["x-frugal-cache"] == "hit"
    assert ask(gw, headers={"cache-control": "max-age=3600"}).headers["x-frugal-cache"] == "hit"
    assert upstream_calls(standin_server, upstream) == calls
    assert ask(gw, headers={"cache-control": "max-age=0"}).headers["x-frugal-cache"] == "miss"
    bad = ask(gw, headers={"cache-control": "max-age=-1"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache_control"
    assert gw.ledger_row(bad.headers["x-request-id"])["status"] == 400


def test_keys_do_not_share_answers_unless_the_cache_is_shared(
        make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    keys = {"keys": [{"id": "one", "key_env": "FRUGAL_TEST_KEY"}, {"id": "two", "key_env": "SECOND_KEY"}]}
    other = {"authorization": "Bearer sk-second"}
    gw = make_gateway({**gateway_config(standin_server, upstream), "auth": keys}, env={"SECOND_KEY": "sk-second"})
    assert ask(gw).headers["x-frugal-cache"] == "miss"
    assert ask(gw, headers=other).headers["x-frugal-cache"] == "miss"
    assert ask(gw, headers=other).headers["x-frugal-cache"] == "hit"

    shared_upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    shared = make_gateway({**gateway_config(standin_server, shared_upstream, scope="shared"), "auth": keys},
                          env={"SECOND_KEY": "sk-second"})
    assert ask(shared).headers["x-frugal-cache"] == "miss"
    assert ask(shared, headers=other).headers["x-frugal-cache"] == "hit"
    assert upstream_calls(standin_server, shared_upstream) == 1


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(orjson.loads(line[6:]))
    assert response.text.rstrip().endswith("data: [DONE]")
    return events


def streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


def test_a_streamed_answer_is_cached_and_served_as_a_stream(
        make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(gateway_config(standin_server, upstream))
    first = ask(gw, stream=True, stream_options={"include_usage": True})
    assert first.headers["x-frugal-cache"] == "miss"
    first_events = sse_events(first)
    text = streamed_text(first_events)
    assert text
    plain = ask(gw)  # the streamed answer serves a plain request …
    assert plain.headers["x-frugal-cache"] == "hit"
    assert plain.json()["choices"][0]["message"]["content"] == text
    again = ask(gw, stream=True, stream_options={"include_usage": True})  # … and a streamed one, as a stream
    assert again.headers["x-frugal-cache"] == "hit"
    assert again.headers["content-type"].startswith("text/event-stream")
    events = sse_events(again)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(events) == text
    assert events[-1]["usage"] == first_events[-1]["usage"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert upstream_calls(standin_server, upstream) == 1
    row = gw.ledger_row(again.headers["x-request-id"])
    assert (row["cache"], row["stream"], row["cost_usd"]) == ("hit", True, 0.0)
    assert row["ttft_ms"] is not None


def test_the_openai_sdk_reads_cached_answers(make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(gateway_config(standin_server, upstream))
    client = gw.client()
    first = client.chat.completions.create(model="alpha", messages=QUESTION, temperature=0)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="alpha", messages=QUESTION, temperature=0,  # type: ignore
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert upstream_calls(standin_server, upstream) == 1


def test_replicas_share_the_cache_through_redis_and_survive_its_absence(
        make_gateway: Callable[..., Gateway], standin_server: Service, redis_url: str) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    config = gateway_config(standin_server, upstream)
    one = make_gateway(config, env={"REDIS_URL": redis_url})
    two = make_gateway(config, env={"REDIS_URL": redis_url})
    assert ask(one).headers["x-frugal-cache"] == "miss"
    hit = ask(two)
    assert hit.headers["x-frugal-cache"] == "hit"
    assert upstream_calls(standin_server, upstream) == 1
    assert any(key.startswith(b"frugal:cache:") for key in redis.Redis.from_url(redis_url).keys())

    down = make_gateway(config, env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    for _ in range(2):
        response = ask(down)
        assert response.status_code == 200 and response.headers["x-frugal-cache"] == "miss"
    assert upstream_calls(standin_server, upstream) == 3


def test_the_cache_can_be_turned_off(make_gateway: Callable[..., Gateway], standin_server: Service) -> None:
    upstream = f"alpha-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(gateway_config(standin_server, upstream, exact={"enabled": False}))
    for _ in range(2):
        response = ask(gw)
        assert "x-frugal-cache" not in response.headers
    assert upstream_calls(standin_server, upstream) == 2
    assert gw.ledger_row(response.headers["x-request-id"])["cache"] == "none"

