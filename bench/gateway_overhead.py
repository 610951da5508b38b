"""What the gateway adds to a request: latency at concurrency 1, and throughput on one core.

Starts the stand-in provider and a gateway (pinned to CPU 0) as real processes, then measures the same
request sent straight to the stand-in and through the gateway over each transport (direct HTTP, litellm;
over direct HTTP streamed too, against the stand-in's own stream), and a repeated greedy request that the
gateway answers from its exact response cache.
Latency: sequential keep-alive requests from this process. Throughput: wrk (apt package `wrk`), pinned
with the stand-in to the other core. Checks afterwards that the ledger holds a row for every request.

    .venv/bin/python bench/gateway_overhead.py [--requests N] [--duration S] [--connections C] [--json] [--record]
        [--baseline PATH] [--rounds N]

With `--baseline` (a checkout of an earlier commit, e.g. `git worktree add /tmp/before <commit>`), a second
gateway runs that code with this environment's packages, and every gateway target is measured for both,
back to back, alternating which goes first.

With `--dashboard browser` (or `poller`), the gateway target is measured with the dashboard closed and open,
interleaved round by round (alternating which goes first): open is a headless Chromium page on `/admin`
(signed in, Overview view, refreshing itself every `--dashboard-refresh` seconds; pinned with the stand-in and
wrk to the other core), or, with `poller`, a thread of this process sending exactly the requests that view
sends, at the same rate (`GET /admin/analytics/overview?since&until&granularity=hour`).

    .venv/bin/python bench/gateway_overhead.py --dashboard browser --dashboard-refresh 2 --rounds 3 --record
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml
from sqlalchemy import create_engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, markdown_table, pinned, record  # noqa: E402
from gateway.ledger import requests_table  # noqa: E402
from tests.harness import TINY_ROWS, free_port, write_dataset  # noqa: E402

BIN = Path(sys.executable).parent
KEY = "sk-bench"
ADMIN_KEY = "sk-bench-admin"
CHROMIUM = Path(os.environ.get("FRUGAL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
BODY = {"model": "M", "messages": [{"role": "user", "content": "What is the capital of France?"}]}

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '%s'
"""


def start(command: list[str], url: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "FRUGAL_BENCH_KEY": KEY, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{command} did not become ready")


def latency(url: str, body: dict, requests: int, headers: dict[str, str]) -> list[float]:
    samples = []
    with httpx.Client(headers=headers, timeout=30) as client:
        for _ in range(max(50, requests // 10)):  # warm-up (litellm's first calls are slow)
            client.post(url, json=body).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            response = client.post(url, json=body)
            samples.append(time.perf_counter() - started)
            response.raise_for_status()
    return samples


def throughput(url: str, body: dict, duration: int, connections: int, tmp: Path, key: str = KEY,
               timeout_s: float = 2.0) -> dict[str, float]:
    """wrk (one thread, pinned to CPU 1) POSTing `body` for `duration` s over `connections`: req/s, requests,
    non-2xx answers, socket errors (a request slower than `timeout_s` counts as one), p50 and p99 in ms."""
    script = tmp / "load.lua"
    script.write_text(LUA % (key, json.dumps(body)))
    command = pinned(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", f"{timeout_s:g}s", "--latency",
                      "-s", str(script), url], 1)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    result = {"rps": rps, "requests": total, "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
              "socket_errors": sum(int(g) for g in sockets.groups()) if sockets else 0}
    for q in ("50", "99"):
        match = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", output)
        result[f"p{q}_ms"] = float(match.group(1)) * scale[match.group(2)] if match else float("nan")
    return result


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99),
            "mean_ms": statistics.fmean(samples) * 1000}


class Dashboard:
    """The dashboard open on a gateway while a measurement runs: `browser` (headless Chromium on /admin, its
    Overview refreshing every `refresh_s`) or `poller` (the same requests from a thread, at the same rate).
    `requests` counts the admin API calls it made while open."""

    def __init__(self, mode: str, url: str, refresh_s: float) -> None:
        self.mode, self.url, self.refresh_s = mode, url, refresh_s
        self.requests = 0
        self._stop = threading.Event()
        self._closers: list[Callable[[], None]] = []

    def __enter__(self) -> Dashboard:
        if self.mode == "poller":
            thread = threading.Thread(target=self._poll, daemon=True)
            thread.start()
            self._closers.append(lambda: (self._stop.set(), thread.join(10)))
        else:
            self._open_browser()
        return self

    def _poll(self) -> None:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            client.get("/admin/routes").raise_for_status()  # what the page asks at sign-in
            self.requests += 1
            while not self._stop.is_set():
                until = datetime.now(UTC)
                query = {"since": (until - timedelta(hours=24)).isoformat(), "until": until.isoformat(),
                         "granularity": "hour"}
                client.get("/admin/analytics/overview", params=query).raise_for_status()
                self.requests += 1
                self._stop.wait(self.refresh_s)

    def _open_browser(self) -> None:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only for --dashboard browser

        if not CHROMIUM.is_file():
            raise SystemExit(f"no browser at {CHROMIUM} (apt-get install chromium), or use --dashboard poller")
        playwright = sync_playwright().start()
        # Chromium inherits this process's core (the stand-in's and wrk's): the gateway keeps its own to itself.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{self.url}/admin?refresh={self.refresh_s:g}")
        page.fill("#login-key", ADMIN_KEY)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("[data-kpi=requests]")
        self._page = page
        self._closers.append(lambda: (page.evaluate("1"), browser.close(), playwright.stop()))

    def count(self) -> int:
        """The admin API requests made so far (the page's own count: its resource timings)."""
        if self.mode == "poller":
            return self.requests
        return self._page.evaluate("performance.getEntriesByType('resource')"
                                   ".filter(e => e.name.includes('/admin/') && !e.name.includes('/static/')).length")

    def __exit__(self, *_: object) -> None:
        for close in reversed(self._closers):
            close()


