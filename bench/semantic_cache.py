"""What the semantic cache costs per request and what it serves (docs/semantic-cache.md).

1. Lookup latency (p50/p99) at 10k and 100k entries, all in one partition (the worst case: a lookup only
   reads its own partition), in process and in Redis mode (one XREAD round trip + the local search), at
   the default index threshold (the verifier's lookup floor; `--no-verifier`: the cosine-only threshold).
   Entries: the held-out QQP questions' MiniLM embeddings, topped up to the size with mixtures of two of
   them (normalise(a + b/2)); queries: the other side of each held-out pair.
2. Embedding time of one question (MiniLM ONNX, the request path's other cost), and the verifier's time
   per candidate, reported separately.
3. Hits and false hits on held-out QQP with the default rule (cosine, then the verifier): per pair (the
   calibration's measure), and as a cache: every held-out pair's first question cached in one partition,
   every second question looked up. A hit is judged by the annotator panel where it judged the two
   questions (docs/semantic-cache-audit.md), else by QQP's label where the two were labelled (or are the
   same text); a hit on a question never judged against the query is counted apart.

BLAS threads: numpy's OpenBLAS defaults to one thread per core, and on this 2-core machine, with anything
else running (ONNX Runtime's own threads, redis-server, another process), a 100k-row matrix-vector product
then waits for a descheduled BLAS thread: measured p50 6-8 ms instead of 1.5 ms. The gateway should run
with one BLAS thread (docs/semantic-cache.md); `--blas-threads` (default 1) sets it here.

    .venv/bin/python bench/semantic_cache.py [--json] [--record] [--redis-url URL] [--embeddings FILE.npz]
                                             [--blas-threads N] [--no-verifier] [--threshold T]
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
from gateway.cache import calibration  # noqa: E402
from gateway.cache.embedder import Embedder, SavedEmbeddings  # noqa: E402
from gateway.cache.semantic_index import (  # noqa: E402
    DEFAULT_SIMILARITY_THRESHOLD,
    MemorySemanticIndex,
    SemanticIndex,
)
from gateway.cache.semantic_redis import RedisSemanticIndex  # noqa: E402
from gateway.cache.verifier import DEFAULT_VERIFIER_THRESHOLD, lookup_floor, verify  # noqa: E402

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


def judge(pairs: list, labels: np.ndarray) -> dict[frozenset[str], bool]:
    """Whether two (normalised) texts ask the same question, by each pair's label."""
    return {frozenset((_norm(p.text_a), _norm(p.text_b))): bool(label)
            for p, label in zip(pairs, labels, strict=True)}


def accepted(cached: str, asked: str, similarity: float, verifier: bool) -> bool:
    return not verifier or verify(cached, asked, similarity) >= DEFAULT_VERIFIER_THRESHOLD


async def as_a_cache(pairs: list, vectors: dict[str, np.ndarray], threshold: float, verifier: bool,
                     labels: dict[frozenset[str], bool]) -> dict[str, float]:
    """Every pair's first question cached (one partition), every second question looked up (and verified).
    A hit is judged by `labels` wherever the two texts were judged (or are the same text); a hit on a
    question never judged against the query is counted apart (unjudged)."""
    cached = [p.text_a for p in pairs]
    index = MemorySemanticIndex(max_entries=len(pairs) + 1)
    for i, text in enumerate(cached):
        await index.add("bench", vectors[text], str(i), TTL_S)
    counts = {"hits": 0, "correct": 0, "false": 0, "unlabelled": 0}
    for pair in pairs:
        match = await index.lookup("bench", vectors[pair.text_b], threshold)
        if match is None or not accepted(cached[int(match.entry_key)], pair.text_b, match.similarity, verifier):
            continue
        counts["hits"] += 1
        served, asked = _norm(cached[int(match.entry_key)]), _norm(pair.text_b)
        label = True if served == asked else labels.get(frozenset((served, asked)))
        counts["correct" if label else "unlabelled" if label is None else "false"] += 1
    labelled = counts["correct"] + counts["false"]
    return counts | {"lookups": len(pairs), "hit_rate": round(counts["hits"] / len(pairs), 4),
                     "false_hit_share": round(counts["false"] / labelled, 4) if labelled else 0.0}


def verify_times(pairs: list, vectors: dict[str, np.ndarray]) -> list[float]:
    times = []
    for pair in pairs:
        similarity = float(vectors[pair.text_a] @ vectors[pair.text_b])
        started = time.perf_counter()
        verify(pair.text_a, pair.text_b, max(similarity, 0.9))  # judged as a candidate
        times.append(time.perf_counter() - started)
    return times


