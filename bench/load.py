"""Load: Frugal beside the LiteLLM proxy, each on one core, on the same stand-in provider (issue 23).

Starts the stand-in provider (`frugal stand-in`), a Frugal gateway and the LiteLLM proxy (`litellm --config`,
litellm 1.100.5 with its `proxy` extra) as real processes. Each gateway is pinned to CPU 0 and they never run
load at the same time; wrk, the stand-in and this process (the latency client) are pinned to CPU 1. Both
gateways send the same request to the same stand-in model over HTTP (Frugal: its direct HTTP transport).

Per gateway, per round:
- latency at concurrency 1: sequential keep-alive requests from this process (http.client, no pipelining);
  added = the gateway's percentile minus the same percentile straight to the stand-in, measured in the same
  round;
- req/s at each `--connections` count (wrk, one thread, `--duration` seconds each).
Also Frugal with a cascade route whose first tier is always accepted (threshold 0: the scorer runs on every
answer, the second tier is never called). Gateways are interleaved round by round, alternating which goes
first; the table holds the medians over `--rounds`. Afterwards, Frugal's ledger must hold a row for every
request it answered.

    .venv/bin/python bench/load.py [--rounds 3] [--requests 3000] [--duration 10] [--connections 16,64,256]
        [--quick] [--no-litellm] [--baseline TREE] [--json] [--record]

The LiteLLM proxy runs from its own virtualenv (`--litellm-venv`, default ~/.cache/frugal/litellm-proxy),
created on first use with the `load` optional dependencies of pyproject.toml: they cannot share Frugal's
environment, since litellm's proxy extra needs websockets<16 and rich<14, below Frugal's pins (constraints.txt
holds the proxy's pins, and the two overrides on its `# load venv:` lines). It is configured as a user would
for this job: one model, a master key, no database, `LITELLM_LOCAL_MODEL_COST_MAP=True`, one worker.

With `--baseline TREE` (an earlier copy of the code), a second Frugal gateway runs that tree's code and is
measured beside this tree's, interleaved the same way.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, markdown_table, pinned, record  # noqa: E402
from bench.gateway_overhead import start, start_gateway, throughput  # noqa: E402
from gateway.ledger import requests_table  # noqa: E402
from tests.cascade_data import MODELS, synthetic_file  # noqa: E402
from tests.harness import TINY_ROWS, free_port, write_dataset  # noqa: E402

BIN = Path(sys.executable).parent
KEY = "sk-bench"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_VENV = Path.home() / ".cache" / "frugal" / "litellm-proxy"


# --- the LiteLLM proxy's environment -------------------------------------------------------------------------

def load_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["load"]


def load_constraints(tmp: Path) -> Path:
    """constraints.txt with its `# load venv: pkg==version` lines in place of those packages' own pins."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    overrides = {}
    for line in lines:
        match = re.match(r"#\s*load venv:\s*([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            overrides[match.group(1).lower()] = match.group(2)
    kept = [line for line in lines if not line.startswith("#")
            and line.split("==")[0].strip().lower() not in overrides]
    path = tmp / "load-constraints.txt"
    path.write_text("\n".join(kept + [f"{name}=={version}" for name, version in overrides.items()]) + "\n")
    return path


def litellm_venv(venv: Path, tmp: Path) -> Path:
    """The `litellm` executable of the proxy's own virtualenv, created (and checked) here."""
    executable = venv / "bin" / "litellm"
    marker = venv / ".frugal-load"
    wanted = json.dumps(load_requirements()) + (REPO / "constraints.txt").read_text()
    if executable.exists() and marker.exists() and marker.read_text() == wanted:
        return executable
    print(f"installing the LiteLLM proxy into {venv} (once)", file=sys.stderr)
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "-c",
                    str(load_constraints(tmp)), *load_requirements()], check=True)
    marker.write_text(wanted)
    return executable


# --- measuring ------------------------------------------------------------------------------------------------

