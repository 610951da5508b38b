"""The analytics admin API's queries on a large ledger (docs/analytics.md).

Seeds a PostgreSQL database of its own (`--db`, dropped and created again unless `--reuse`) with `--rows`
realistic ledger rows spread over the last `--days` days: five routes (two cascades with judged tiers, a
fallback route, two models asked by name), 500 keys of very unequal traffic, cache hits, errors, compression,
shadow audits, log-normal latencies. Rows go in with COPY, a chunk per transaction, and the rollups of each chunk
are written in the same transaction by the ledger's own rollup code (`gateway.rollups.Rollups.write`, what
`Ledger._write` calls).

Then times the query behind each endpoint (the functions the endpoints call, JSON encoding included):
overview by hour and by day over the whole window, funnel and judge histogram of a cascade route, the first
page of traces by time (the last 24 hours) and by key (the whole window), and a deep trace page (a cursor
`--deep` rows in); `--repeat` runs each, p50 and p95. For comparison (`--scan-repeat` runs): the overview
computed by scanning the ledger instead of the rollups, and the judge endpoint's opt-in `learning` estimate
(which reads the ledger).

    .venv/bin/python bench/admin_analytics.py [--rows 1000000] [--days 30] [--reuse] [--record]
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from gateway.admin_analytics import funnel_figures, judge_figures, overview_figures, trace_page  # noqa: E402
from gateway.estimates import ledger_estimates  # noqa: E402
from gateway.ledger import COLUMNS, Ledger, ledger_row, metadata, requests_table  # noqa: E402
from gateway.rollups import Rollups, ensure_indexes, rollups_table, route_top_prices  # noqa: E402
from workers.pricing import TokenPrice  # noqa: E402

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PRICES = {"local-small": TokenPrice(0, 0), "gpt-4o-mini": TokenPrice(1.5e-7, 6e-7),
          "gpt-4o": TokenPrice(2.5e-6, 1e-5), "claude-haiku": TokenPrice(8e-7, 4e-6),
          "claude-sonnet": TokenPrice(3e-6, 1.5e-5)}
CASCADES = {"frugal/auto": ("local-small", "gpt-4o-mini", "gpt-4o"), "frugal/code": ("claude-haiku", "claude-sonnet")}
ROUTES = {**CASCADES, "fast": ("gpt-4o-mini", "claude-haiku")}
#: Traffic share of each name clients ask for.
TRAFFIC = {"frugal/auto": 0.45, "frugal/code": 0.2, "fast": 0.15, "gpt-4o-mini": 0.12, "gpt-4o": 0.08}
THRESHOLDS = {"local-small": 0.62, "gpt-4o-mini": 0.55, "claude-haiku": 0.7}
REASONS = ("score",) * 14 + ("error", "timeout", "capacity", "context_length", "capability", "cooldown")
CHUNK = 20_000


# -- seeding --------------------------------------------------------------------------------------------------------
def _cascade(rng: random.Random, route: str, prompt: int, completion: int) -> tuple[dict[str, Any], str, float]:
    tiers, cost = [], 0.0
    models = CASCADES[route]
    for position, model in enumerate(models):
        last = position == len(models) - 1
        price = PRICES[model].cost(prompt, completion)
        cost += price
        if last:
            tiers.append({"model": model, "outcome": "accepted", "score": None, "threshold": None, "cost_usd": price,
                          "latency_s": rng.uniform(0.3, 3), "reason": None})
            break
        score = min(1.0, max(0.0, rng.betavariate(3, 1.6)))
        reason = None if score >= THRESHOLDS[model] else "score"
        if reason is None and rng.random() < 0.04:
            reason = rng.choice(REASONS[14:])
        if reason not in (None, "score"):
            score, price_paid = None, 0.0
            cost -= price
        else:
            price_paid = price
        outcome = "accepted" if reason is None else ("rejected" if reason == "score" else "failed")
        tiers.append({"model": model, "outcome": outcome, "score": score, "threshold": THRESHOLDS[model],
                      "cost_usd": price_paid, "latency_s": rng.uniform(0.05, 1), "reason": reason})
        if reason is None:
            break
    top = PRICES[models[-1]].cost(prompt, completion)
    trace = {"route": route, "model": tiers[-1]["model"], "attempts": [], "tiers": tiers,
             "accepted_tier": len(tiers), "accepted": True, "saved_usd": top - cost, "version": "config"}
    return trace, tiers[-1]["model"], cost


def seed_rows(count: int, days: int, end: datetime, seed: int = 1) -> Iterator[dict[str, Any]]:
    """`count` ledger rows, created uniformly over the `days` days before `end` (in time order per chunk)."""
    rng = random.Random(seed)
    names, weights = list(TRAFFIC), list(TRAFFIC.values())
    keys = [f"key-{i:03d}" for i in range(500)]
    key_weights = [1 / (i + 1) for i in range(500)]  # Zipf: a few keys make most of the traffic
    span = days * 86400
    for i in range(count):
        created = end - timedelta(seconds=span * (1 - (i + rng.random()) / count))
        route = rng.choices(names, weights)[0]
        prompt, completion = int(rng.lognormvariate(6, 1)), int(rng.lognormvariate(4.5, 0.8))
        status = rng.choices([200, 400, 429, 499, 500, 502, 504], [955, 10, 12, 5, 6, 6, 6])[0]
        cache = "none"
        trace: dict[str, Any] = {"route": route, "attempts": []}
        model: str | None = None
        cost = 0.0
        if status == 200 and rng.random() < 0.15:
            cache = "hit" if rng.random() < 0.7 else "semantic-hit"
            model = rng.choice(ROUTES.get(route, (route,)))
            trace.update(model=model, cache={"result": cache, "saved_usd": PRICES[model].cost(prompt, completion),
                                             "age_s": rng.uniform(1, 3000)})
        elif status < 500 and status != 400 and status != 429:
            if route in CASCADES:
                trace, model, cost = _cascade(rng, route, prompt, completion)
            else:
                model = rng.choice(ROUTES.get(route, (route,)))
                cost = PRICES[model].cost(prompt, completion)
                trace["model"] = model
            if rng.random() < 0.1:
                trace["compression"] = [{"model": model, "outcome": "compressed", "tokens_before": prompt * 2,
                                         "tokens_after": prompt, "saved_usd": PRICES[model].input_per_token * prompt}]
        elif status >= 500:
            trace["model"] = None
            if route in CASCADES:
                trace.update(tiers=[{"model": m, "outcome": "failed", "score": None, "threshold": THRESHOLDS.get(m),
                                     "cost_usd": 0.0, "latency_s": 1.0, "reason": "error"} for m in CASCADES[route]],
                             accepted_tier=None, accepted=None, saved_usd=None)
        if status >= 400:
            prompt, completion = (prompt, 0) if status == 499 else (0, 0)
        latency = rng.lognormvariate(math.log(600 if model and "local" not in model else 150), 0.8)
        audit = route in CASCADES and status == 200 and cache == "none" and rng.random() < 0.02
        yield ledger_row(
            id=f"req-{i:09d}", created_at=created, key_id=rng.choices(keys, key_weights)[0], endpoint="chat",
            route=route, model=model, models_tried=[model] if model else [], status=status,
            error_code=None if status < 400 else "upstream_error", stream=rng.random() < 0.3,
            prompt_tokens=prompt, completion_tokens=completion, tokens_estimated=False, cost_usd=cost,
            latency_ms=latency, ttft_ms=latency / 3, cache=cache, client_disconnected=status == 499, trace=trace,
            route_version=trace.get("version"))
        if audit:
            top = CASCADES[route][-1]
            yield ledger_row(
                id=f"req-{i:09d}-audit", created_at=created + timedelta(seconds=1), key_id=None, endpoint="chat",
                route=route, model=top, models_tried=[top], status=200, stream=False, prompt_tokens=prompt,
                completion_tokens=completion, tokens_estimated=False, cost_usd=PRICES[top].cost(prompt, completion),
                latency_ms=latency * 2, cache="bypass", client_disconnected=False, purpose="audit",
                parent_id=f"req-{i:09d}", trace={"route": route, "model": top, "attempts": [],
                                                   "audit": {"model": model}})


JSON_COLUMNS = {"models_tried", "trace", "prompt"}


def _copy_text(rows: list[dict[str, Any]]) -> bytes:
    """The rows in COPY's text format (tab-separated, \\N for NULL, backslash escapes)."""
    out = io.StringIO()
    for row in rows:
        fields = []
        for name in COLUMNS:
            value = row[name]
            if value is None:
                fields.append("\\N")
                continue
            if name in JSON_COLUMNS:
                value = orjson.dumps(value).decode()
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, bool):
                value = "t" if value else "f"
            else:
                value = str(value)
            fields.append(value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r"))
        out.write("\t".join(fields) + "\n")
    return out.getvalue().encode()


def seed(url: str, count: int, days: int, end: datetime) -> dict[str, float]:
    engine = create_engine(url)
    metadata.create_all(engine)
    ensure_indexes(engine)
    prices = route_top_prices(PRICES.items(), ROUTES.items())
    rollups = Rollups(prices.get)
    started = time.perf_counter()
    written = 0
    chunk: list[dict[str, Any]] = []
    columns = ", ".join(f'"{c}"' for c in COLUMNS)

    def flush() -> None:
        nonlocal written
        with engine.begin() as connection:
            raw = connection.connection.driver_connection
            with raw.cursor() as cursor, cursor.copy(f"COPY {requests_table.name} ({columns}) FROM STDIN") as copy:
                copy.write(_copy_text(chunk))
            rollups.write(connection, chunk)  # the ledger writer's rollup path, in the same transaction
        written += len(chunk)
        chunk.clear()
        rate = written / (time.perf_counter() - started)
        print(f"\r{written:,} rows ({rate:,.0f}/s)", end="", file=sys.stderr)

    for row in itertools.islice(seed_rows(count, days, end), count):  # audit rows included
        chunk.append(row)
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    seeded_s = time.perf_counter() - started
    print(file=sys.stderr)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return {"rows": written, "seed_s": seeded_s, "total_s": time.perf_counter() - started}


def fresh_database(server: str, name: str) -> str:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server).set(database=name).render_as_string(hide_password=False)


