"""The local tier under load, on the real model: the cross-request prefix cache, continuous batching and
backpressure (docs/local-serving.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from workers.local.engine import EngineConfig, Overloaded
from workers.local.generate import Generation, LocalGenerator
from workers.local.kvpool import KVPool
from workers.local.prefix_cache import PrefixCache
from workers.local.sampling import SamplingParams

pytestmark = pytest.mark.timeout(900)

SYSTEMS = [
    "You are a careful assistant for a hardware store. Answer in one short sentence, name the aisle when you "
    "can, never invent prices, and suggest a safer tool when a customer describes a risky job. The store has "
    "aisles for paint, plumbing, electrical parts, garden tools, fasteners, lumber and hand tools; the garden "
    "centre is outside, next to the car park, and closes an hour before the main store.",
    "You are a terse travel agent. Reply with a single line. You know trains, ferries and buses in Europe, you "
    "prefer night trains to flights when the journey is under twelve hours, and you always mention whether a "
    "reservation is needed. Never recommend a specific hotel.",
    "You are a patient maths tutor for children aged ten. Explain with small numbers, one step at a time, and "
    "end every answer with a question that checks understanding. Use words rather than symbols where you can.",
]
QUESTIONS = ["Where is the paint?", "How do I get from Paris to Berlin?", "What is a fraction?",
             "Can you help me?", "What should I bring?", "Why is the sky blue?"]
GREEDY = SamplingParams(temperature=0, top_logprobs=5)


def chat(generator: LocalGenerator, system: str, question: str) -> list[int]:
    return generator.encode(generator.chat_prompt([{"role": "system", "content": system},
                                                   {"role": "user", "content": question}]))


def generate(generator: LocalGenerator, prompt: list[int], max_tokens: int = 16,
             salt: str | None = None) -> tuple[Generation, list]:
    state = Generation()
    steps = list(generator.stream(prompt, GREEDY, max_tokens, [], state, want_logprobs=True, salt=salt))
    return state, steps


@pytest.fixture(scope="module")
def make(built: Callable[..., Path]) -> Iterator[Callable[..., LocalGenerator]]:
    made: list[LocalGenerator] = []

    def factory(**engine: object) -> LocalGenerator:
        generator = LocalGenerator(built("int8"), threads=2, engine=EngineConfig(**engine))  # type: ignore[arg-type]
        made.append(generator)
        return generator

    yield factory
    for generator in made:
        generator.close()


def test_reused_prefix_gives_the_logits_of_a_cold_prefill(built: Callable[..., Path]) -> None:
    """The mechanism itself: keys and values of a prefix copied from the cache into a fresh slot, the rest
    computed, against the whole prompt computed cold: the same logits (≤ 1e-5; bit-identical here)."""
    generator = LocalGenerator(built("int8"), threads=2)
    session = generator.session
    generator.close()
    pool = KVPool(session.info, 2, 1024)
    cache = PrefixCache(32, pool.bytes_per_token * 32, 64 << 20)
    prompt = chat(generator, SYSTEMS[0] * 3, "Where are the hammers?")
    assert len(prompt) > 250

    def prefill(slot: int, start: int, chunk: int = 128) -> np.ndarray:
        while start < len(prompt):
            end = min(start + chunk, len(prompt))
            end -= end == len(prompt) - 1  # never a last chunk of one row, as the engine does
            logits, hidden = session.run(np.array([prompt[start:end]]), np.ones((1, end), np.int64),
                                         pool.single(slot), 1)
            start = end
        return session.rescore(logits[:, -1], hidden[:, -1])[0]

    cold = prefill(0, 0)
    blocks = (len(prompt) - 2) // 32
    keys = cache.keys(prompt, None, blocks)
    for i, key in enumerate(keys):
        cache.insert(key, pool.read(0, i * 32, (i + 1) * 32))
    found = cache.lookup(keys)
    assert len(found) == blocks
    pool.write(1, 0, np.concatenate([b.data for b in found], axis=3))
    warm = prefill(1, blocks * 32, chunk=64)  # different chunking too
    assert np.abs(warm - cold).max() <= 1e-5
    assert int(warm.argmax()) == int(cold.argmax())


def test_a_repeated_prompt_reuses_its_prefix_with_identical_output(make: Callable[..., LocalGenerator]) -> None:
    generator = make()
    prompt = chat(generator, SYSTEMS[0], QUESTIONS[0])
    cold_state, cold_steps = generate(generator, prompt)
    warm_state, warm_steps = generate(generator, prompt)
    assert cold_state.cached_tokens == 0
    assert warm_state.cached_tokens >= len(prompt) - 33  # all full blocks but the last two tokens' block
    assert warm_state.text == cold_state.text
    for warm, cold in zip(warm_steps, cold_steps, strict=True):
        assert warm.token_id == cold.token_id
        assert abs(warm.logprob - cold.logprob) <= 1e-5
        assert [t for t, _ in warm.top] == [t for t, _ in cold.top]
        assert np.allclose([lp for _, lp in warm.top], [lp for _, lp in cold.top], atol=1e-5, rtol=0)
    stats = generator.engine.stats
    assert stats["cached_tokens"] == warm_state.cached_tokens
    assert stats["prefill_tokens"] == 2 * len(prompt) - warm_state.cached_tokens


def test_the_next_turn_of_a_chat_reuses_the_previous_turn(make: Callable[..., LocalGenerator]) -> None:
    generator = make()
    messages = [{"role": "system", "content": SYSTEMS[1]}, {"role": "user", "content": QUESTIONS[1]}]
    first_prompt = generator.encode(generator.chat_prompt(messages))
    first, _ = generate(generator, first_prompt, max_tokens=40)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And to Vienna?"}]
    second_prompt = generator.encode(generator.chat_prompt(messages))
    second, _ = generate(generator, second_prompt)
    # The first turn's prompt and answer were cached when it finished: at least the prompt's full blocks.
    assert second.cached_tokens >= len(first_prompt) // 32 * 32 > 0
    assert second.cached_tokens > len(first_prompt) - 32


def test_tenants_with_different_salts_share_nothing(make: Callable[..., LocalGenerator]) -> None:
    generator = make()
    prompt = chat(generator, SYSTEMS[2], QUESTIONS[2])
    assert generate(generator, prompt, 4, salt="tenant-a")[0].cached_tokens == 0
    assert generate(generator, prompt, 4, salt="tenant-b")[0].cached_tokens == 0
    assert generate(generator, prompt, 4, salt="tenant-a")[0].cached_tokens > 0


def test_batched_greedy_outputs_equal_the_same_requests_alone(make: Callable[..., LocalGenerator]) -> None:
    """With batch invariance on, every decode step uses the many-row kernels, so a request's tokens are
    bit-identical whether it ran alone or beside others."""
    generator = make(batch_invariant=True, prefix_cache_bytes=0, max_batch=8)
    prompts = [chat(generator, SYSTEMS[i % 3], q) for i, q in enumerate(QUESTIONS)]
    alone = [generate(generator, p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(generator, p), prompts))
    assert generator.engine.stats["decode_rows"] > generator.engine.stats["decode_steps"]  # they did batch
    for (a_state, a_steps), (t_state, t_steps) in zip(alone, together, strict=True):
        assert t_state.text == a_state.text
        assert [s.logprob for s in t_steps] == [s.logprob for s in a_steps]


def test_without_batch_invariance_batched_outputs_stay_within_rounding(make: Callable[..., LocalGenerator]) -> None:
    """The default: a lone sequence decodes with the one-row kernel; beside others, with the many-row one.
    The log-probs differ by rounding only (~1e-5) until any near-tie flips a token."""
    generator = make(prefix_cache_bytes=0)
    prompts = [chat(generator, SYSTEMS[1], q) for q in QUESTIONS[:4]]
    alone = [generate(generator, p, 8) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(generator, p, 8), prompts))
    compared = 0
    for (_, a_steps), (_, t_steps) in zip(alone, together, strict=True):
        for a, t in zip(a_steps, t_steps, strict=False):
            if a.token_id != t.token_id:
                break
            assert abs(a.logprob - t.logprob) < 1e-3
            compared += 1
    assert compared >= len(prompts)


def test_many_concurrent_requests_on_shared_prefixes(make: Callable[..., LocalGenerator]) -> None:
    """Requests sharing system prompts, all at once from many threads, with the prefix cache and batching:
    each answer equals the same request run alone without any cache, and the cache's books balance."""
    reference = make(batch_invariant=True, prefix_cache_bytes=0, max_batch=1)
    engine_config = {"batch_invariant": True, "max_batch": 6, "prefix_cache_bytes": 48 << 20}
    generator = make(**engine_config)
    prompts = [chat(generator, SYSTEMS[i % 3], QUESTIONS[(i * 5) % 6] + f" (request {i})") for i in range(12)]
    expected = [generate(reference, p, 8)[0].text for p in prompts]
    barrier = threading.Barrier(len(prompts))

    def hammer(prompt: list[int]) -> Generation:
        barrier.wait()
        return generate(generator, prompt, 8)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(hammer, prompts))
    assert [r.text for r in results] == expected
    assert generator.engine.wait_idle(timeout=60)
    cache = generator.engine.cache
    assert cache is not None and cache.blocks_in_use == 0 and cache.bytes_held <= 48 << 20
    stats = generator.engine.stats
    assert stats["cached_tokens"] > 0 and sum(r.cached_tokens for r in results) == stats["cached_tokens"]
    assert stats["prefill_tokens"] + stats["cached_tokens"] == stats["prompt_tokens"] == sum(map(len, prompts))
    assert stats["finished_length"] + stats["finished_stop"] == len(prompts)


