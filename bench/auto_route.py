"""`frugal/auto` end to end: the local-first judged cascade against always-local, always-top-model and the
plain fallback route, on a mixed held-out workload (docs/cascade.md, "What it buys").

Real processes: the gateway serves the local model live (ONNX Runtime, its packaged judge); the remote tiers
are the stand-in replaying the data pack's recorded answers. A mid and a top remote tier answer every task
kind: for MMLU and TriviaQA they are gpt-4o-mini and gpt-4o (Zellinger), for ARC, WinoGrande and MBPP
gpt-3.5-turbo-1106 and gpt-4-1106-preview (RouterBench), for OVERRULING gpt-3.5-turbo and gpt-4
(FrugalGPT); the bench writes that renamed copy of the pack to a temporary folder and prices the tiers as
gpt-4o-mini and gpt-4o. Every query goes to every route in turn (the order rotates per query, so no route
always finds the local prompt cached by another).

Grading: the local model's answers as its judge was trained (`scorer.fit.grading`; MBPP answers count as
wrong: the pack has no tests to run them); a remote tier's answer by the pack's recorded correctness.
Cost: what the gateway charged (remote tokens at list prices) plus the local model's time priced at
`--host-usd-per-hour` (its share of a host; stated in the table).

    .venv/bin/python bench/auto_route.py [--per-dataset N] [--host-usd-per-hour X] [--plot PATH] [--json] [--record]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from bench.gateway_overhead import start  # noqa: E402
from scorer.fit.dataset import Grid, load_grid  # noqa: E402
from scorer.fit.grading import GRADED, golds, grade  # noqa: E402
from scorer.fit.outcomes import messages_of  # noqa: E402
from tests.harness import free_port  # noqa: E402

BIN = Path(sys.executable).parent
LOCAL = "local/smollm2-135m-instruct"
#: Per dataset: the recorded models standing in for the mid and the top remote tier.
TIERS = {
    "zellinger_mmlu": ("gpt-4o-mini", "gpt-4o"),
    "zellinger_triviaqa": ("gpt-4o-mini", "gpt-4o"),
    "routerbench_arc_challenge": ("gpt-3.5-turbo-1106", "gpt-4-1106-preview"),
    "routerbench_winogrande": ("gpt-3.5-turbo-1106", "gpt-4-1106-preview"),
    "routerbench_mbpp": ("gpt-3.5-turbo-1106", "gpt-4-1106-preview"),
    "overruling": ("gpt-3.5-turbo", "gpt-4"),
}
PRICES = {"tier-mid": (1.5e-7, 6.0e-7), "tier-top": (2.5e-6, 1.0e-5)}  # gpt-4o-mini, gpt-4o (USD per token)
ROUTES = {
    "frugal/auto": {"kind": "cascade", "models": [LOCAL, "tier-mid", "tier-top"]},
    "local-then-top": {"kind": "cascade", "tiers": [{"model": LOCAL}, {"model": "tier-top"}]},
    "always-local": {"models": [LOCAL]},
    "always-top": {"models": ["tier-top"]},
    "always-mid": {"models": ["tier-mid"]},
    "fallback": {"models": [LOCAL, "tier-mid", "tier-top"]},
}
REPORTED = ("frugal/auto", "frugal/auto+scorer", "local-then-top", "always-local", "always-top", "fallback")
KEY = "sk-bench"


def data_dir() -> Path:
    return Path(os.environ.get("FRUGAL_DATA_DIR") or REPO.parent / "shared" / "data") / "cascade"


@dataclass
class Query:
    dataset: str
    q: int
    query_id: str
    messages: list[dict[str, str]]
    #: recorded correctness of the mid and top tiers
    remote_correct: dict[str, float] = field(default_factory=dict)


def workload(grids: dict[str, Grid], per_dataset: int) -> list[Query]:
    """The first `per_dataset` test queries of each dataset in a hashed order (reproducible), interleaved."""
    chosen: list[list[Query]] = []
    for name, grid in grids.items():
        mid, top = TIERS[name]
        test = [q for q in range(len(grid)) if grid.splits[q] == "test"]
        test.sort(key=lambda q: hashlib.sha256(f"bench:{grid.query_ids[q]}".encode()).hexdigest())
        picked = []
        for q in test[:per_dataset]:
            correct = {"tier-mid": float(grid.correct[q, grid.models.index(mid)]),
                       "tier-top": float(grid.correct[q, grid.models.index(top)])}
            picked.append(Query(name, q, grid.query_ids[q], messages_of(grid.queries[q]), correct))
        chosen.append(picked)
    return [row for group in zip(*chosen, strict=False) for row in group]


def renamed_rows(name: str) -> Iterator[dict[str, Any]]:
    """The pack's rows of the dataset's two stand-in models, renamed tier-mid and tier-top."""
    mid, top = TIERS[name]
    rename = {mid: "tier-mid", top: "tier-top"}
    with gzip.open(data_dir() / f"{name}.jsonl.gz", "rt") as source:
        for line in source:
            row = json.loads(line)
            if row["model"] in rename:
                row["model"] = rename[row["model"]]
                yield row


def renamed_pack(grids: dict[str, Grid], folder: Path) -> list[Path]:
    """One file per dataset of its renamed rows, for the stand-in."""
    files = []
    for name in grids:
        out = folder / f"{name}.jsonl.gz"
        with gzip.open(out, "wt") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in renamed_rows(name))
        files.append(out)
    return files


def start_standin(grids: dict[str, Grid], work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The stand-in replaying the renamed pack of `grids` (files written to `work`), and its port."""
    files = renamed_pack(grids, work)
    port = free_port()
    process = start([str(BIN / "frugal"), "stand-in", *sum((["--data", str(f)] for f in files), []),
                     "--port", str(port)], f"http://127.0.0.1:{port}/healthz", work / "standin.log")
    return process, port


