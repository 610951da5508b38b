"""What the semantic cache costs per request and what it serves (docs/semantic-cache.md).

1. Lookup latency (p50/p99) at 10k and 100k entries, all in one partition (the worst case: a lookup only
   reads its own partition), in process and in Redis mode (one XREAD round trip + the local search), at
   the default threshold. Entries: the held-out QQP questions' MiniLM embeddings, topped up to the size
   with mixtures of two of them (normalise(a + b/2)); queries: the other side of each held-out pair.
2. Embedding time of one question (MiniLM ONNX, the request path's other cost), reported separately.
3. Hits and false hits on held-out QQP at the default threshold: per pair (the calibration's measure), and
   as a cache: every held-out pair's first question cached in one partition, every second question looked
   up; a hit on any question other than its own pair's duplicate counts as false.

BLAS threads: numpy's OpenBLAS defaults to one thread per core, and on this 2-core machine, with anything
else running (ONNX Runtime's own threads, redis-server, another process), a 100k-row matrix-vector product
then waits for a descheduled BLAS thread: measured p50 6-8 ms instead of 1.5 ms. The gateway should run
with one BLAS thread (docs/semantic-cache.md); `--blas-threads` (default 1) sets it here.

    .venv/bin/python bench/semantic_cache.py [--json] [--record] [--redis-url URL] [--embeddings FILE.npz]
                                             [--blas-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from gateway.cache.calibration import MAIN, held_out, load_pairs, measure, paraphrase_dir  # noqa: E402
from gateway.cache.embedder import Embedder, SavedEmbeddings  # noqa: E402
from gateway.cache.semantic_index import (  # noqa: E402
    DEFAULT_SIMILARITY_THRESHOLD,
    MemorySemanticIndex,
    SemanticIndex,
)
from gateway.cache.semantic_redis import RedisSemanticIndex  # noqa: E402

SIZES = (10_000, 100_000)
LOOKUPS = 400
TTL_S = 24 * 3600


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3)}


def entries(base: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """`size` unit vectors: the real ones first, then mixtures of two real ones."""
    rng = np.random.default_rng(seed)
    extra = max(0, size - len(base))
    mixed = base[rng.integers(0, len(base), extra)] + 0.5 * base[rng.integers(0, len(base), extra)]
    rows = np.vstack([base[:size], mixed]).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def fill(index: SemanticIndex, rows: np.ndarray, concurrency: int = 16) -> None:
    started = time.perf_counter()
    for start in range(0, len(rows), concurrency):
        await asyncio.gather(*(index.add("bench", row, f"e{start + i}", TTL_S)
                               for i, row in enumerate(rows[start:start + concurrency])))
    print(f"{type(index).__name__}: {len(rows):,} adds in {time.perf_counter() - started:.1f} s", file=sys.stderr)


async def lookup_times(index: SemanticIndex, queries: np.ndarray, threshold: float) -> list[float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        await index.lookup("bench", query, threshold)
        times.append(time.perf_counter() - started)
    return times


async def latencies(base: np.ndarray, queries: np.ndarray, redis_url: str,
                    threshold: float) -> dict[str, dict[str, float]]:
    out = {}
    for size in SIZES:
        rows = entries(base, size)
        memory = MemorySemanticIndex(max_entries=size)
        await fill(memory, rows)
        out[f"memory_{size}"] = percentiles(await lookup_times(memory, queries, threshold))
        writer = RedisSemanticIndex(redis_url, prefix=f"bench:{size}:", max_entries=size)
        reader = RedisSemanticIndex(redis_url, prefix=f"bench:{size}:", max_entries=size)
        await fill(writer, rows)
        await reader.sync()  # a second replica loads what the first wrote
        assert len(reader) == size
        out[f"redis_{size}"] = percentiles(await lookup_times(reader, queries, threshold))
        await writer.aclose()
        await reader.aclose()
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


async def as_a_cache(pairs: list, vectors: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """Every pair's first question cached (one partition), every second question looked up. A hit is judged
    by the human labels of the pack wherever the two texts were labelled (or are the same text); a hit on a
    question never labelled against the query is counted apart (unlabelled)."""
    labels = {frozenset((_norm(p.text_a), _norm(p.text_b))): p.duplicate for p in pairs}
    cached = [p.text_a for p in pairs]
    index = MemorySemanticIndex(max_entries=len(pairs) + 1)
    for i, text in enumerate(cached):
        await index.add("bench", vectors[text], str(i), TTL_S)
    counts = {"hits": 0, "correct": 0, "false": 0, "unlabelled": 0}
    for pair in pairs:
        match = await index.lookup("bench", vectors[pair.text_b], threshold)
        if match is None:
            continue
        counts["hits"] += 1
        served, asked = _norm(cached[int(match.entry_key)]), _norm(pair.text_b)
        label = True if served == asked else labels.get(frozenset((served, asked)))
        counts["correct" if label else "unlabelled" if label is None else "false"] += 1
    labelled = counts["correct"] + counts["false"]
    return counts | {"lookups": len(pairs), "hit_rate": round(counts["hits"] / len(pairs), 4),
                     "false_hit_share": round(counts["false"] / labelled, 4) if labelled else 0.0}


async def embedding_times(embedder: Embedder, texts: list[str]) -> list[float]:
    await embedder.embed(texts[0])  # loads the model
    times = []
    for text in texts:
        started = time.perf_counter()
        await embedder.embed(text)
        times.append(time.perf_counter() - started)
    return times


async def run(args: argparse.Namespace, redis_url: str) -> dict:
    pairs = load_pairs(paraphrase_dir(args.data_dir), MAIN)
    mask = held_out(pairs)
    pairs = [p for p, m in zip(pairs, mask, strict=True) if m]
    embedder = Embedder()
    embed = SavedEmbeddings(args.embeddings, embedder.embed_many) if args.embeddings else embedder.embed_many
    texts = list(dict.fromkeys(t for p in pairs for t in (p.text_a, p.text_b)))
    vectors = dict(zip(texts, embed(texts), strict=True))
    scores = np.array([float(vectors[p.text_a] @ vectors[p.text_b]) for p in pairs])
    labels = np.array([p.duplicate for p in pairs])
    base = np.stack([vectors[p.text_a] for p in pairs])
    queries = np.stack([vectors[p.text_b] for p in pairs[:LOOKUPS]])
    return {
        "threshold": args.threshold,
        "lookup": await latencies(base, queries, redis_url, args.threshold),
        "embedding": percentiles(await embedding_times(embedder, [p.text_b for p in pairs[:200]])),
        "pairs": measure(scores, labels, args.threshold),
        "cache": await as_a_cache(pairs, vectors, args.threshold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=None, help="default: a redis-server of its own on a free port")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding paraphrase/")
    parser.add_argument("--embeddings", type=Path, default=None, help="reuse embeddings saved in this .npz")
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads (0: leave as is)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_SIMILARITY_THRESHOLD,
                        help="cosine similarity a match needs (0.85: the verifier's candidate floor)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    server = None
    if args.redis_url is None:
        from tests.harness import TempRedis

        server = TempRedis(Path(tempfile.mkdtemp(prefix="frugal-bench-redis-")))
        args.redis_url = server.start()
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.blas_threads or None, user_api="blas"):
            result = asyncio.run(run(args, args.redis_url))
    finally:
        if server is not None:
            server.stop()
    lookup, pairs, cache = result["lookup"], result["pairs"], result["cache"]
    rows = [[f"lookup, {size:,} entries, {mode}", lookup[f"{mode}_{size}"]["p50_ms"],
             lookup[f"{mode}_{size}"]["p99_ms"]] for size in SIZES for mode in ("memory", "redis")]
    rows.append(["embedding one question (MiniLM ONNX)", result["embedding"]["p50_ms"],
                 result["embedding"]["p99_ms"]])
    table = markdown_table(["step", "p50 (ms)", "p99 (ms)"], rows) + "\n\n" + markdown_table(
        [f"held-out QQP at threshold {result['threshold']}", "lookups", "hits", "false-hit share", "recall"],
        [["per pair (cached question vs its pair)", pairs["pairs"], pairs["hits"], f"{pairs['false_hit_share']:.2%}",
          f"{pairs['recall']:.2%}"],
         ["as a cache (all first questions cached, one partition; labelled hits)", cache["lookups"],
          f"{cache['hits']} ({cache['unlabelled']} unlabelled)", f"{cache['false_hit_share']:.2%}", "-"]])
    notes = ("Lookups: one partition holding every entry (the worst case), the other side of held-out QQP pairs "
             "as queries; Redis mode is a second replica reading what the first wrote (one XREAD per lookup). "
             f"numpy BLAS threads: {args.blas_threads or 'default'}.")
    emit(args, "Semantic cache (MiniLM, held-out QQP)", "bench/semantic_cache.py", result, table, notes)


if __name__ == "__main__":
    main()