def latency(port: int, path: str, body: dict, requests: int, key: str) -> list[float]:
    """Seconds per request, `requests` sequential keep-alive requests after a warm-up."""
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def once() -> None:
        connection.request("POST", path, payload, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"127.0.0.1:{port}{path} answered {response.status}")

    for _ in range(max(100, requests // 10)):  # warm-up (litellm's first calls are slow)
        once()
    samples = []
    gc.collect()
    gc.disable()  # this client's own collections would be counted as the server's tail
    try:
        for _ in range(requests):
            started = time.perf_counter()
            once()
            samples.append(time.perf_counter() - started)
    finally:
        gc.enable()
        connection.close()
    return samples


def cpu_and_wait(pid: int) -> tuple[float, float]:
    """Seconds the process's threads have run, and waited runnable for a CPU (/proc/PID/task/*/schedstat)."""
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000}


# --- the processes --------------------------------------------------------------------------------------------

def start_litellm(executable: Path, standin_url: str, port: int, tmp: Path) -> subprocess.Popen:
    config = {
        "model_list": [{"model_name": "via-http", "litellm_params": {
            "model": "openai/alpha", "api_base": f"{standin_url}/v1", "api_key": KEY}}],
        "general_settings": {"master_key": KEY},
        "litellm_settings": {"telemetry": False},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    command = pinned([str(executable), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                      "--num_workers", "1"], 0)
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "PYTHONPATH": ""}
    return start(command, f"http://127.0.0.1:{port}/health/liveliness", tmp / "litellm.log", env)


def frugal_config(standin_url: str, tmp: Path, port: int, scorer: Path) -> Path:
    models = [{"name": "via-http", "backend": "openai/alpha", "api_base": f"{standin_url}/v1", "transport": "http",
               "api_key_env": "FRUGAL_BENCH_KEY", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}]
    models += [{"name": name, "backend": f"openai/{name}", "api_base": f"{standin_url}/v1", "transport": "http",
                "api_key_env": "FRUGAL_BENCH_KEY", "input_cost_per_token": price / 40,
                "output_cost_per_token": price / 40} for name, _, price in MODELS]
    config = {
        "models": models,
        # threshold 0: every first-tier answer is accepted, after the scorer has judged it
        "routes": [{"name": "cascade", "kind": "cascade", "scorer": str(scorer),
                    "tiers": [{"model": "cheap", "threshold": 0.0}, {"model": "big"}]}],
        "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
        "ledger": {"url": f"sqlite:///{tmp / f'ledger-{port}.db'}", "spill_path": str(tmp / f"spill-{port}.jsonl")},
    }
    path = tmp / f"frugal-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_scorer(tmp: Path) -> tuple[Path, Path]:
    """The synthetic three-model data the tests use, and a cascade (scorer included) fitted on it."""
    from router.fit.fitting import FitOptions, fit_cascade  # noqa: PLC0415 - slow imports, only here
    from scorer.fit.dataset import load_grid  # noqa: PLC0415
    from scorer.fit.train import TrainConfig  # noqa: PLC0415

    data = synthetic_file(tmp / "synthetic.jsonl.gz", 160)
    fit_cascade(load_grid(data), tmp / "cascade.yaml", FitOptions(folds=3, scorer=TrainConfig(learner="logistic")))
    return data, tmp / "cascade.scorer"


# --- the run --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per latency measurement")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per connection count")
    parser.add_argument("--connections", default="16,64,256", help="wrk connection counts")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 500 requests, 3 s of wrk")
    parser.add_argument("--no-litellm", action="store_true", help="Frugal only")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--baseline", type=Path, help="an earlier copy of the code: a second Frugal, interleaved")
    parser.add_argument("--log-level", default="info", help="Frugal's (info, its default, logs every request)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.duration = 1, 500, 3
    counts = [int(c) for c in args.connections.split(",")]
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")

    tmp = Path(tempfile.mkdtemp(prefix="frugal-load-"))
    litellm = None if args.no_litellm else litellm_venv(args.litellm_venv.expanduser(), tmp)
    tiny = write_dataset(tmp / "tiny.jsonl.gz", TINY_ROWS)
    synthetic, scorer = fit_scorer(tmp)
    os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})
    standin_port = free_port()
    standin_url = f"http://127.0.0.1:{standin_port}"
    processes: list[subprocess.Popen] = []
    try:
        standin = start(pinned([str(BIN / "frugal"), "stand-in", "--data", str(tiny), "--data", str(synthetic),
                                "--port", str(standin_port)], 1), standin_url + "/healthz", tmp / "standin.log")
        processes.append(standin)
        # name -> (port, [(target label, model)], ledger url or None, pid)
        gateways: dict[str, tuple[int, list[tuple[str, str]], str | None, int]] = {}
        trees = {"Frugal": REPO} if not args.baseline else {"Frugal [baseline]": args.baseline.resolve(),
                                                            "Frugal": REPO}
        for name, tree in trees.items():
            port = free_port()
            config = frugal_config(standin_url, tmp, port, scorer)
            processes.append(start_gateway(tree, config, port, args.log_level, tmp / f"frugal-{port}.log"))
            gateways[name] = (port, [(name, "via-http"), (f"{name}, cascade (tier 1 accepted)", "cascade")],
                              f"sqlite:///{tmp / f'ledger-{port}.db'}", processes[-1].pid)
        if litellm:
            port = free_port()
            processes.append(start_litellm(litellm, standin_url, port, tmp))
            gateways["LiteLLM proxy"] = (port, [("LiteLLM proxy", "via-http")], None, processes[-1].pid)

        samples: dict[str, list[dict[str, float]]] = {}
        answered = dict.fromkeys(gateways, 0)
        order = list(gateways)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
            direct = percentiles(latency(standin_port, "/v1/chat/completions", {"model": "alpha", "messages": PROMPT},
                                         args.requests, KEY))
            samples.setdefault("stand-in direct", []).append(direct)
            for name in order if round_ % 2 == 0 else order[::-1]:
                port, targets, _, pid = gateways[name]
                for label, model in targets:
                    body = {"model": model, "messages": PROMPT}
                    before = cpu_and_wait(pid)
                    values = percentiles(latency(port, "/v1/chat/completions", body, args.requests, KEY))
                    after = cpu_and_wait(pid)
                    sent = args.requests + max(100, args.requests // 10)
                    values.update({f"added_{k}": values[k] - direct[k] for k in ("p50_ms", "p99_ms")})
                    values.update(cpu_ms=(after[0] - before[0]) / sent * 1000,
                                  wait_ms=(after[1] - before[1]) / sent * 1000)
                    answered[name] += sent
                    for c in counts:
                        before, started = cpu_and_wait(pid), time.monotonic()
                        endpoint = f"http://127.0.0.1:{port}/v1/chat/completions"
                        load = throughput(endpoint, body, args.duration, c, tmp, KEY, timeout_s=10)
                        load["cpu_share"] = (cpu_and_wait(pid)[0] - before[0]) / (time.monotonic() - started)
                        answered[name] += int(load["requests"])
                        values.update({f"c{c}_{k}": v for k, v in load.items()})
                    samples.setdefault(label, []).append(values)
                    print(f"  {label}: p50 {values['p50_ms']:.2f} ms p99 {values['p99_ms']:.2f} ms, " +
                          ", ".join(f"c{c} {values[f'c{c}_rps']:.0f} req/s" for c in counts), file=sys.stderr)
    finally:
        for process in processes[::-1]:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    ledger = {}
    for name, (_, _, url, _) in gateways.items():
        if url:
            with create_engine(url).connect() as connection:
                ledger[name] = (connection.execute(select(func.count()).select_from(requests_table)).scalar() or 0,
                                answered[name])

    results = {label: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
               for label, runs in samples.items()}
    headers = (["target", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU ms/req", "run-queue wait ms/req"] +
               [f"req/s @{c}" for c in counts] + ["CPU 0 share", "req/s per core", "errors"])
    rows = []
    for label, v in results.items():
        errors = sum(int(v.get(f"c{c}_non_2xx", 0) + v.get(f"c{c}_socket_errors", 0)) for c in counts)
        rows.append([label, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}",
                     f"{v['added_p50_ms']:.3f}" if "added_p50_ms" in v else "–",
                     f"{v['added_p99_ms']:.3f}" if "added_p99_ms" in v else "–",
                     f"{v['cpu_ms']:.3f}" if "cpu_ms" in v else "–", f"{v['wait_ms']:.3f}" if "wait_ms" in v else "–"] +
                    [f"{v[f'c{c}_rps']:.0f}" if f"c{c}_rps" in v else "–" for c in counts])
        if f"c{counts[0]}_rps" in v:
            peak = max(counts, key=lambda c: v[f"c{c}_rps"])
            share = v[f"c{peak}_cpu_share"]
            rows[-1] += [f"{share:.0%}", f"{v[f'c{peak}_rps'] / share:.0f}" if share > 0 else "–", errors]
        else:
            rows[-1] += ["–", "–", "–"]
    table = markdown_table(headers, rows)
    notes = [f"Medians of {args.rounds} round(s), gateways interleaved (alternating first). Latency: "
             f"{args.requests} sequential keep-alive requests per target and round (after a warm-up), added = "
             f"minus the same percentile straight to the stand-in in that round. req/s: wrk -t1, {args.duration} s "
             f"per connection count. Gateways pinned to CPU 0; wrk, the stand-in and the latency client to CPU 1. "
             f"Frugal logs at `{args.log_level}`; LiteLLM proxy {load_requirements()[0]} at its default log level, one "
             "worker, master key, "
             "no database (so no spend logs, where Frugal writes a ledger row per request). errors: non-2xx and "
             "socket errors over the wrk runs (medians). CPU ms/req and run-queue wait ms/req: the gateway process's "
             "CPU time, and its time waiting runnable for a CPU (other processes on its core), per request of the "
             "concurrency-1 run (/proc schedstat): the wait is this shared machine's noise in the latencies. CPU 0 "
             "share: the CPU time the gateway got during its peak wrk run, per second; req/s per core = that peak "
             "req/s divided by that share."]
    for name, (rows_, sent) in ledger.items():
        notes.append(f"Ledger check, {name}: {rows_} rows for {sent} answered requests "
                     f"({'none lost' if rows_ >= sent else 'ROWS MISSING'}).")
    for label, v in results.items():
        if f"c{counts[0]}_rps" in v:
            peak = max(v[f"c{c}_rps"] for c in counts)
            notes.append(f"{label}: req/s at " + ", ".join(f"{c}: {v[f'c{c}_rps'] / peak:.0%}" for c in counts) +
                         " of its peak; wrk p99 ms " + ", ".join(f"@{c} {v[f'c{c}_p99_ms']:.1f}" for c in counts) + ".")
    note = " ".join(notes[:1]) + "\n\n" + "\n".join(f"- {n}" for n in notes[1:])
    if args.json:
        print(json.dumps({"results": results, "ledger": ledger}, indent=2))
    else:
        print(table)
        print()
        print(note)
    if args.record:
        record("Load: Frugal vs LiteLLM proxy, one core each (issue 23)",
               "python bench/load.py " + " ".join(a for a in sys.argv[1:] if a != "--record") + " --record",
               table, note)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