def fitted_mid_tier(grids: dict[str, Grid], folder: Path) -> dict[str, Any]:
    """A cascade route whose local tier is judged by its judge and whose mid tier is judged by a scorer
    fitted on the train split of the renamed pack (all datasets as one; `frugal cascade fit`'s optimizer):
    the 2-tier point of the frontier that is cheapest within a point of the top tier's train accuracy (else
    the most accurate one)."""
    from router.fit.fitting import FitOptions, fit_cascade  # noqa: PLC0415

    data = folder / "mixed.jsonl.gz"
    with gzip.open(data, "wt") as sink:
        for name in grids:
            for row in renamed_rows(name):
                row.update(dataset="mixed", query_id=f"{name}:{row['query_id']}")
                sink.write(json.dumps(row) + "\n")
    # the sources' recorded per-query costs (RouterBench and OVERRULING record no token counts to price)
    fitted = fit_cascade(load_grid(data), folder / "mixed-cascade.yaml",
                         FitOptions(models=["tier-mid", "tier-top"], max_depth=2))
    top = next(p for p in fitted.singles if p.models == ("tier-top",))
    pairs = [p for p in fitted.frontier if p.models == ("tier-mid", "tier-top")]
    close = [p for p in pairs if p.accuracy >= top.accuracy - 0.01]
    point = min(close, key=lambda p: p.cost_usd) if close else max(pairs, key=lambda p: p.accuracy)
    return {"kind": "cascade", "scorer": str(fitted.scorer),
            "tiers": [{"model": LOCAL}, {"model": "tier-mid", "threshold": point.tiers[0].threshold},
                      {"model": "tier-top"}]}


