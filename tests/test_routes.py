"""Routes in process, over scripted backends (tests/fakes.py), an injected sleep and a hand-moved clock:
retries, fallbacks, cooldowns, cascade tiers, streams cut short, savings. The end-to-end tests
(test_cascade_gateway.py, test_errors.py, test_ledger.py) run the same code behind real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from router.cascade import CascadeRoute
from router.cooldown import Cooldown
from router.failures import RouteFailed, RouteUnavailable
from router.fallback import FallbackRoute
from router.pool import ModelPool, RetryPolicy
from router.route import Router
from router.stream import RouteStream
from router.tiers import Tier
from router.trace import DecisionTrace
from tests.fakes import FakeBackend, FixedScorer, failure
from tests.harness import Clock
from workers.backend import GenerationRequest, Usage
from workers.errors import BackendError, FailureKind
from workers.pricing import TokenPrice
from workers.tokens import count_message_tokens, count_tokens

T = TypeVar("T")
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
BIG = TokenPrice(1e-5, 2e-5)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def request() -> GenerationRequest:
    return GenerationRequest("chat", messages=list(QUESTION), timeout_s=5.0)


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def pool_of(*backends: FakeBackend, retries: int = 0, failures: int = 3, clock: Clock | None = None,
            sleeps: Sleeps | None = None) -> ModelPool:
    return ModelPool({b.name: b for b in backends}, max_retries={b.name: retries for b in backends},
                     timeouts={b.name: 5.0 for b in backends}, retry=RetryPolicy(0.25, 4.0),
                     cooldown=Cooldown(failures, 60.0, 30.0, clock=clock or Clock()),
                     sleep=sleeps if sleeps is not None else Sleeps())


async def drain(stream: RouteStream) -> str:
    try:
        return "".join([chunk.text async for chunk in stream])
    finally:
        await stream.aclose()


def streamed(route: FallbackRoute | CascadeRoute, trace: DecisionTrace) -> tuple[RouteStream, str | BackendError]:
    """Open a stream of `route` and read it to its end, in one event loop: the stream, and its text or the
    error that ended it."""

    async def scenario() -> tuple[RouteStream, str | BackendError]:
        stream = await route.open_stream(request(), trace)
        try:
            return stream, await drain(stream)
        except BackendError as error:
            return stream, error

    return run(scenario())


# Fallback routes


def test_a_retryable_failure_is_retried_on_the_same_model_after_a_backoff() -> None:
    model = FakeBackend("a", failures=[failure(FailureKind.SERVER, retry_after_s=1.5)])
    sleeps = Sleeps()
    trace = DecisionTrace("r")
    result = run(FallbackRoute("r", ["a"], pool_of(model, retries=2, sleeps=sleeps)).generate(request(), trace))
    assert result.text == "the answer is four" and model.calls == 2
    assert [a.outcome for a in trace.attempts] == ["server_error", "ok"]
    assert sleeps == [1.5]  # the upstream's Retry-After, within the backoff cap
    assert trace.retries == 1 and trace.fallbacks == 0
    assert trace.cost_usd == pytest.approx(model.cost(model.usage()))


def test_a_failure_that_is_not_retryable_falls_back_to_the_next_model() -> None:
    first, second = FakeBackend("a", failures=[failure(FailureKind.AUTH)]), FakeBackend("b")
    trace = DecisionTrace("r")
    result = run(FallbackRoute("r", ["a", "b"], pool_of(first, second, retries=3)).generate(request(), trace))
    assert result.model == "b" and trace.model == "b" and first.calls == 1
    assert trace.models_tried == ["a", "b"] and trace.fallbacks == 1


def test_a_request_the_upstream_calls_invalid_stops_the_route() -> None:
    first, second = FakeBackend("a", failures=[failure(FailureKind.BAD_REQUEST)]), FakeBackend("b")
    with pytest.raises(RouteFailed) as caught:
        run(FallbackRoute("r", ["a", "b"], pool_of(first, second)).generate(request(), DecisionTrace("r")))
    assert caught.value.kind == FailureKind.BAD_REQUEST and second.calls == 0


def test_a_failing_model_cools_down_and_is_skipped_until_the_cooldown_ends() -> None:
    clock = Clock()
    flaky = FakeBackend("a", failures=[failure(FailureKind.SERVER) for _ in range(2)])
    steady = FakeBackend("b")
    route = FallbackRoute("r", ["a", "b"], pool_of(flaky, steady, failures=2, clock=clock))
    for _ in range(2):
        assert run(route.generate(request(), DecisionTrace("r"))).model == "b"
    trace = DecisionTrace("r")
    assert run(route.generate(request(), trace)).model == "b"
    assert trace.attempts[0].outcome == "skipped_cooldown" and flaky.calls == 2
    clock.now += 31
    assert run(route.generate(request(), DecisionTrace("r"))).model == "a"


def test_a_route_whose_models_all_cool_down_is_unavailable_with_the_time_left() -> None:
    clock = Clock()
    model = FakeBackend("a", failures=[failure(FailureKind.CONNECTION)])
    route = FallbackRoute("r", ["a"], pool_of(model, failures=1, clock=clock))
    with pytest.raises(RouteFailed):
        run(route.generate(request(), DecisionTrace("r")))
    clock.now += 10
    with pytest.raises(RouteUnavailable) as caught:
        run(route.generate(request(), DecisionTrace("r")))
    assert caught.value.retry_after_s == pytest.approx(20.0)


def test_a_stream_that_fails_before_its_first_chunk_falls_back() -> None:
    first, second = FakeBackend("a", failures=[failure(FailureKind.SERVER)]), FakeBackend("b")
    trace = DecisionTrace("r")
    stream, text = streamed(FallbackRoute("r", ["a", "b"], pool_of(first, second)), trace)
    assert stream.model == "b" and text == "the answer is four"
    assert [a.outcome for a in trace.attempts] == ["server_error", "ok"]


# Streams cut short


def test_a_client_that_leaves_mid_stream_is_billed_what_was_generated() -> None:
    async def scenario() -> tuple[DecisionTrace, RouteStream]:
        held = FakeBackend("a", hold=asyncio.Event())
        pool = pool_of(held, failures=1)
        trace = DecisionTrace("r")
        stream = await FallbackRoute("r", ["a"], pool).open_stream(request(), trace)
        got_first = asyncio.Event()

        async def client() -> None:
            async for _ in stream:
                got_first.set()

        task = asyncio.create_task(client())
        await got_first.wait()
        task.cancel()  # the client goes away while the model is still generating
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        assert pool.cooldown.remaining("a") == 0  # leaving is not the model's failure
        return trace, stream

    trace, stream = run(scenario())
    assert stream.usage == Usage(count_message_tokens(QUESTION), count_tokens("the"), estimated=True)
    assert [a.outcome for a in trace.attempts] == ["client_closed"]
    assert trace.cost_usd == pytest.approx(TokenPrice(1e-6, 2e-6).cost(stream.usage.prompt_tokens, 1))
    assert stream.text == "the"


def test_an_upstream_failure_mid_stream_bills_the_partial_answer_and_counts_against_the_model() -> None:
    dropping = FakeBackend("a", fail_after=2)
    pool = pool_of(dropping, failures=1)
    trace = DecisionTrace("r")
    stream, ended = streamed(FallbackRoute("r", ["a"], pool), trace)
    assert isinstance(ended, BackendError) and ended.kind == FailureKind.CONNECTION
    assert stream.text == "the answer"
    assert [a.outcome for a in trace.attempts] == ["connection_error"]
    assert trace.attempts[0].cost_usd == pytest.approx(
        dropping.price.cost(count_message_tokens(QUESTION), count_tokens("the answer")))
    assert pool.cooldown.remaining("a") > 0


def test_a_finished_stream_is_billed_once_at_the_provider_s_count() -> None:
    model = FakeBackend("a")
    trace = DecisionTrace("r")
    stream, text = streamed(FallbackRoute("r", ["a"], pool_of(model)), trace)
    assert text == "the answer is four"
    run(stream.aclose())  # closing again changes nothing
    assert stream.finished and stream.usage == model.usage()
    assert [a.outcome for a in trace.attempts] == ["ok"]
    assert stream.cost_usd == pytest.approx(model.cost(model.usage()))
    assert [c.text for c in stream.choices()] == ["the answer is four"]


# Cascades


def cascade(scores: dict[str, float], *backends: FakeBackend, threshold: float = 0.5) -> tuple[CascadeRoute,
                                                                                              FixedScorer]:
    scorer = FixedScorer(scores)
    tiers = [Tier(b.name, threshold) for b in backends[:-1]] + [Tier(backends[-1].name)]
    return CascadeRoute("c", tiers, scorer, pool_of(*backends)), scorer


def test_an_answer_scored_at_its_threshold_is_accepted_and_the_saving_is_against_the_dearest_model() -> None:
    cheap, big = FakeBackend("cheap", answer="four"), FakeBackend("big", answer="four", price=BIG)
    route, _ = cascade({"cheap": 0.5}, cheap, big)
    trace = DecisionTrace("c")
    result = run(route.generate(request(), trace))
    assert result.model == "cheap" and big.calls == 0
    assert [(t.model, t.outcome) for t in trace.tiers] == [("cheap", "accepted")]
    assert trace.accepted_tier == 1 and trace.model == "cheap"
    usage = cheap.usage()
    assert trace.saved_usd == pytest.approx(BIG.cost(*usage_counts(usage)) - cheap.cost(usage))


def usage_counts(usage: Usage) -> tuple[int, int]:
    return usage.prompt_tokens, usage.completion_tokens


def test_a_rejected_answer_climbs_and_the_next_tier_sees_it() -> None:
    cheap, mid, big = FakeBackend("cheap", answer="five"), FakeBackend("mid", answer="four"), FakeBackend("big")
    route, scorer = cascade({"cheap": 0.2, "mid": 0.9}, cheap, mid, big)
    trace = DecisionTrace("c")
    assert run(route.generate(request(), trace)).model == "mid"
    assert [t.outcome for t in trace.tiers] == ["rejected", "accepted"]
    assert scorer.asked[1] == ("mid", "four", [("cheap", "five")])
    assert trace.tiers[0].score == 0.2 and trace.tiers[0].threshold == 0.5
    assert trace.cost_usd == pytest.approx(cheap.cost(cheap.usage()) + mid.cost(mid.usage()))
    assert big.calls == 0


def test_when_the_last_tier_fails_the_best_rejected_answer_is_returned() -> None:
    cheap, mid = FakeBackend("cheap", answer="five"), FakeBackend("mid", answer="four")
    big = FakeBackend("big", failures=[failure(FailureKind.AUTH)])
    route, _ = cascade({"cheap": 0.2, "mid": 0.4}, cheap, mid, big)
    trace = DecisionTrace("c")
    assert run(route.generate(request(), trace)).text == "four"
    assert [t.outcome for t in trace.tiers] == ["rejected", "fallback_accepted", "failed"]
    assert trace.model == "mid" and trace.accepted_tier == 2


def test_a_streamed_cascade_replays_an_accepted_answer_and_settles_when_it_finishes() -> None:
    cheap, big = FakeBackend("cheap", answer="four"), FakeBackend("big", price=BIG)
    route, _ = cascade({"cheap": 0.9}, cheap, big)
    trace = DecisionTrace("c")

    async def scenario() -> RouteStream:
        stream = await route.open_stream(request(), trace)
        assert trace.saved_usd is None  # not before the answer is complete
        assert await drain(stream) == "four"
        return stream

    stream = run(scenario())
    assert stream.usage == cheap.usage() and [a.outcome for a in trace.attempts] == ["ok"]
    assert trace.saved_usd == pytest.approx(BIG.cost(*usage_counts(cheap.usage())) - cheap.cost(cheap.usage()))


def test_a_streamed_cascade_that_reaches_the_last_tier_streams_it_and_may_save_less_than_nothing() -> None:
    cheap, big = FakeBackend("cheap", answer="five"), FakeBackend("big", price=BIG)
    route, _ = cascade({"cheap": 0.1}, cheap, big)
    trace = DecisionTrace("c")
    stream, text = streamed(route, trace)
    assert stream.model == "big" and text == "the answer is four"
    assert [t.outcome for t in trace.tiers] == ["rejected", "accepted"]
    assert trace.tiers[0].cost_usd == pytest.approx(cheap.cost(cheap.usage()))
    assert trace.saved_usd == pytest.approx(-cheap.cost(cheap.usage()))  # the big model's cost, plus tier 1's


def test_an_abandoned_replay_adds_no_cost_beyond_the_tiers_already_called() -> None:
    cheap, big = FakeBackend("cheap"), FakeBackend("big", price=BIG)
    route, _ = cascade({"cheap": 0.9}, cheap, big)
    trace = DecisionTrace("c")

    async def scenario() -> RouteStream:
        stream = await route.open_stream(request(), trace)
        await stream.aclose()
        return stream

    stream = run(scenario())
    assert stream.usage == cheap.usage() and trace.cost_usd == pytest.approx(cheap.cost(cheap.usage()))
    assert trace.saved_usd is None and [a.outcome for a in trace.attempts] == ["ok"]


# The router


def test_the_router_finds_routes_and_models_by_name() -> None:
    pool = pool_of(FakeBackend("a"), FakeBackend("b"))
    router = Router(pool, {"frugal/auto": FallbackRoute("frugal/auto", ["b", "a"], pool)})
    route = router.resolve("frugal/auto")
    assert route is not None and route.name == "frugal/auto"
    single = router.resolve("a")
    assert single is not None and run(single.generate(request(), DecisionTrace("a"))).model == "a"
    assert router.resolve("nope") is None


# Judged tiers, escalation reasons, answers no tier accepted


class FixedJudge:
    """A tier judge with a fixed score; remembers the requests' extras and the results it judged."""

    def __init__(self, score: float, samples: int = 3) -> None:
        from router.judge import JudgeSettings

        self.settings = JudgeSettings(samples=samples, top_logprobs=5)
        self.fixed = score
        self.version = f"fixed-{score}"
        self.judged: list[str] = []

    def assess(self, query: str, result: Any) -> tuple[float, Any]:
        import numpy as np

        self.judged.append(result.text)
        return self.fixed, np.array([self.fixed, len(result.text)])


