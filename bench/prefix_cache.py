"""What the cross-request prefix cache saves on the local tier (docs/local-serving.md).

1. Time to first token of a 1,000-token prompt whose first 900 tokens were seen before (another prompt
   with the same 900-token beginning ran first), against the same prompt with the cache off; the greedy
   answers must be identical.
2. A 10-turn chat: prompt tokens computed over the conversation with the cache and without.

    .venv/bin/python bench/prefix_cache.py [--json] [--record] [--quant int8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from workers.local.catalog import build  # noqa: E402
from workers.local.engine import EngineConfig  # noqa: E402
from workers.local.generate import Generation, LocalGenerator  # noqa: E402
from workers.local.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)
DOCUMENT = (
    "Section {n}. The committee reviewed the maintenance log of pumping station {n}. Valves were replaced in "
    "March, the backup generator was tested monthly, and the flow sensors were recalibrated after the winter "
    "floods. Two incidents were recorded: a power cut lasting forty minutes and a blocked intake screen. "
)
TURNS = ["Hi! I'm planning a vegetable garden. Where should I start?", "What grows well in partial shade?",
         "How often should I water lettuce?", "And tomatoes?", "What about slugs?",
         "Is compost better than fertiliser?", "When should I plant garlic?", "Can I grow herbs indoors?",
         "Which herbs are easiest?", "Thanks! Can you summarise the plan in three bullet points?"]


def first_token_seconds(generator: LocalGenerator, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    state = Generation()
    started = time.perf_counter()
    first = None
    for _ in generator.stream(prompt, GREEDY, max_tokens, [], state):
        first = first or time.perf_counter()
    return (first or time.perf_counter()) - started, state.text


def document_prompt(generator: LocalGenerator, total: int, shared: int, variant: int) -> list[int]:
    """`total` tokens: the first `shared` are the same for every variant, the rest differ."""
    text = "".join(DOCUMENT.format(n=i) for i in range(1, 60))
    head = generator.encode(text)[:shared]
    tail = generator.encode(f" Question {variant}: which incident at station {variant} lasted longest, and why "
                            "does it matter for the next inspection? " + text[:2000])[:total - shared]
    return head + tail


def ttft(generator: LocalGenerator, cold: LocalGenerator, runs: int) -> dict:
    warm_times, cold_times, same = [], [], []
    for run in range(runs):
        seen = document_prompt(generator, 1000, 900, variant=100 + run)
        prompt = document_prompt(generator, 1000, 900, variant=run)
        first_token_seconds(generator, seen, 1)  # the 900-token beginning enters the cache
        warm_s, warm_text = first_token_seconds(generator, prompt, 24)
        cold_s, cold_text = first_token_seconds(cold, prompt, 24)
        warm_times.append(warm_s)
        cold_times.append(cold_s)
        same.append(warm_text == cold_text)
    cold_ms, warm_ms = statistics.median(cold_times) * 1000, statistics.median(warm_times) * 1000
    return {"cold_ttft_ms": cold_ms, "warm_ttft_ms": warm_ms, "speedup": cold_ms / warm_ms,
            "identical_answers": all(same), "runs": runs}


def chat(generator: LocalGenerator) -> dict:
    messages: list[dict] = [{"role": "system", "content": "You are a friendly gardening expert. Keep answers short."}]
    stats = generator.engine.stats
    before = dict(stats)
    started = time.perf_counter()
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        state = Generation()
        prompt = generator.encode(generator.chat_prompt(messages))
        list(generator.stream(prompt, GREEDY, 48, [], state))
        messages.append({"role": "assistant", "content": state.text})
    return {"prompt_tokens": stats["prompt_tokens"] - before["prompt_tokens"],
            "computed_tokens": stats["prefill_tokens"] - before["prefill_tokens"],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="int8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    folder = build("smollm2-135m-instruct", args.quant)
    cached = LocalGenerator(folder, threads=args.threads, engine=EngineConfig())
    uncached = LocalGenerator(folder, threads=args.threads, engine=EngineConfig(prefix_cache_bytes=0))
    first = ttft(cached, uncached, args.runs)
    with_cache, without_cache = chat(cached), chat(uncached)
    cached.close()
    uncached.close()
    result = {"ttft_1000_tokens_900_seen": first, "chat_10_turns": {"with_cache": with_cache,
                                                                    "without_cache": without_cache}}
    table = markdown_table(
        ["measure", "without cache", "with cache", "ratio"],
        [["time to first token, 1,000-token prompt, first 900 seen before (ms, median)",
          f"{first['cold_ttft_ms']:.0f}", f"{first['warm_ttft_ms']:.0f}", f"{first['speedup']:.1f}x faster"],
         ["10-turn chat: prompt tokens computed", without_cache["computed_tokens"], with_cache["computed_tokens"],
          f"{without_cache['computed_tokens'] / max(1, with_cache['computed_tokens']):.1f}x fewer"],
         ["10-turn chat: wall time (s)", f"{without_cache['seconds']:.1f}", f"{with_cache['seconds']:.1f}",
          f"{without_cache['seconds'] / with_cache['seconds']:.2f}x faster"]])
    notes = (f"Answers identical with and without the cache (greedy, 24 tokens): {first['identical_answers']}. "
             f"Build: {args.quant}; the chat's prompts total {with_cache['prompt_tokens']} tokens over 10 turns "
             "(answers up to 48 tokens).")
    emit(args, "Prefix cache (SmolLM2-135M-Instruct)", "bench/prefix_cache.py", result, table, notes)

if __name__ == "__main__":
    main()