def config(standin_port: int, work: Path, extra_routes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    remote = [{"name": name, "backend": f"openai/{name}", "api_base": f"http://127.0.0.1:{standin_port}/v1",
               "transport": "http", "input_cost_per_token": price[0], "output_cost_per_token": price[1],
               "timeout_s": 60} for name, price in PRICES.items()]
    return {"models": [{"name": LOCAL, "backend": LOCAL, "max_retries": 0, "timeout_s": 600}, *remote],
            "routes": [{"name": name, **route} for name, route in {**ROUTES, **extra_routes}.items()],
            "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
            "limits": {"requests_per_minute": 100000},
            "cache": {"exact": {"enabled": False}},  # every route must answer every query itself
            "ledger": {"url": f"sqlite:///{work / 'ledger.db'}", "spill_path": str(work / "spill.jsonl")}}


def ask(client: httpx.Client, url: str, route: str, query: Query, max_tokens: int) -> dict[str, Any]:
    body = {"model": route, "messages": query.messages, "temperature": 0, "max_tokens": max_tokens,
            "user": query.query_id}
    started = time.perf_counter()
    reply = client.post(url + "/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    h = reply.headers
    tiers = h.get("x-frugal-tiers", "").split(",") if h.get("x-frugal-tiers") else []
    latencies = [float(v) / 1000 for v in h.get("x-frugal-tier-latencies-ms", "").split(",") if v]
    scores = h.get("x-frugal-scores", "").split(",") if h.get("x-frugal-scores") else []
    local_s = 0.0
    if tiers:
        local_s = sum(s for t, s in zip(tiers, latencies, strict=False) if t == LOCAL)
    elif LOCAL in h.get("x-frugal-models-tried", "").split(","):
        local_s = seconds
    return {"model": h["x-frugal-model"], "text": reply.json()["choices"][0]["message"]["content"] or "",
            "seconds": seconds, "cost_usd": float(h["x-frugal-cost-usd"]), "local_s": local_s,
            "accepted": h.get("x-frugal-accepted"), "tiers": tiers, "escalations": h.get("x-frugal-escalations"),
            "local_score": float(scores[0]) if scores and tiers and tiers[0] == LOCAL and scores[0] != "-" else None}


def first_token_s(client: httpx.Client, url: str, route: str, query: Query, max_tokens: int) -> float:
    """Seconds to the first content chunk of a streamed request."""
    body = {"model": route, "messages": query.messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "user": query.query_id}
    started = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():  # read to the end: the next request must not find the model busy
            if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def correct_of(answer: dict[str, Any], query: Query, grid: Grid, gold: Any) -> bool:
    if answer["model"] == LOCAL:
        if query.dataset not in GRADED or gold is None:
            return False  # MBPP (no tests to run) or a query with no known gold: counted wrong
        return grade(query.dataset, grid.queries[query.q], answer["text"], gold)
    return query.remote_correct[answer["model"]] >= 0.5


def summarize(rows: list[dict[str, Any]], host_usd_per_hour: float) -> dict[str, float]:
    cost = [r["cost_usd"] + r["local_s"] * host_usd_per_hour / 3600 for r in rows]
    local = [r for r in rows if r["model"] == LOCAL]
    return {
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "cost_usd": float(np.mean(cost)),
        "local_share": len(local) / len(rows),
        "local_false_accepts": sum(1 for r in local if not r["correct"] and r["accepted"] != "false") / len(rows),
        "unaccepted_share": sum(1 for r in rows if r["accepted"] == "false") / len(rows),
        "p50_ms": statistics.median(r["seconds"] for r in rows) * 1000,
        "p95_ms": float(np.percentile([r["seconds"] for r in rows], 95)) * 1000,
    }


def frontier(runs: dict[str, list[dict[str, Any]]], host: float, upper: str) -> list[tuple[float, float, float]]:
    """(threshold, accuracy, cost) of the local tier's judge at every threshold, the rest answered by
    `upper` (always-mid or always-top, as measured), from the judged route's per-query local scores."""
    judged, above = runs["frugal/auto"], runs[upper]
    local = runs["always-local"]
    points = []
    scores = sorted({r["local_score"] for r in judged if r["local_score"] is not None})
    for t in [-1.0, *scores, 2.0]:
        acc, cost = [], []
        for j, u, loc in zip(judged, above, local, strict=True):
            keep = j["local_score"] is not None and j["local_score"] >= t
            local_cost = j["local_s"] * host / 3600
            if keep:
                acc.append(loc["correct"])
                cost.append(local_cost)
            else:
                acc.append(u["correct"])
                cost.append(local_cost + u["cost_usd"])
        points.append((t, float(np.mean(acc)), float(np.mean(cost))))
    return points


def plot(path: Path, summary: dict[str, dict[str, float]], curves: dict[str, list[tuple[float, float, float]]],
         title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, points in curves.items():
        ordered = sorted(points, key=lambda p: p[2])
        ax.plot([p[2] * 1e6 for p in ordered], [p[1] for p in ordered], "-", lw=1, alpha=0.8,
                label=f"judge threshold swept, rejected -> {label}")
    for marker, route in zip("oP*sD^", REPORTED, strict=False):
        s = summary[route]
        ax.scatter(s["cost_usd"] * 1e6, s["accuracy"], marker=marker, s=90, zorder=4, label=route)
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD per million queries)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-dataset", type=int, default=30, help="test queries per dataset")
    parser.add_argument("--datasets", default=",".join(TIERS), help="comma-separated pack datasets")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--host-usd-per-hour", type=float, default=0.10,
                        help="price of the local model's time (a 2-vCPU host's hourly price)")
    parser.add_argument("--streamed", type=int, default=20, help="queries also streamed, for time to first token")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "auto_route_frontier.png")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    grids = {name: load_grid(data_dir() / f"{name}.jsonl.gz") for name in names}
    gold = {name: golds(grid) for name, grid in grids.items()}
    queries = workload(grids, args.per_dataset)
    runs: dict[str, list[dict[str, Any]]] = {route: [] for route in [*ROUTES, "frugal/auto+scorer"]}
    ttft: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        standin, sport = start_standin(grids, work)
        gport = free_port()
        print("fitting the mid tier's scorer and threshold on the pack's train split", file=sys.stderr)
        extra = {"frugal/auto+scorer": fitted_mid_tier(grids, work)}
        (work / "gateway.yaml").write_text(yaml.safe_dump(config(sport, work, extra)))
        gateway = start([str(BIN / "frugal"), "serve", "--config", str(work / "gateway.yaml"), "--port", str(gport),
                         "--log-level", "warning"], f"http://127.0.0.1:{gport}/readyz", work / "gateway.log")
        url = f"http://127.0.0.1:{gport}"
        try:
            with httpx.Client(timeout=900, headers={"authorization": f"Bearer {KEY}"}) as client:
                for warm in queries[:2]:
                    for route in ("always-local", "always-top"):
                        ask(client, url, route, warm, args.max_tokens)
                order = list(runs)
                for index, query in enumerate(queries):
                    shift = index % len(order)
                    for route in order[shift:] + order[:shift]:
                        answer = ask(client, url, route, query, args.max_tokens)
                        grid = grids[query.dataset]
                        answer["correct"] = correct_of(answer, query, grid, gold[query.dataset][query.q])
                        answer["dataset"] = query.dataset
                        runs[route].append(answer)
                    if (index + 1) % 10 == 0:
                        print(f"{index + 1}/{len(queries)} queries", file=sys.stderr)
                streamed = queries[: args.streamed]
                for index, query in enumerate(streamed):
                    pair = ("frugal/auto", "always-local") if index % 2 == 0 else ("always-local", "frugal/auto")
                    for route in pair:
                        ttft.setdefault(route, []).append(first_token_s(client, url, route, query, args.max_tokens))
        finally:
            gateway.terminate()
            standin.terminate()
            gateway.wait(30)
            standin.wait(30)
    # rows were appended in workload order for every route, so runs[r][i] is query i for every r
    summary = {route: summarize(rows, args.host_usd_per_hour) for route, rows in runs.items()}
    by_dataset = {route: {name: summarize([r for r in rows if r["dataset"] == name], args.host_usd_per_hour)
                          for name in names} for route, rows in runs.items()}
    curves = {"tier-mid": frontier(runs, args.host_usd_per_hour, "always-mid"),
              "tier-top": frontier(runs, args.host_usd_per_hour, "always-top")}
    top = summary["always-top"]
    escalations: dict[str, int] = {}
    for row in runs["frugal/auto"]:
        for reason in (row["escalations"] or "").split(","):
            if reason not in ("", "-"):
                escalations[reason] = escalations.get(reason, 0) + 1
    table = markdown_table(
        ["route", "accuracy", "vs top (points)", "mean cost / query (USD)", "cost vs top", "answered locally",
         "local false accepts", "not accepted", "p50 ms", "p95 ms"],
        [[route, f"{s['accuracy']:.3f}", f"{(s['accuracy'] - top['accuracy']) * 100:+.1f}", f"{s['cost_usd']:.2e}",
          f"{s['cost_usd'] / top['cost_usd']:.1%}", f"{s['local_share']:.1%}", f"{s['local_false_accepts']:.1%}",
          f"{s['unaccepted_share']:.1%}", f"{s['p50_ms']:.0f}", f"{s['p95_ms']:.0f}"]
         for route, s in summary.items() if route in REPORTED])
    kinds = markdown_table(
        ["dataset", "queries", "local accuracy", "frugal/auto accuracy", "frugal/auto+scorer accuracy",
         "top accuracy", "answered locally", "local false accepts"],
        [[name, sum(1 for q in queries if q.dataset == name), f"{by_dataset['always-local'][name]['accuracy']:.3f}",
          f"{by_dataset['frugal/auto'][name]['accuracy']:.3f}",
          f"{by_dataset['frugal/auto+scorer'][name]['accuracy']:.3f}",
          f"{by_dataset['always-top'][name]['accuracy']:.3f}",
          f"{by_dataset['frugal/auto'][name]['local_share']:.1%}",
          f"{by_dataset['frugal/auto'][name]['local_false_accepts']:.1%}"] for name in names])
    budget = [p for p in curves["tier-top"] if p[0] >= 0]
    within = [p for p in budget if _false_accepts(runs, p[0]) <= 0.02]
    best = min(within, key=lambda p: p[0]) if within else None
    take = _local_share(runs, best[0]) if best else 0.0
    rel = args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot
    plot(args.plot, summary, curves, f"frugal/auto on {len(queries)} mixed held-out queries "
         f"(local compute at ${args.host_usd_per_hour:g}/h)")
    notes = (f"{len(queries)} test-split queries ({args.per_dataset} per dataset: {', '.join(names)}), each sent "
             f"to every route in turn; temperature 0, max_tokens {args.max_tokens}. Local compute priced at "
             f"${args.host_usd_per_hour:g} per hour of the host. Remote tiers: the stand-in replaying recorded "
             "answers (mid: gpt-4o-mini / gpt-3.5-turbo-1106 / gpt-3.5-turbo; top: gpt-4o / gpt-4-1106-preview / "
             "gpt-4, priced as gpt-4o-mini and gpt-4o). frugal/auto is the default shape (local judged, then the "
             "mid tier unjudged, then the top); frugal/auto+scorer also judges the mid tier, with a scorer and "
             "threshold fitted on the pack's train split (`frugal cascade fit` on the renamed pack); "
             "local-then-top skips the mid tier. Escalations of frugal/auto by reason: "
             f"{json.dumps(escalations)}. At a 2% false-accept budget (the lowest judge threshold whose local false "
             f"accepts stay within 2% of all queries on this workload) the local tier takes {take:.1%} of it. "
             f"Streamed (first {args.streamed} queries, interleaved), time to first token p50: "
             + ", ".join(f"{route} {statistics.median(v) * 1000:.0f} ms" for route, v in ttft.items()) + ". "
             f"Per dataset:\n\n{kinds}\n\n"
             "A stronger local model, judged by nothing but its answer's log-prob (recorded answers of the small "
             "open models in the Zellinger packs; threshold chosen on train, shown on test):\n\n"
             f"{stronger_models()}\n\nPlot: `{rel}`.")
    result = {"summary": summary, "by_dataset": by_dataset, "escalations": escalations, "frontier": curves,
              "local_share_at_2pct": take, "ttft_p50_s": {r: statistics.median(v) for r, v in ttft.items()}}
    emit(args, "frugal/auto: the local-first judged cascade end to end", "bench/auto_route.py", result, table, notes)