# -- timing --------------------------------------------------------------------------------------------------------
def timed(function: Callable[[], Any], repeat: int) -> dict[str, float]:
    function()  # warm: connection, plan cache
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        orjson.dumps(function())
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, math.ceil(0.95 * len(samples)) - 1)]
    return {"p50_ms": statistics.median(samples), "p95_ms": p95,
            "runs": repeat}


def scan_overview(ledger: Ledger, since: datetime, until: datetime) -> list[Any]:
    """The hourly overview's counts straight from the ledger rows (what the rollups avoid)."""
    c = requests_table.c
    hour = func.date_trunc("hour", c.created_at)
    query = (select(hour, func.count(), func.sum(c.cost_usd), func.sum(c.latency_ms),
                    func.percentile_cont(0.95).within_group(c.latency_ms))
             .where(c.created_at >= since, c.created_at < until, c.purpose == "client").group_by(hour))
    with ledger.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(query)]


def measure(url: str, days: int, end: datetime, repeat: int, scan_repeat: int, deep: int) -> list[dict[str, Any]]:
    ledger = Ledger(url, "/dev/null")
    since, until = end - timedelta(days=days), end
    day = end - timedelta(days=1)
    with ledger.engine.connect() as connection:
        busiest = connection.execute(select(requests_table.c.key_id, func.count()).where(
            requests_table.c.created_at >= end - timedelta(days=1)).group_by(requests_table.c.key_id)
            .order_by(func.count().desc()).limit(1)).one()[0]
        cursor_row = connection.execute(select(requests_table.c.created_at, requests_table.c.id)
                                        .order_by(requests_table.c.created_at.desc(), requests_table.c.id.desc())
                                        .offset(deep).limit(1)).one()
        rollup_rows = connection.execute(select(func.count()).select_from(rollups_table)).scalar()
    quiet = "key-499"
    cases: list[tuple[str, Callable[[], Any]]] = [
        (f"overview, hourly, {days} days", lambda: overview_figures(ledger, since, until, "hour", None)),
        (f"overview, daily, {days} days", lambda: overview_figures(ledger, since, until, "day", None)),
        (f"overview, one route, hourly, {days} days",
         lambda: overview_figures(ledger, since, until, "hour", "frugal/auto")),
        (f"funnel, {days} days", lambda: funnel_figures(ledger, "frugal/auto", since, until)),
        (f"judge histogram, {days} days", lambda: judge_figures(ledger, "frugal/auto", since, until)),
        ("traces, first page, last 24 h", lambda: trace_page(ledger, {}, day, until, None, 51)),
        (f"traces, first page, busiest key, {days} days",
         lambda: trace_page(ledger, {"key_id": busiest}, since, until, None, 51)),
        (f"traces, first page, quietest key, {days} days",
         lambda: trace_page(ledger, {"key_id": quiet}, since, until, None, 51)),
        (f"traces, first page, one route, {days} days",
         lambda: trace_page(ledger, {"route": "frugal/code"}, since, until, None, 51)),
        (f"traces, page after a cursor {deep:,} rows in",
         lambda: trace_page(ledger, {}, since, until, (cursor_row[0], cursor_row[1]), 51)),
    ]
    results = [{"query": name, **timed(function, repeat)} for name, function in cases]
    results.append({"query": f"(for comparison) hourly overview scanning the ledger, {days} days",
                    **timed(lambda: scan_overview(ledger, since, until), scan_repeat)})
    results.append({"query": f"(opt-in) judge's `learning` estimate, reads the ledger, {days} days",
                    **timed(lambda: ledger_estimates(ledger, "frugal/auto", since, until), scan_repeat)})
    results[0]["rollup_rows"] = rollup_rows
    ledger.engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--server", default=SERVER, help="a PostgreSQL server URL (its database is not touched)")
    parser.add_argument("--db", default="frugal_bench_analytics", help="the database created for the benchmark")
    parser.add_argument("--reuse", action="store_true", help="time the database seeded by an earlier run")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--scan-repeat", type=int, default=3)
    parser.add_argument("--deep", type=int, default=100_000, help="rows before the cursor of the deep trace page")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    url = make_url(args.server).set(database=args.db).render_as_string(hide_password=False)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    seeding: dict[str, float] | None = None
    if args.reuse:
        engine = create_engine(url)
        with engine.connect() as connection:
            end = connection.execute(select(func.max(requests_table.c.created_at))).scalar() + timedelta(seconds=1)
            count = connection.execute(select(func.count()).select_from(requests_table)).scalar()
        engine.dispose()
        print(f"reusing {count:,} rows in {args.db}", file=sys.stderr)
    else:
        url = fresh_database(args.server, args.db)
        seeding = seed(url, args.rows, args.days, end)
        count = int(seeding["rows"])
    results = measure(url, args.days, end, args.repeat, args.scan_repeat, min(args.deep, count - 1))
    table = markdown_table(["query", "p50 ms", "p95 ms", "runs"],
                           [[r["query"], f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", r["runs"]] for r in results])
    notes = (f"{count:,} ledger rows over {args.days} days on PostgreSQL (database `{args.db}`), "
             f"{results[0]['rollup_rows']:,} hourly rollup rows. Each query is the function its endpoint calls, "
             f"JSON encoding included, on a warm connection; HTTP and auth are not included.")
    if seeding is not None:
        notes += (f" Seeding (COPY and the rollups, {CHUNK:,} rows per transaction): {seeding['seed_s']:.0f} s "
                  f"({seeding['rows'] / seeding['seed_s']:,.0f} rows/s), VACUUM ANALYZE included "
                  f"{seeding['total_s']:.0f} s.")
    emit(args, "Analytics admin API on a 1M-row ledger", "bench/admin_analytics.py",
         {"rows": count, "seeding": seeding, "results": results}, table, notes)


if __name__ == "__main__":
    main()