def test_a_full_queue_refuses_with_a_retry_hint(make: Callable[..., LocalGenerator]) -> None:
    generator = make(max_batch=1, max_queue=1, prefix_cache_bytes=0)
    prompt = chat(generator, SYSTEMS[0], "Write a long story about paint.")
    started = threading.Event()
    cancel_first = threading.Event()
    first_state = Generation()

    def first() -> None:
        for _ in generator.stream(prompt, GREEDY, 400, [], first_state, cancel_first):
            started.set()

    runner = threading.Thread(target=first)
    runner.start()
    assert started.wait(timeout=120)  # the first request holds the only slot
    waiting = generator.sequence(prompt, GREEDY, 4, [], Generation(), lambda step: None, lambda error: None)
    generator.engine.submit(waiting)  # the one place in the queue
    assert generator.engine.waiting == 1
    refused = generator.sequence(prompt, GREEDY, 4, [], Generation(), lambda step: None, lambda error: None)
    with pytest.raises(Overloaded) as error:
        generator.engine.submit(refused)
    assert error.value.retry_after_s >= 1.0 and generator.engine.stats["rejected"] == 1
    generator.engine.cancel(waiting)
    cancel_first.set()
    runner.join(timeout=120)
    assert first_state.finish_reason == "cancelled" and generator.engine.wait_idle(timeout=60)