def stronger_models() -> str:
    """What a stronger local model could take: for the small open models the Zellinger packs recorded (with
    their answer's log-prob as the only judge), the share of test queries accepted at the lowest confidence
    threshold whose false accepts stay within 2% of all train queries (chosen on train, applied to test)."""
    from scorer.fit.judge_build import choose_threshold  # noqa: PLC0415

    rows = []
    for name in ("zellinger_mmlu", "zellinger_triviaqa"):
        grid = load_grid(data_dir() / f"{name}.jsonl.gz")
        train, test = grid.splits == "train", grid.splits == "test"
        for model in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b"):
            j = grid.models.index(model)
            conf = np.nan_to_num(grid.confidence[:, j], nan=-1e9)
            correct = grid.correct[:, j]
            t = choose_threshold(conf[train], correct[train], 0.02)
            accepted = conf[test] >= t
            rows.append([name, model, f"{correct[test].mean():.3f}", f"{accepted.mean():.1%}",
                         f"{(accepted & (correct[test] < 0.5)).mean():.1%}"])
    return markdown_table(["dataset", "model (recorded)", "accuracy", "accepted at a 2% false-accept budget",
                           "false accepts (test)"], rows)


def _false_accepts(runs: dict[str, list[dict[str, Any]]], threshold: float) -> float:
    judged, local = runs["frugal/auto"], runs["always-local"]
    wrong = sum(1 for j, loc in zip(judged, local, strict=True)
                if j["local_score"] is not None and j["local_score"] >= threshold and not loc["correct"])
    return wrong / len(judged)


def _local_share(runs: dict[str, list[dict[str, Any]]], threshold: float) -> float:
    judged = runs["frugal/auto"]
    return sum(1 for j in judged if j["local_score"] is not None and j["local_score"] >= threshold) / len(judged)


if __name__ == "__main__":
    os.environ.setdefault("FRUGAL_BENCH_KEY", KEY)
    main()
