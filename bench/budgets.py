"""What a budget costs on the request path: a key without a budget against a key with one (each request then
reserves its maximum before the call and settles after), with the counters in SQL (SQLite, the embedded
default) and in Redis, side by side, interleaved.

Starts the stand-in, a redis-server of its own and two gateways (SQL counters, Redis counters; each pinned to
CPU 0 while measured), creates the two virtual keys through the admin API, then measures sequential latency
and wrk throughput (32 connections) per gateway and key. Afterwards checks, for each gateway, that the
budgeted key's spend equals the ledger's sum of its costs and that nothing is left reserved.

    .venv/bin/python bench/budgets.py [--requests N] [--duration S] [--rounds N] [--json] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import yaml
from sqlalchemy import create_engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, markdown_table, pinned, record  # noqa: E402
from bench.gateway_overhead import BIN, latency, start, start_gateway, summary, throughput  # noqa: E402
from gateway.ledger import requests_table  # noqa: E402
from tests.harness import TINY_ROWS, TempRedis, free_port, wait_until, write_dataset  # noqa: E402

ADMIN_KEY = "sk-bench-admin"
BODY = {"model": "via-http", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16}


def budget_check(gateway: dict) -> dict[str, float]:
    """The budgeted key's spend against the ledger's sum of its costs (once the ledger writer caught up)."""
    key = gateway["keys"]["daily budget"]
    engine = create_engine(gateway["ledger"])
    shown = httpx.get(f"{gateway['url']}/admin/keys/{key['id']}",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["budgets"][0]
    query = select(func.count(), func.coalesce(func.sum(requests_table.c.cost_usd), 0)).where(
        requests_table.c.key_id == key["id"])

    def agrees() -> tuple[int, float] | None:
        with engine.connect() as connection:
            count, total = connection.execute(query).one()
        return (int(count), float(total)) if abs(float(total) - shown["spent_usd"]) < 1e-6 else None

    count, total = wait_until(agrees, 30, "the ledger to agree with the budget")
    return {"requests": count, "ledger_usd": total, "budget_spent_usd": shown["spent_usd"],
            "reserved_usd": shown["reserved_usd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per target")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="repeat every target; medians are reported")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    has_wrk = shutil.which("wrk") is not None
    tmp = Path(tempfile.mkdtemp(prefix="frugal-bench-budgets-"))
    data = write_dataset(tmp / "tiny.jsonl.gz", TINY_ROWS)
    os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})
    standin_port = free_port()
    standin_url = f"http://127.0.0.1:{standin_port}"
    standin = start(pinned([str(BIN / "frugal"), "stand-in", "--data", str(data), "--port", str(standin_port)], 1),
                    standin_url + "/healthz", tmp / "standin.log")
    redis = TempRedis(tmp)
    redis_url = redis.start()
    gateways: dict[str, dict] = {}
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        for store in ("sql", "redis"):
            port = free_port()
            ledger = f"sqlite:///{tmp / f'ledger-{store}.db'}"
            config = {
                "models": [{"name": "via-http", "backend": "openai/alpha", "api_base": f"{standin_url}/v1",
                            "transport": "http", "api_key_env": "FRUGAL_BENCH_KEY", "input_cost_per_token": 1e-6,
                            "output_cost_per_token": 2e-6}],
                "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
                "ledger": {"url": ledger, "spill_path": str(tmp / f"spill-{store}.jsonl")},
                **({"redis": {"url": redis_url}} if store == "redis" else {}),
            }
            path = tmp / f"gateway-{store}.yaml"
            path.write_text(yaml.safe_dump(config))
            process = start_gateway(REPO, path, port, "info", tmp / f"gateway-{store}.log",
                                    {"FRUGAL_ADMIN_KEY": ADMIN_KEY})
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            url = f"http://127.0.0.1:{port}"
            keys = {}
            for label, budgets in (("no budget", []), ("daily budget", [{"period": "day", "limit_usd": 1e6}])):
                created = httpx.post(url + "/admin/keys", headers=admin, json={"name": label, "budgets": budgets})
                created.raise_for_status()
                keys[label] = created.json()
            gateways[store] = {"process": process, "url": url, "ledger": ledger, "keys": keys}

        for round_ in range(args.rounds):
            for store, gateway in gateways.items():
                labels = list(gateway["keys"])
                for label in labels if round_ % 2 == 0 else labels[::-1]:
                    secret = gateway["keys"][label]["key"]
                    endpoint = gateway["url"] + "/v1/chat/completions"
                    values = summary(latency(endpoint, BODY, args.requests, {"authorization": f"Bearer {secret}"}))
                    if has_wrk:
                        load = throughput(endpoint, BODY, args.duration, args.connections, tmp, key=secret)
                        values.update({f"wrk_{k}": v for k, v in load.items()})
                    samples.setdefault(f"{store} counters, {label}", []).append(values)

        checks = {store: budget_check(gateway) for store, gateway in gateways.items()}
    finally:
        for gateway in gateways.values():
            gateway["process"].terminate()
            gateway["process"].wait(30)
        standin.terminate()
        standin.wait(30)
        redis.stop()

    results = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    for name, values in results.items():
        base = results[name.replace("daily budget", "no budget")]
        values["added_p50_ms"] = values["p50_ms"] - base["p50_ms"]
        values["rps_change"] = values.get("wrk_rps", float("nan")) / base.get("wrk_rps", float("nan")) - 1
    if args.json:
        print(json.dumps({"results": results, "checks": checks}, indent=2))
    headers = ["target", "p50 ms", "p99 ms", "p50 vs no budget ms", "req/s (1 core, wrk)", "req/s vs no budget"]
    rows = [[name, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", f"{v['added_p50_ms']:+.3f}",
             f"{v.get('wrk_rps', float('nan')):.0f}", f"{v['rps_change']:+.1%}"] for name, v in results.items()]
    table = markdown_table(headers, rows)
    notes = ("Budget check after the load: " + "; ".join(
        f"{store}: {c['requests']} requests, ledger ${c['ledger_usd']:.6f} = budget spent "
        f"${c['budget_spent_usd']:.6f}, ${c['reserved_usd']:g} left reserved" for store, c in checks.items()) +
        f". Medians of {args.rounds} rounds, keys interleaved (alternating first); wrk -c{args.connections}; the "
        "gateway pinned to CPU 0, the stand-in, wrk and Redis on CPU 1.")
    print(table)
    print(notes)
    if args.record:
        record("Budgets on the request path: reserve and settle per request, SQL vs Redis counters",
               "python bench/budgets.py " + " ".join(sys.argv[1:]), table, notes)


if __name__ == "__main__":
    main()