LAUNCH = "import sys; from gateway.cli import main; sys.argv[0] = 'frugal'; main()"


def start_gateway(tree: Path, config: Path, port: int, log_level: str, log: Path,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A gateway run from the code in `tree` (this environment's packages), pinned to CPU 0."""
    command = pinned([sys.executable, "-c", LAUNCH, "serve", "--config", str(config), "--port", str(port),
                      "--log-level", log_level], 0)
    return start(command, f"http://127.0.0.1:{port}/readyz", log, {"PYTHONPATH": str(tree), **(env or {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per target")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk load per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--log-level", default="info", help="the gateway's (info, its default, logs every request)")
    parser.add_argument("--baseline", type=Path, help="an earlier checkout, measured side by side (interleaved)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every target; medians are reported")
    parser.add_argument("--dashboard", choices=("off", "browser", "poller"), default="off",
                        help="measure the gateway with the dashboard closed and open, interleaved")
    parser.add_argument("--dashboard-refresh", type=float, default=2.0,
                        help="seconds between the open dashboard's refreshes (the page's own default is 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.dashboard != "off" and args.baseline:
        parser.error("--dashboard and --baseline are measured one at a time")
    has_wrk = shutil.which("wrk") is not None
    if not has_wrk:
        print("wrk not found (apt-get install wrk): throughput is skipped", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="frugal-bench-"))
    data = write_dataset(tmp / "tiny.jsonl.gz", TINY_ROWS)
    standin_port = free_port()
    standin_url = f"http://127.0.0.1:{standin_port}"
    trees = {"this tree": REPO}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})
    standin = start(pinned([str(BIN / "frugal"), "stand-in", "--data", str(data), "--port", str(standin_port)], 1),
                    standin_url + "/healthz", tmp / "standin.log")
    gateways: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    samples: dict[str, list[dict[str, float]]] = {}
    sent = dict.fromkeys(trees, 0)
    try:
        for label, tree in trees.items():
            port = free_port()
            ledger = f"sqlite:///{tmp / f'ledger-{port}.db'}"
            config = {
                "models": [
                    {"name": name, "backend": "openai/alpha", "api_base": f"{standin_url}/v1",
                     "transport": transport, "api_key_env": "FRUGAL_BENCH_KEY", "input_cost_per_token": 1e-6,
                     "output_cost_per_token": 2e-6}
                    for name, transport in (("via-http", "http"), ("via-litellm", "litellm"))
                ],
                "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
                "ledger": {"url": ledger, "spill_path": str(tmp / f"spill-{port}.jsonl")},
            }
            (tmp / f"gateway-{port}.yaml").write_text(yaml.safe_dump(config))
            process = start_gateway(tree, tmp / f"gateway-{port}.yaml", port, args.log_level,
                                    tmp / f"gateway-{port}.log", {"FRUGAL_ADMIN_KEY": ADMIN_KEY})
            gateways[label] = (process, port, ledger)
        auth = {"authorization": f"Bearer {KEY}"}
        # Without a temperature the requests are sampled, so the response cache lets them through
        # (`bypass`); the last target repeats a greedy request, answered by the exact cache.
        targets = [
            ("gateway, http transport", dict(BODY, model="via-http")),
            ("gateway, http transport, streamed", dict(BODY, model="via-http", stream=True)),
            ("gateway, litellm transport", dict(BODY, model="via-litellm")),
            ("gateway, exact-cache hit", dict(BODY, model="via-http", temperature=0)),
        ]

        def measure(name: str, url: str, body: dict) -> dict[str, float]:
            values = summary(latency(url, body, args.requests, auth))
            if has_wrk:
                load = throughput(url, body, args.duration, args.connections, tmp)
                values.update({f"wrk_{k}": v for k, v in load.items()})
            samples.setdefault(name, []).append(values)
            return values

        labels = list(trees)
        dashboard_requests: dict[str, int] = {}
        if args.dashboard != "off":
            # Dashboard closed vs open, interleaved; the target every dashboard view polls alongside: plain traffic.
            target, body = targets[0]
            port = gateways["this tree"][1]
            url = f"http://127.0.0.1:{port}"
            for round_ in range(args.rounds):
                measure("stand-in direct (baseline)", f"{standin_url}/v1/chat/completions", dict(BODY, model="alpha"))
                for state in ("closed", "open") if round_ % 2 == 0 else ("open", "closed"):
                    name = f"{target} [dashboard {state}]"
                    if state == "closed":
                        values = measure(name, url + "/v1/chat/completions", body)
                    else:
                        with Dashboard(args.dashboard, url, args.dashboard_refresh) as dashboard:
                            time.sleep(args.dashboard_refresh)  # a refresh or two before the measurement
                            before = dashboard.count()
                            values = measure(name, url + "/v1/chat/completions", body)
                            dashboard_requests[f"round {round_ + 1}"] = dashboard.count() - before
                    sent["this tree"] += args.requests + max(50, args.requests // 10) + int(
                        values.get("wrk_requests", 0))
        for round_ in range(args.rounds if args.dashboard == "off" else 0):
            direct = f"{standin_url}/v1/chat/completions"
            measure("stand-in direct (baseline)", direct, dict(BODY, model="alpha"))
            measure("stand-in direct, streamed (baseline)", direct, dict(BODY, model="alpha", stream=True))
            for target, body in targets:
                for label in labels if round_ % 2 == 0 else labels[::-1]:
                    name = target if len(trees) == 1 else f"{target} [{label}]"
                    values = measure(name, f"http://127.0.0.1:{gateways[label][1]}/v1/chat/completions", body)
                    sent[label] += args.requests + max(50, args.requests // 10) + int(values.get("wrk_requests", 0))
    finally:
        for process, port, _ in gateways.values():
            httpx.get(f"http://127.0.0.1:{port}/healthz")
            process.terminate()
            process.wait(30)
        standin.terminate()
        standin.wait(30)
    rows = {}
    for label, (_, _, ledger) in gateways.items():
        engine = create_engine(ledger)
        with engine.connect() as connection:
            rows[label] = connection.execute(select(func.count()).select_from(requests_table)).scalar() or 0
    results = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for name, runs in samples.items()}
    for name, values in results.items():
        base = results["stand-in direct, streamed (baseline)" if "streamed" in name and "stand-in direct, streamed "
                       "(baseline)" in results else "stand-in direct (baseline)"]
        values["added_p50_ms"] = values["p50_ms"] - base["p50_ms"]
        values["added_mean_ms"] = values["mean_ms"] - base["mean_ms"]
    ledger_check = {label: {"requests_answered": sent[label], "ledger_rows": rows[label]} for label in trees}
    if args.json:
        print(json.dumps({"results": results, "ledger": ledger_check}, indent=2))
    headers = ["target", "p50 ms", "p99 ms", "added p50 ms", "added mean ms", "req/s (1 core, wrk)",
               "wrk p50 ms", "non-2xx"]
    table_rows = [[name, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", f"{v['added_p50_ms']:.3f}",
                   f"{v['added_mean_ms']:.3f}", f"{v.get('wrk_rps', float('nan')):.0f}",
                   f"{v.get('wrk_p50_ms', float('nan')):.2f}", int(v.get("wrk_non_2xx", 0))]
                  for name, v in results.items()]
    table = markdown_table(headers, table_rows)
    note = "Ledger check: " + "; ".join(
        f"{label}: {rows[label]} rows for {sent[label]} answered requests "
        f"({'none lost' if rows[label] >= sent[label] else 'ROWS MISSING'})" for label in trees) + "."
    if args.dashboard != "off":
        how = ("a headless Chromium page on /admin (Overview view), pinned with the stand-in and wrk to CPU 1"
               if args.dashboard == "browser" else
               "an HTTP poller thread sending the Overview view's requests (GET /admin/analytics/overview)")
        note += (f" Dashboard open = {how}, refreshing every {args.dashboard_refresh:g} s; admin API requests it "
                 f"made while measured: " + ", ".join(f"{k}: {v}" for k, v in dashboard_requests.items()) +
                 f". Closed and open interleaved over {args.rounds} rounds (alternating first); medians.")
    elif args.rounds > 1 or args.baseline:
        note += (f" Medians of {args.rounds} rounds" + (f"; baseline = {args.baseline}, measured interleaved "
                                                         "with this tree (alternating first)" if args.baseline
                                                         else "") + ".")
    if not args.json:
        print(table)
        print(note)
    if args.record:
        command = "python bench/gateway_overhead.py " + " ".join(sys.argv[1:])
        title = "Gateway hot path" + (f": dashboard closed vs open ({args.dashboard})" if args.dashboard != "off"
                                      else "")
        record(title, command.strip(), table, note)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