def judged(score: float, *backends: FakeBackend, on_unaccepted: str = "answer",
           threshold: float = 0.5) -> tuple[CascadeRoute, FixedJudge]:
    judge = FixedJudge(score)
    tiers = [Tier(backends[0].name, threshold)] + [Tier(b.name) for b in backends[1:]]
    return CascadeRoute("c", tiers, None, pool_of(*backends), judges={backends[0].name: judge},
                        on_unaccepted=on_unaccepted), judge  # type: ignore[arg-type]


def test_a_judged_tier_is_asked_for_its_signals_and_the_client_never_sees_them() -> None:
    local, big = FakeBackend("local", answer="four"), FakeBackend("big", price=BIG)
    route, judge = judged(0.9, local, big)
    trace = DecisionTrace("c")
    result = run(route.generate(request(), trace))
    sent = local.requests[0]
    assert sent.samples == 3 and sent.params["logprobs"] is True and sent.params["top_logprobs"] == 5
    assert result.model == "local" and result.choices[0].logprobs is None and judge.judged == ["four"]
    assert trace.accepted is True and [t.reason for t in trace.tiers] == [None] and big.calls == 0


def test_a_rejected_judged_answer_climbs_with_the_reason_score() -> None:
    local, big = FakeBackend("local", answer="five"), FakeBackend("big", price=BIG)
    route, _ = judged(0.1, local, big)
    trace = DecisionTrace("c")
    assert run(route.generate(request(), trace)).model == "big"
    assert [(t.outcome, t.reason) for t in trace.tiers] == [("rejected", "score"), ("accepted", None)]
    assert trace.accepted is True and big.requests[0].samples == 0


