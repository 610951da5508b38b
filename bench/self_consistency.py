"""What self-consistency samples cost the local tier: an answer alone against the same answer with k samples.

The judge asks the local model for k extra sampled answers (`GenerationRequest.samples`). They are submitted
with the answer, find the prompt's keys and values in the prefix cache (only the prompt's last partial block
is computed again) and decode in the same batch, so they should cost a fraction of k new requests. Measured
in process on the local engine (no gateway), on pack queries of every graded kind, interleaved: for each
query, the answer alone and with each k in turn (the order rotating), each under a tenant of its own so that
no run finds another's prompt cached.

    .venv/bin/python bench/self_consistency.py [--queries N] [--samples 2,4,8] [--json] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from router.judge import judge_request  # noqa: E402
from scorer.fit.dataset import load_grid  # noqa: E402
from scorer.fit.outcomes import chosen_queries, messages_of  # noqa: E402
from scorer.signals import JudgeSettings  # noqa: E402
from workers.backend import GenerationRequest  # noqa: E402

DATASETS = ("zellinger_mmlu", "zellinger_triviaqa", "overruling", "routerbench_arc_challenge",
            "routerbench_winogrande")


def data_dir() -> Path:
    return Path(os.environ.get("FRUGAL_DATA_DIR") or REPO.parent / "shared" / "data") / "cascade"


async def measure(backend, queries: list[list[dict[str, str]]], ks: list[int], max_tokens: int) -> dict[int, dict]:
    seconds: dict[int, list[float]] = {k: [] for k in [0, *ks]}
    tokens: dict[int, list[int]] = {k: [] for k in [0, *ks]}
    order = [0, *ks]
    for index, messages in enumerate(queries):
        shift = index % len(order)
        for k in order[shift:] + order[:shift]:
            # a tenant of its own per run: no run finds another's prompt cached (its samples do find its own)
            request = judge_request(GenerationRequest("chat", messages, params={"temperature": 0.0,
                                                                                "max_tokens": max_tokens},
                                                      tenant=f"run-{index}-{k}"), JudgeSettings(samples=k))
            started = time.perf_counter()
            result = await backend.generate(request)
            seconds[k].append(time.perf_counter() - started)
            tokens[k].append(result.usage.completion_tokens + result.sample_tokens)
    return {k: {"median_s": statistics.median(seconds[k]), "mean_s": statistics.fmean(seconds[k]),
                "tokens": statistics.fmean(tokens[k])} for k in seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8, help="queries per dataset")
    parser.add_argument("--samples", default="2,4,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from workers.local.backend import LocalBackend  # noqa: PLC0415
    from workers.local.catalog import resolve  # noqa: PLC0415

    ks = [int(k) for k in args.samples.split(",")]
    queries = []
    for name in DATASETS:
        grid = load_grid(data_dir() / f"{name}.jsonl.gz")
        rows = [q for q in chosen_queries(grid, None) if grid.splits[q] == "test"][: args.queries]
        queries += [messages_of(grid.queries[q]) for q in rows]
    backend = LocalBackend("local/smollm2-135m-instruct", resolve("smollm2-135m-instruct"), isolate_tenants=True)
    try:
        result = asyncio.run(measure(backend, queries, ks, args.max_tokens))
    finally:
        asyncio.run(backend.aclose())
    alone = result[0]["mean_s"]
    table = markdown_table(
        ["samples k", "mean s / request", "median s", "tokens generated", "extra time vs the answer alone",
         "k separate requests would add", "samples cost (share of k requests)"],
        [[k, f"{r['mean_s']:.2f}", f"{r['median_s']:.2f}", f"{r['tokens']:.0f}",
          f"{(r['mean_s'] - alone) / alone:+.0%}", f"{k:+d}00%" if k else "-",
          f"{(r['mean_s'] - alone) / (k * alone):.0%}" if k else "-"] for k, r in result.items()])
    notes = (f"{len(queries)} test queries ({args.queries} from each of {', '.join(DATASETS)}), temperature 0, "
             f"max_tokens {args.max_tokens}; samples at temperature 0.7. Each configuration ran once per query, "
             "interleaved, each run under a tenant of its own (so no run reuses another's cached prompt); the "
             "answer's prompt is computed once and its samples reuse its cached blocks.")
    emit(args, "Self-consistency samples: their cost on the local tier", "bench/self_consistency.py",
         {str(k): v for k, v in result.items()}, table, notes)


if __name__ == "__main__":
    main()
