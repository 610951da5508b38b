"""The gateway's start-up: seconds from launch until `/readyz` answers, and its resident memory once it has
answered through a cascade route (in full and streamed), for this tree and, side by side, an earlier one.

Both gateways serve the same configuration: three models on the stand-in provider and a cascade fitted on
synthetic outcomes (its scorer on ONNX Runtime). Rounds interleave the trees, alternating which goes first;
each gateway runs pinned to CPU 0, the stand-in to CPU 1.

    .venv/bin/python bench/startup.py [--baseline PATH] [--rounds N] [--json] [--record]

`--baseline` is a checkout of an earlier commit (e.g. `git worktree add /tmp/before <commit>`); it runs with
this environment's packages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, emit, markdown_table, pinned  # noqa: E402
from tests.cascade_data import MODELS, synthetic_file  # noqa: E402
from tests.harness import free_port  # noqa: E402

KEY = "sk-bench"
LAUNCH = "import sys; from gateway.cli import main; sys.argv[0] = 'frugal'; main()"


def measure(tree: Path, config: Path, log: Path) -> dict[str, float]:
    """Launch a gateway from `tree`; seconds until ready, then RSS (MiB) after a cascade answer and a stream."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "FRUGAL_BENCH_KEY": KEY, "STANDIN_API_KEY": "sk-standin"}
    command = pinned([sys.executable, "-c", LAUNCH, "serve", "--config", str(config), "--port", str(port),
                      "--log-level", "warning"], 0)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=config.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60, headers={"authorization": f"Bearer {KEY}"}) as client:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the gateway from {tree} exited: {log.read_text()[-2000:]}")
                try:
                    if client.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            ready_s = time.perf_counter() - started
            body = {"model": "frugal/auto", "messages": [{"role": "user", "content": "Question 3 about simple "
                                                          "arithmetic fact number 7: pick A, B, C or D."}]}
            client.post(url + "/v1/chat/completions", json=body).raise_for_status()
            client.post(url + "/v1/chat/completions", json={**body, "stream": True}).raise_for_status()
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return {"ready_s": ready_s, "rss_mib": rss / 1024}
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="an earlier checkout to measure side by side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    from router.fit.fitting import FitOptions, fit_cascade  # noqa: PLC0415 (offline: fits the cascade served)
    from scorer.fit.dataset import load_grid  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix="frugal-startup-"))
    data = synthetic_file(tmp / "synthetic.jsonl.gz", 160)
    fit_cascade(load_grid(data), tmp / "cascade.yaml", FitOptions(folds=3))
    standin_port = free_port()
    standin_url = f"http://127.0.0.1:{standin_port}"
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": name, "backend": f"openai/{name}", "api_base": f"{standin_url}/v1", "transport": "http",
                    "api_key_env": "STANDIN_API_KEY", "max_retries": 0} for name, _, _ in MODELS],
        "routes": [{"name": "frugal/auto", "kind": "cascade", "cascade": "cascade.yaml"}],
        "auth": {"keys": [{"id": "bench", "key_env": "FRUGAL_BENCH_KEY"}]},
        "ledger": {"url": f"sqlite:///{tmp / 'ledger.db'}", "spill_path": str(tmp / "spill.jsonl")},
    }))
    trees = {"this tree": REPO}
    if args.baseline:
        trees = {f"baseline ({args.baseline})": args.baseline.resolve(), **trees}
    standin = subprocess.Popen(pinned([str(Path(sys.executable).parent / "frugal"), "stand-in", "--data", str(data),
                                       "--port", str(standin_port)], 1),
                               stdout=(tmp / "standin.log").open("wb"), stderr=subprocess.STDOUT)
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(standin_url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        labels = list(trees)
        for round_ in range(args.rounds):
            for label in labels if round_ % 2 == 0 else labels[::-1]:
                samples[label].append(measure(trees[label], config, tmp / "gateway.log"))
                print(f"round {round_ + 1} {label}: {samples[label][-1]}", file=sys.stderr)
    finally:
        standin.terminate()
        standin.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {label: {key: {"median": statistics.median(s[key] for s in runs), "min": min(s[key] for s in runs),
                            "max": max(s[key] for s in runs)} for key in ("ready_s", "rss_mib")}
              for label, runs in samples.items()}
    table = markdown_table(
        ["tree", "start-up to ready, s (median)", "min-max", "RSS after a cascade answer, MiB (median)", "min-max"],
        [[label, f"{r['ready_s']['median']:.2f}", f"{r['ready_s']['min']:.2f}-{r['ready_s']['max']:.2f}",
          f"{r['rss_mib']['median']:.1f}", f"{r['rss_mib']['min']:.1f}-{r['rss_mib']['max']:.1f}"]
         for label, r in result.items()])
    notes = (f"{args.rounds} rounds, trees interleaved (alternating first). Config: three stand-in models over the "
             "direct HTTP transport and a fitted cascade route (ONNX Runtime scorer); exact cache on, semantic off.")
    emit(args, "Gateway start-up and memory", "bench/startup.py", result, table, notes)


if __name__ == "__main__":
    main()