@pytest.mark.parametrize(("kind", "reason"), [(FailureKind.CONTEXT_WINDOW, "context_length"),
                                              (FailureKind.TIMEOUT, "timeout"), (FailureKind.OVERLOADED, "capacity"),
                                              (FailureKind.SERVER, "error")])
def test_a_tier_that_fails_escalates_with_the_failure_as_its_reason(kind: FailureKind, reason: str) -> None:
    local, big = FakeBackend("local", failures=[failure(kind)]), FakeBackend("big", answer="four", price=BIG)
    route, judge = judged(0.9, local, big)
    trace = DecisionTrace("c")
    assert run(route.generate(request(), trace)).text == "four"
    assert [(t.model, t.outcome, t.reason) for t in trace.tiers] == [("local", "failed", reason),
                                                                     ("big", "accepted", None)]
    assert judge.judged == [] and trace.accepted is True


def test_a_prompt_too_long_for_a_tier_never_cools_it_down() -> None:
    local, big = FakeBackend("local"), FakeBackend("big", price=BIG)
    local.failures = [failure(FailureKind.CONTEXT_WINDOW) for _ in range(5)]
    route, _ = judged(0.9, local, big)
    for _ in range(5):
        run(route.generate(request(), DecisionTrace("c")))
    assert route._pool.skip_reason("local", request()) is None and local.calls == 5