async def embedding_times(embedder: Embedder, texts: list[str]) -> list[float]:
    await embedder.embed(texts[0])  # loads the model
    times = []
    for text in texts:
        started = time.perf_counter()
        await embedder.embed(text)
        times.append(time.perf_counter() - started)
    return times


async def run(args: argparse.Namespace, redis_url: str) -> dict:
    pairs = calibration.load_pairs(calibration.paraphrase_dir(args.data_dir), calibration.MAIN)
    mask = calibration.held_out(pairs)
    pairs = [p for p, m in zip(pairs, mask, strict=True) if m]
    embedder = Embedder()
    embed = SavedEmbeddings(args.embeddings, embedder.embed_many) if args.embeddings else embedder.embed_many
    texts = list(dict.fromkeys(t for p in pairs for t in (p.text_a, p.text_b)))
    vectors = dict(zip(texts, embed(texts), strict=True))
    cosines = np.array([float(vectors[p.text_a] @ vectors[p.text_b]) for p in pairs])
    hit = np.array([c >= args.threshold and accepted(p.text_a, p.text_b, float(c), args.verifier)
                    for p, c in zip(pairs, cosines, strict=True)])
    panel = calibration.judged_labels(pairs, calibration.load_audit())
    qqp = np.array([p.duplicate for p in pairs])
    base = np.stack([vectors[p.text_a] for p in pairs])
    queries = np.stack([vectors[p.text_b] for p in pairs[:LOOKUPS]])
    return {
        "threshold": args.threshold, "verifier": args.verifier,
        "lookup": await latencies(base, queries, redis_url, args.threshold),
        "embedding": percentiles(await embedding_times(embedder, [p.text_b for p in pairs[:200]])),
        "verify": percentiles(verify_times(pairs[:1000], vectors)),
        "pairs": calibration.measure(hit.astype(float), panel, 1.0),
        "pairs_by_qqp_labels": calibration.measure(hit.astype(float), qqp, 1.0),
        "cache": await as_a_cache(pairs, vectors, args.threshold, args.verifier, judge(pairs, panel)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=None, help="default: a redis-server of its own on a free port")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding paraphrase/")
    parser.add_argument("--embeddings", type=Path, default=None, help="reuse embeddings saved in this .npz")
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads (0: leave as is)")
    parser.add_argument("--no-verifier", dest="verifier", action="store_false",
                        help="cosine alone (the gateway's `verifier: false`)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="cosine the index is queried from (default: the verifier's lookup floor, or the "
                             "cosine-only threshold with --no-verifier)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.threshold is None:
        args.threshold = lookup_floor() if args.verifier else DEFAULT_SIMILARITY_THRESHOLD
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
    rows.append(["verifier, one candidate (features + trees)", result["verify"]["p50_ms"], result["verify"]["p99_ms"]])
    by_qqp = result["pairs_by_qqp_labels"]
    rule = (f"cosine ≥ {result['threshold']} then verifier ≥ {DEFAULT_VERIFIER_THRESHOLD:.3f}" if result["verifier"]
            else f"cosine ≥ {result['threshold']}")
    table = markdown_table(["step", "p50 (ms)", "p99 (ms)"], rows) + "\n\n" + markdown_table(
        [f"held-out QQP, {rule}", "lookups", "hits", "false-hit share (panel)", "(QQP's labels)", "recall (panel)"],
        [["per pair (cached question vs its pair)", pairs["pairs"], pairs["hits"], f"{pairs['false_hit_share']:.2%}",
          f"{by_qqp['false_hit_share']:.2%}", f"{pairs['recall']:.2%}"],
         ["as a cache (all first questions cached, one partition; judged hits)", cache["lookups"],
          f"{cache['hits']} ({cache['unlabelled']} unjudged)", f"{cache['false_hit_share']:.2%}", "-", "-"]])
    notes = ("Lookups: one partition holding every entry (the worst case), the other side of held-out QQP pairs "
             "as queries; Redis mode is a second replica reading what the first wrote (one XREAD per lookup). "
             f"numpy BLAS threads: {args.blas_threads or 'default'}.")
    emit(args, "Semantic cache (MiniLM, held-out QQP)", "bench/semantic_cache.py", result, table, notes)


if __name__ == "__main__":
    main()
