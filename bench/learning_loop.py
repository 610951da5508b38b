"""The learning loop end to end: a cascade whose local tier's threshold is deliberately mis-set learns from its
own traffic (docs/learning.md).

A stream of held-out pack queries (multiple choice, yes/no and short facts: the kinds the packaged judge
vouches for) goes through the gateway. The local model answers live (ONNX Runtime, its packaged judge), and
the top tier is the stand-in replaying recorded answers (gpt-4o / gpt-4-1106-preview / gpt-4, priced as
gpt-4o; as in bench/auto_route.py). Along the stream:
- clients send feedback derived from gold for a share of their requests (`--feedback-rate`);
- the gateway audits accepted local answers at `--audit-rate`, within `--audit-budget` USD per day.

The stream runs in phases:
1. the mis-set threshold (`--misset`);
2. after `frugal cascade refit --from-ledger` has promoted new thresholds (the gateway follows the artifact
   store);
3. after `frugal judge retrain --from-ledger` (when it promotes a candidate; otherwise the phase runs on the
   refit artifact).

The stream is cut into windows of `--window` requests. Per window: the false-accept rate of accepted local
answers, estimated from that window's audit labels with its Wilson 95% interval, against the true one from
gold; and the accuracy and cost per query. Per phase: the same over the whole phase.

    .venv/bin/python bench/learning_loop.py [--per-phase N] [--window W] [--misset T] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from sqlalchemy import create_engine, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import emit, markdown_table  # noqa: E402
from bench.auto_route import LOCAL, PRICES, Query, correct_of, data_dir, start_standin, workload  # noqa: E402
from bench.gateway_overhead import KEY, start  # noqa: E402
from gateway.estimates import wilson  # noqa: E402
from gateway.ledger import labels_table, requests_table  # noqa: E402
from scorer.fit.dataset import load_grid  # noqa: E402
from scorer.fit.grading import golds  # noqa: E402
from tests.harness import free_port  # noqa: E402

BIN = Path(sys.executable).parent
ROUTE = "learning"
ADMIN = "sk-bench-admin"
DATASETS = ("zellinger_mmlu", "routerbench_arc_challenge", "routerbench_winogrande", "overruling", "zellinger_triviaqa")


def config(standin_port: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    top = {"name": "tier-top", "backend": "openai/tier-top", "api_base": f"http://127.0.0.1:{standin_port}/v1",
           "transport": "http", "input_cost_per_token": PRICES["tier-top"][0],
           "output_cost_per_token": PRICES["tier-top"][1], "timeout_s": 60}
    return {"models": [{"name": LOCAL, "backend": LOCAL, "max_retries": 0, "timeout_s": 600}, top],
            "routes": [{"name": ROUTE, "kind": "cascade",
                        "tiers": [{"model": LOCAL, "threshold": args.misset}, {"model": "tier-top"}],
                        "learning": {"audit_rate": args.audit_rate, "audit_budget_usd": args.audit_budget,
                                     "audit_max_tokens": args.max_tokens,
                                     "target_false_accept": args.target}}],
            "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
            "limits": {"requests_per_minute": 100000},
            "cache": {"exact": {"enabled": False}},
            "ledger": {"url": f"sqlite:///{work / 'ledger.db'}", "spill_path": str(work / "spill.jsonl"),
                       "store_content": True},
            "artifacts": {"dir": str(work / "artifacts"), "watch_interval_s": 0.5}}


def feedback_chosen(query_id: str, rate: float) -> bool:
    digest = hashlib.sha256(f"feedback:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def ask(client: httpx.Client, url: str, query: Query, max_tokens: int) -> dict[str, Any]:
    body = {"model": ROUTE, "messages": query.messages, "temperature": 0, "max_tokens": max_tokens}
    started = time.perf_counter()
    reply = client.post(url + "/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    h = reply.headers
    tiers = h.get("x-frugal-tiers", "").split(",")
    latencies = [float(v) / 1000 for v in h.get("x-frugal-tier-latencies-ms", "").split(",") if v]
    local_s = sum(s for t, s in zip(tiers, latencies, strict=False) if t == LOCAL)
    return {"id": h["x-request-id"], "model": h["x-frugal-model"], "version": h.get("x-frugal-route-version"),
            "text": reply.json()["choices"][0]["message"]["content"] or "", "seconds": seconds,
            "cost_usd": float(h["x-frugal-cost-usd"]), "local_s": local_s}


def run_cli(args: list[str], log: Path) -> int:
    """A `frugal` command; its output appended to `log`. Returns its exit code."""
    with log.open("ab") as out:
        out.write(f"\n$ frugal {' '.join(args)}\n".encode())
        out.flush()
        return subprocess.run([str(BIN / "frugal"), *args], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ}, check=False).returncode


def wait_for_version(client: httpx.Client, url: str, artifact: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = client.get(url + "/admin/routes", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"][0]
        if live["artifact"] == artifact:
            return str(live["version"])
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not pick up {artifact}")


def audit_labels(ledger_url: str, ids: list[str]) -> dict[str, str]:
    engine = create_engine(ledger_url)
    with engine.connect() as connection:
        rows = connection.execute(select(labels_table.c.request_id, labels_table.c.label)
                                  .where(labels_table.c.source == "audit")).all()
    engine.dispose()
    wanted = set(ids)
    return {r.request_id: r.label for r in rows if r.request_id in wanted}


def audit_spend(ledger_url: str) -> float:
    engine = create_engine(ledger_url)
    with engine.connect() as connection:
        rows = connection.execute(select(requests_table.c.cost_usd).where(requests_table.c.purpose == "audit")).all()
    engine.dispose()
    return float(sum(r.cost_usd for r in rows))


def judges_at_equal_false_accept(ledger_url: str, ids: set[str], candidate: Path) -> list[list[object]]:
    """On the last phase's labelled local answers (held out from every refit and retrain), the share each
    judge keeps local at the lowest threshold whose false-accept rate is within each level (labels as
    truth, weighted by their sampling; features as the traces kept them)."""
    from gateway.fit.ledger_data import labelled_answers  # noqa: PLC0415
    from gateway.fit.promotion import choose_threshold, evaluate  # noqa: PLC0415
    from scorer.judge import LocalJudge, packaged_judge  # noqa: PLC0415

    held = [a for a in labelled_answers(ledger_url, ROUTE, LOCAL) if a.request_id in ids]
    if not held:
        return []
    x = np.vstack([a.features for a in held])
    good = np.array([a.good for a in held])
    weights = np.array([a.weight for a in held])
    judges = {"packaged": LocalJudge(packaged_judge(LOCAL))}  # type: ignore[arg-type]
    if (candidate / "judge.json").is_file():
        judges["retrained from the ledger"] = LocalJudge(candidate)
    out = []
    for name, judge in judges.items():
        scores = np.array(judge.score_features(x))
        row: list[object] = [name, len(held), f"{(~good).mean():.2f}"]
        for level in FA_LEVELS:
            figures = evaluate(scores, good, weights, choose_threshold(scores, good, weights, level, confident=False))
            row.append(f"{figures.accept_share:.1%}" if figures.false_accept is not None else "0%")
        out.append(row)
    return out


FA_LEVELS = (0.2, 0.3, 0.4, 0.5)


def window_stats(rows: list[dict[str, Any]], labels: dict[str, str], host: float) -> dict[str, Any]:
    local = [r for r in rows if r["model"] == LOCAL]
    audited = [r for r in local if r["id"] in labels]
    bad = sum(1 for r in audited if labels[r["id"]] == "bad")
    interval = wilson(bad, len(audited))
    true = sum(1 for r in local if not r["correct"]) / len(local) if local else None
    return {
        "n": len(rows), "local": len(local), "audited": len(audited), "true_fa": true,
        "estimate": interval,
        "covered": None if interval is None or true is None else interval[1] <= true <= interval[2],
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "cost_usd": float(np.mean([r["cost_usd"] + r["local_s"] * host / 3600 for r in rows])),
        "remote_usd": float(np.mean([r["cost_usd"] for r in rows])),
    }


def plot(path: Path, windows: list[dict[str, Any]], boundaries: list[int], title: str,
         phases: list[str]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    xs = [w["end"] for w in windows]
    est = [w["estimate"] for w in windows]
    for x, e in zip(xs, est, strict=True):
        if e is not None:
            top.plot([x, x], [e[1], e[2]], color="tab:blue", lw=2, alpha=0.6)
    top.scatter([x for x, e in zip(xs, est, strict=True) if e], [e[0] for e in est if e], color="tab:blue", s=18,
                label="estimated from audits (Wilson 95%)")
    top.scatter(xs, [w["true_fa"] if w["true_fa"] is not None else np.nan for w in windows], marker="x",
                color="tab:red", s=24, label="true (gold)")
    top.set_ylabel("false-accept rate of\naccepted local answers")
    top.legend(fontsize=8)
    bottom.plot(xs, [w["accuracy"] for w in windows], "-o", ms=3, label="accuracy")
    twin = bottom.twinx()
    twin.plot(xs, [w["cost_usd"] * 1e6 for w in windows], "-s", ms=3, color="tab:green", label="cost")
    twin.set_ylabel("cost per query (USD per million)")
    handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    bottom.set_ylabel("accuracy")
    bottom.set_xlabel("requests")
    for b in boundaries:
        top.axvline(b, color="grey", ls="--", lw=1)
        bottom.axvline(b, color="grey", ls="--", lw=1)
    for start_at, phase in zip([0, *boundaries], phases, strict=True):
        top.text(start_at + 4, 1.04, phase, fontsize=8, color="grey")
    top.set_ylim(-0.05, 1.12)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-phase", type=int, default=200, help="requests per phase")
    parser.add_argument("--window", type=int, default=40, help="requests per window")
    parser.add_argument("--misset", type=float, default=0.02, help="the local tier's threshold at the start")
    parser.add_argument("--target", type=float, default=0.5, help="the route's target_false_accept")
    parser.add_argument("--audit-rate", type=float, default=0.5)
    parser.add_argument("--audit-budget", type=float, default=0.5, help="USD per day")
    parser.add_argument("--feedback-rate", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--host-usd-per-hour", type=float, default=0.10)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "learning_loop.png")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    grids = {name: load_grid(data_dir() / f"{name}.jsonl.gz") for name in DATASETS}
    gold = {name: golds(grid) for name, grid in grids.items()}
    phases = ["mis-set threshold", "after threshold refit", "after judge retrain"]
    stream = workload(grids, -(-args.per_phase * len(phases) // len(DATASETS)))[: args.per_phase * len(phases)]
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        standin, sport = start_standin(grids, work)
        gport = free_port()
        cfg = work / "gateway.yaml"
        cfg.write_text(yaml.safe_dump(config(sport, work, args)))
        gateway = start([str(BIN / "frugal"), "serve", "--config", str(cfg), "--port", str(gport),
                         "--log-level", "warning"], f"http://127.0.0.1:{gport}/readyz", work / "gateway.log",
                        env={"FRUGAL_ADMIN_KEY": ADMIN})
        url = f"http://127.0.0.1:{gport}"
        ledger_url = f"sqlite:///{work / 'ledger.db'}"
        cli_log = work / "cli.log"
        try:
            with httpx.Client(timeout=900, headers={"authorization": f"Bearer {KEY}"}) as client:
                for index, phase in enumerate(phases):
                    if index == 1:
                        code = run_cli(["cascade", "refit", "--from-ledger", "--route", ROUTE, "--config", str(cfg)],
                                       cli_log)
                        steps.append({"step": "cascade refit", "exit": code})
                        if code == 0:
                            steps[-1]["version"] = wait_for_version(client, url, "v0001")
                    if index == 2:
                        code = run_cli(["judge", "retrain", "--from-ledger", "--route", ROUTE, "--config", str(cfg),
                                        "--keep-candidate", str(work / "candidate")], cli_log)
                        steps.append({"step": "judge retrain", "exit": code})
                        if code == 0:
                            current = (work / "artifacts" / ROUTE / "CURRENT").read_text().strip()
                            steps[-1]["version"] = wait_for_version(client, url, current)
                    for query in stream[index * args.per_phase:(index + 1) * args.per_phase]:
                        answer = ask(client, url, query, args.max_tokens)
                        answer["correct"] = correct_of(answer, query, grids[query.dataset],
                                                       gold[query.dataset][query.q])
                        answer["phase"] = phase
                        answer["dataset"] = query.dataset
                        if feedback_chosen(query.query_id, args.feedback_rate):
                            client.post(url + "/v1/feedback", json={
                                "request_id": answer["id"], "label": "good" if answer["correct"] else "bad"}
                                        ).raise_for_status()
                        rows.append(answer)
                        if len(rows) % 25 == 0:
                            print(f"{len(rows)}/{len(stream)} requests ({phase})", file=sys.stderr)
            time.sleep(2)  # the last audits (they run after the answers; the gateway drains them at shutdown)
        finally:
            gateway.terminate()
            standin.terminate()
            gateway.wait(60)
            standin.wait(30)
        labels = audit_labels(ledger_url, [r["id"] for r in rows])
        spent = audit_spend(ledger_url)
        cli_text = cli_log.read_text() if cli_log.exists() else ""
        last = {r["id"] for r in rows if r["phase"] == phases[-1]}
        equal_fa = judges_at_equal_false_accept(ledger_url, last, work / "candidate")
    windows = []
    for start_at in range(0, len(rows), args.window):
        chunk = rows[start_at:start_at + args.window]
        stats = window_stats(chunk, labels, args.host_usd_per_hour)
        stats["end"] = start_at + len(chunk)
        stats["phase"] = chunk[0]["phase"]
        windows.append(stats)
    by_phase = {phase: window_stats([r for r in rows if r["phase"] == phase], labels, args.host_usd_per_hour)
                for phase in phases}
    judged = [w for w in windows if w["covered"] is not None]
    coverage = sum(1 for w in judged if w["covered"]) / len(judged) if judged else float("nan")

    def fmt(e: tuple[float, float, float] | None) -> str:
        return "-" if e is None else f"{e[0]:.2f} [{e[1]:.2f}, {e[2]:.2f}]"

    table = markdown_table(
        ["phase", "requests", "answered locally", "audited", "false-accept estimate [95% CI]", "true false-accept",
         "accuracy", "cost / query (USD)", "remote spend / query (USD)"],
        [[phase, s["n"], f"{s['local'] / s['n']:.1%}", s["audited"], fmt(s["estimate"]),
          "-" if s["true_fa"] is None else f"{s['true_fa']:.2f}", f"{s['accuracy']:.3f}", f"{s['cost_usd']:.2e}",
          f"{s['remote_usd']:.2e}"] for phase, s in by_phase.items()])
    window_table = markdown_table(
        ["window (requests)", "phase", "local", "audited", "estimate [95% CI]", "true", "inside"],
        [[f"{w['end'] - w['n'] + 1}-{w['end']}", w["phase"], w["local"], w["audited"], fmt(w["estimate"]),
          "-" if w["true_fa"] is None else f"{w['true_fa']:.2f}",
          "-" if w["covered"] is None else ("yes" if w["covered"] else "no")] for w in windows])
    judges_table = markdown_table(
        ["judge", "labelled answers", "share bad", *(f"kept local at false-accept <= {level}" for level in FA_LEVELS)],
        equal_fa)
    rel = args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot
    plot(args.plot, windows, [args.per_phase * i for i in range(1, len(phases))],
         f"learning loop: {len(rows)} requests, local threshold mis-set at {args.misset}, target {args.target}", phases)
    promotions = "; ".join(f"{s['step']}: " + (f"promoted, serving {s['version']}" if s["exit"] == 0 else
                                                 f"refused (exit {s['exit']})") for s in steps)
    notes = (f"Stream: {len(rows)} held-out test queries of {', '.join(DATASETS)} (interleaved), {args.per_phase} per "
             f"phase; route `{LOCAL}` (packaged judge, threshold mis-set at {args.misset}) then the top tier "
             f"(stand-in replaying gpt-4o / gpt-4-1106-preview / gpt-4, priced as gpt-4o); target false-accept "
             f"{args.target}; audits at {args.audit_rate:.0%} of accepted local answers, budget ${args.audit_budget} "
             f"per day; client feedback from gold on {args.feedback_rate:.0%} of requests; local compute priced at "
             f"${args.host_usd_per_hour:g}/h. Promotions: {promotions}. "
             f"True false-accept rate inside the window's interval: {coverage:.0%} of the {len(judged)} windows with "
             f"an estimate (goal: at least 90%). Audit spend: ${spent:.4f} of a ${args.audit_budget} daily budget. "
             f"Windows of {args.window} requests:\n\n{window_table}\n\nThe judges at equal false-accept rates on "
             f"the last phase's labelled local answers (held out from every refit and retrain; labels as truth, "
             f"the threshold chosen on these answers, so an upper bound for both):\n\n{judges_table}\n\n"
             f"Plot: `{rel}`.")
    result = {"phases": by_phase, "windows": windows, "coverage": coverage, "audit_spend_usd": spent,
              "steps": steps, "equal_false_accept": equal_fa, "cli": cli_text[-4000:]}
    emit(args, "The learning loop: audits, estimates, refit and retrain from the ledger", "bench/learning_loop.py",
         result, table, notes)
    if not args.json:
        print(cli_text[-3000:], file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("FRUGAL_BENCH_KEY", KEY)
    main()