class KeylessBackend(FakeBackend):
    missing_key_env = "NOWHERE_API_KEY"


def test_without_a_usable_higher_tier_the_best_answer_comes_back_not_accepted() -> None:
    local, big = FakeBackend("local", answer="five"), KeylessBackend("big", price=BIG)
    route, _ = judged(0.1, local, big)
    trace = DecisionTrace("c")
    result = run(route.generate(request(), trace))
    assert result.text == "five" and big.calls == 0
    assert [(t.model, t.outcome, t.reason) for t in trace.tiers] == [("local", "fallback_accepted", "score"),
                                                                     ("big", "skipped", "no_key")]
    assert trace.accepted is False and trace.to_dict()["accepted"] is False


def test_on_unaccepted_error_refuses_and_names_the_tiers_that_could_not_answer() -> None:
    from router.failures import NoAcceptedAnswer

    local, big = FakeBackend("local", answer="five"), KeylessBackend("big", price=BIG)
    route, _ = judged(0.1, local, big, on_unaccepted="error")
    with pytest.raises(NoAcceptedAnswer, match=r"big \(no_key\)"):
        run(route.generate(request(), DecisionTrace("c")))
    keyless_middle = CascadeRoute("c", [Tier("local", 0.5), Tier("mid"), Tier("big")], None,
                                  pool_of(FakeBackend("local"), KeylessBackend("mid"), FakeBackend("big", answer="ok")),
                                  judges={"local": FixedJudge(0.1)})  # type: ignore[dict-item]
    trace = DecisionTrace("c")
    assert run(keyless_middle.generate(request(), trace)).text == "ok"
    assert [t.reason for t in trace.tiers] == ["score", "no_key", None]


def test_a_tier_nothing_judges_is_accepted_like_a_fallback() -> None:
    local, mid, big = FakeBackend("local", answer="five"), FakeBackend("mid", answer="four"), FakeBackend("big")
    route = CascadeRoute("c", [Tier("local", 0.5), Tier("mid"), Tier("big")], None, pool_of(local, mid, big),
                         judges={"local": FixedJudge(0.1)})  # type: ignore[dict-item]
    trace = DecisionTrace("c")
    assert run(route.generate(request(), trace)).model == "mid"
    assert [(t.outcome, t.score) for t in trace.tiers] == [("rejected", 0.1), ("accepted", None)] and big.calls == 0
