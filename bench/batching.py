"""Continuous batching on the local tier (docs/local-serving.md).

1. Aggregate generation throughput with 1, 4, 8 and 16 concurrent streams (greedy, up to 64 tokens each,
   distinct prompts, all submitted at once), against one stream; p50/p99 time to first token per level.
   The levels run in `--rounds` interleaved rounds (1, 4, 8, 16, then again), and each level's ratio to one
   stream is taken within its round, then the median over rounds: this machine's speed drifts by 20-40%
   within minutes, and one stream's speed varied 66-121 tok/s between four back-to-back single-round runs.
2. What a long prompt does to streams already decoding: four streams run, a 1,000-token prompt arrives, and
   the longest gap between two tokens of the running streams is measured with chunked prefill (256 tokens
   per step) and without (the whole prompt in one step).

    .venv/bin/python bench/batching.py [--model NAME] [--json] [--record] [--quant int8] [--threads N]
        [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from workers.local.catalog import build  # noqa: E402
from workers.local.engine import EngineConfig  # noqa: E402
from workers.local.generate import Generation, LocalGenerator  # noqa: E402
from workers.local.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)
TOPICS = ["a lighthouse keeper", "a lost robot", "a baker in Lyon", "two rival chess players", "a comet",
          "a river that forgot its source", "an old violin", "a city under the sea", "a tired dragon",
          "a beekeeper", "the last train of the night", "a mapmaker", "a garden on Mars", "a clockmaker",
          "a snowstorm in July", "a library that never closes"]


def stream(generator: LocalGenerator, prompt: list[int], tokens: int, times: list[float]) -> Generation:
    """Generate, appending the time of every emitted step to `times`."""
    state = Generation()
    for _ in generator.stream(prompt, GREEDY, tokens, [], state):
        times.append(time.perf_counter())
    return state


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrency_level(generator: LocalGenerator, streams: int, tokens: int) -> dict:
    prompts = [generator.encode(generator.chat_prompt([{"role": "user", "content":
                                                        f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]))
               for i in range(streams)]
    times: list[list[float]] = [[] for _ in prompts]
    states: list[Generation] = [Generation() for _ in prompts]
    started = time.perf_counter()

    def run(i: int) -> None:
        states[i] = stream(generator, prompts[i], tokens, times[i])

    stats = generator.engine.stats
    rows, seconds = stats["decode_rows"], stats["decode_seconds"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    generated = sum(s.completion_tokens for s in states)
    ttft = [t[0] - started for t in times if t]
    decode_tok_s = (stats["decode_rows"] - rows) / (stats["decode_seconds"] - seconds)
    return {"streams": streams, "tokens": generated, "seconds": elapsed, "tok_s": generated / elapsed,
            "decode_tok_s": decode_tok_s, "ttft_p50_ms": percentile(ttft, 0.5) * 1000,
            "ttft_p99_ms": percentile(ttft, 0.99) * 1000}


def prefill_stall(folder: Path, threads: int | None, chunk: int) -> dict:
    """Max gap between tokens of 4 running streams while a 1,000-token prompt is prefilled."""
    generator = LocalGenerator(folder, threads=threads, engine=EngineConfig(prefill_chunk=chunk,
                                                                             prefix_cache_bytes=0))
    prompts = [generator.encode(generator.chat_prompt([{"role": "user", "content":
                                                        f"Write a long story about {TOPICS[i]}."}]))
               for i in range(4)]
    long_prompt = (generator.encode(" ".join(f"Paragraph {i}: the weather was mild and the roads were quiet."
                                             for i in range(120))))[:1000]
    times: list[list[float]] = [[] for _ in prompts]
    runners = [threading.Thread(target=stream, args=(generator, p, 160, times[i])) for i, p in enumerate(prompts)]
    for t in runners:
        t.start()
    while min(len(t) for t in times) < 8:  # all four are decoding
        time.sleep(0.01)
    arrived = time.perf_counter()
    long_times: list[float] = []
    stream(generator, long_prompt, 1, long_times)
    first_long = long_times[0] if long_times else time.perf_counter()
    for t in runners:
        t.join()
    generator.close()
    gaps = [b - a for series in times for a, b in zip(series, series[1:], strict=False) if b > arrived]
    before = [b - a for series in times for a, b in zip(series, series[1:], strict=False) if b <= arrived]
    return {"chunk": chunk, "max_gap_ms": max(gaps) * 1000, "typical_gap_ms": statistics.median(before) * 1000,
            "long_prompt_ttft_ms": (first_long - arrived) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a catalogue model (fetched if downloadable)")
    parser.add_argument("--quant", default="int8")
    parser.add_argument("--compute", default=None, help="fp32 or int8 (the fast profile); default: per quant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the levels")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    folder = build(args.model, args.quant, compute=args.compute)
    generator = LocalGenerator(folder, threads=args.threads, engine=EngineConfig(max_batch=16, prefix_cache_bytes=0))
    concurrency_level(generator, 2, 8)  # warm-up
    rounds = [[concurrency_level(generator, n, args.tokens) for n in (1, 4, 8, 16)] for _ in range(args.rounds)]
    generator.close()
    for runs in rounds:
        for run in runs:
            run["decode_vs_1"] = run["decode_tok_s"] / runs[0]["decode_tok_s"]
            run["tok_s_vs_1"] = run["tok_s"] / runs[0]["tok_s"]
    median = statistics.median
    levels = [{key: median(runs[i][key] for runs in rounds) for key in rounds[0][i]} for i in range(len(rounds[0]))]
    stalls = [prefill_stall(folder, args.threads, chunk) for chunk in (256, 2048)]
    table = markdown_table(
        ["concurrent streams", "tokens generated", "aggregate decode tok/s", "vs 1 stream (range over rounds)",
         "end-to-end tok/s (prefill included)", "vs 1 stream", "TTFT p50 (ms)", "TTFT p99 (ms)"],
        [[r["streams"], f"{r['tokens']:.0f}", f"{r['decode_tok_s']:.1f}",
          f"{r['decode_vs_1']:.2f}x ({min(x[i]['decode_vs_1'] for x in rounds):.2f}-"
          f"{max(x[i]['decode_vs_1'] for x in rounds):.2f})",
          f"{r['tok_s']:.1f}", f"{r['tok_s_vs_1']:.2f}x", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}"]
         for i, r in enumerate(levels)])
    stall_table = markdown_table(
        ["prefill per step", "longest gap between tokens of 4 running streams (ms)", "their typical gap (ms)",
         "the long prompt's TTFT (ms)"],
        [[f"{s['chunk']} tokens" + (" (chunked)" if s["chunk"] < 1000 else " (whole prompt)"),
          f"{s['max_gap_ms']:.0f}", f"{s['typical_gap_ms']:.0f}", f"{s['long_prompt_ttft_ms']:.0f}"] for s in stalls])
    build_label = args.quant + (f", {args.compute} compute" if args.compute else "")
    notes = (f"Build: {build_label}; greedy, up to {args.tokens} tokens per stream, all streams submitted at once "
             f"(so TTFT includes waiting for the other prompts' prefill); medians of {args.rounds} interleaved "
             "rounds, each ratio taken within its round. Aggregate decode tok/s: sequence-steps "
             "decoded per second spent in decode steps (the engine's counters); end-to-end: tokens generated per "
             "second of wall time. A 1,000-token prompt arriving while four streams decode:\n\n" + stall_table)
    emit(args, f"Continuous batching ({args.model})", "bench/batching.py",
         {"levels": levels, "rounds": rounds, "prefill_stall": stalls}, table, notes)


if __name__ == "__main__":
    main()
