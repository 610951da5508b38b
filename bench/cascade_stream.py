"""Time to first token of a streamed cascade answer, against streaming the same model directly.

A cascade must judge an answer before sending it, so every tier before the accepted one is generated in
full. Measured end to end through real processes: the stand-in provider (answers after `--latency-ms`,
streamed chunks each after `--chunk-latency-ms`), a gateway with three routes over the same two models:
`direct` (stream the big model), `accept-1` (cascade whose first tier is always accepted) and `reach-2`
(cascade whose first tier is always rejected, so the big model streams after it).

    .venv/bin/python bench/cascade_stream.py [--requests N] [--latency-ms L] [--chunk-latency-ms C] [--json] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import markdown_table, record  # noqa: E402
from bench.gateway_overhead import start  # noqa: E402
from scorer.fit.dataset import load_grid  # noqa: E402
from scorer.fit.export import save  # noqa: E402
from scorer.fit.train import fit  # noqa: E402
from tests.cascade_data import synthetic_file  # noqa: E402
from tests.harness import free_port  # noqa: E402

BIN = Path(sys.executable).parent


def measure(url: str, route: str, queries: list[str], key: str) -> dict[str, float]:
    ttft, total = [], []
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        for query in queries:
            body = {"model": route, "stream": True, "messages": [{"role": "user", "content": query}]}
            started = time.perf_counter()
            first = None
            with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                for line in reply.iter_lines():
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter() - started
            total.append(time.perf_counter() - started)
            ttft.append(first if first is not None else total[-1])
    return {"ttft_p50_ms": statistics.median(ttft) * 1000, "total_p50_ms": statistics.median(total) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="stand-in delay before every answer")
    parser.add_argument("--chunk-latency-ms", type=float, default=20.0, help="stand-in delay before every chunk")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    key = "sk-bench"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_file(work / "s.jsonl.gz", 200)
        grid = load_grid(data)
        scorer = save(fit(grid.split("train")), work / "scorer")
        sport, gport = free_port(), free_port()
        standin = start([str(BIN / "frugal"), "stand-in", "--data", str(data), "--port", str(sport),
                         "--latency-ms", str(args.latency_ms), "--chunk-latency-ms", str(args.chunk_latency_ms)],
                        f"http://127.0.0.1:{sport}/healthz", work / "standin.log")
        models = [{"name": m, "backend": f"openai/{m}", "api_base": f"http://127.0.0.1:{sport}/v1",
                   "transport": "http", "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}
                  for m in ("cheap", "big")]

        def cascade(name: str, threshold: float) -> dict[str, object]:
            return {"name": name, "kind": "cascade", "scorer": str(scorer),
                    "tiers": [{"model": "cheap", "threshold": threshold}, {"model": "big"}]}

        config = {"models": models, "routes": [{"name": "direct", "models": ["big"]}, cascade("accept-1", 0.0),
                                               cascade("reach-2", 1.0)],
                  "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
                  "ledger": {"url": f"sqlite:///{work / 'ledger.db'}", "spill_path": str(work / "spill.jsonl")}}
        (work / "gateway.yaml").write_text(yaml.safe_dump(config))
        gateway = start([str(BIN / "frugal"), "serve", "--config", str(work / "gateway.yaml"), "--port", str(gport),
                         "--log-level", "warning"], f"http://127.0.0.1:{gport}/readyz", work / "gateway.log")
        url = f"http://127.0.0.1:{gport}"
        try:
            queries = [q for q in grid.split("test").queries][: args.requests]
            measure(url, "direct", queries[:2], key)  # warm-up (the stand-in's tokenizer)
            results = {route: measure(url, route, queries, key) for route in ("direct", "accept-1", "reach-2")}
        finally:
            gateway.terminate()
            standin.terminate()
            gateway.wait(20)
            standin.wait(20)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    base = results["direct"]["ttft_p50_ms"]
    table = markdown_table(["route", "TTFT p50 ms", "TTFT added vs direct ms", "whole answer p50 ms"],
                           [[route, f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p50_ms'] - base:+.1f}",
                             f"{r['total_p50_ms']:.1f}"] for route, r in results.items()])
    print(table)
    if args.record:
        note = (f"Stand-in: {args.latency_ms:g} ms before every answer, {args.chunk_latency_ms:g} ms before every "
                f"streamed chunk; {args.requests} sequential streamed requests per route (answers are one-letter "
                "choices, so one content chunk). `accept-1`: the first tier's whole answer is generated, scored and "
                "sent at once; `reach-2`: the first tier is generated in full and rejected, then the big model "
                "streams.")
        command = "python bench/cascade_stream.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        record("Cascade streaming: time to first token", command.strip(), table, note)


if __name__ == "__main__":
    os.environ.setdefault("FRUGAL_BENCH_KEY", "sk-bench")
    main()
