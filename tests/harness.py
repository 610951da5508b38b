"""Real processes for the tests: the stand-in provider, gateways, and a PostgreSQL server."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import yaml
from sqlalchemy import Engine, create_engine, select

from gateway.ledger import requests_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
API_KEY = "sk-test-frugal"


def data_dir() -> Path:
    return Path(os.environ.get("FRUGAL_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def data_file(name: str) -> Path:
    """A file of the shared data pack; skips (fails under CI) when it is not there."""
    path = data_dir() / "cascade" / name
    if not path.is_file():
        missing_data(f"data pack file {path} is missing: set FRUGAL_DATA_DIR to the folder holding cascade/ "
                     f"(by default ../shared/data next to the repository)")
    return path


def missing_data(message: str) -> NoReturn:
    """A test's data is not there: fail under CI (it must be), skip elsewhere, saying how to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Clock:
    """A clock the test moves by hand (`clock.now += 10`): for TTLs and windows without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class Service:
    """A server process, started and stopped by the tests, ready when `ready_path` answers 200."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None,
                 ready_path: str = "/healthz", *, cwd: Path | None = None, unset: Iterable[str] = ()) -> None:
        self.name = name
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        gone = set(unset)
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in gone}
        self.ready_path = ready_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Service:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.is_ready(httpx.get(self.url + self.ready_path, timeout=1.0))
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s, f"{self.name} to be ready")
        return self

    def is_ready(self, response: httpx.Response) -> bool:
        return response.status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: no goodbye, no clean-up (a process that crashed, was OOM-killed, or whose host died)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None


class PoolWorker(Service):
    """A `frugal worker` process serving `model` of the config at `config_path`; ready once it consumes its
    queue (its metrics say so). Its metrics are read with `metrics()`."""

    def __init__(self, tmp: Path, config_path: Path, model: str, env: dict[str, str], concurrency: int = 8) -> None:
        port = free_port()
        super().__init__("worker", [str(BIN / "frugal"), "worker", "--config", str(config_path), "--model", model,
                                    "--concurrency", str(concurrency), "--metrics-port", str(port),
                                    "--metrics-host", "127.0.0.1", "--device", "cpu"],
                         port, tmp, env, ready_path="/metrics")

    def is_ready(self, response: httpx.Response) -> bool:
        return response.status_code == 200 and "frugal_worker_ready 1.0" in response.text

    def metrics(self) -> dict[str, float]:
        """Every sample of the worker's /metrics, by name with its labels (`name{label="value"}`)."""
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

        values = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=5.0).text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values


def write_dataset(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """A data file in the cascade pack's schema (see shared/data/cascade/MANIFEST.md)."""
    fields = ("dataset", "split", "query_id", "query", "gold", "model", "answer", "correct", "cost_usd",
              "input_tokens", "output_tokens", "latency_s", "confidence")
    with gzip.open(path, "wt") as handle:
        for row in rows:
            full = dict.fromkeys(fields)
            full.update(row)
            handle.write(json.dumps(full) + "\n")
    return path


TINY_ROWS = [
    {"dataset": "tiny", "split": "test", "query_id": "q1", "query": "What is the capital of France?",
     "model": "alpha", "answer": "Paris.", "correct": 1.0, "input_tokens": 14, "output_tokens": 2,
     "confidence": -0.05},
    {"dataset": "tiny", "split": "test", "query_id": "q1", "query": "What is the capital of France?",
     "model": "beta", "answer": "The capital of France is Paris, a city on the Seine.", "correct": 1.0},
    {"dataset": "tiny", "split": "test", "query_id": "q2",
     "query": "System: Answer with one word.\n\nUser: Name a primary colour.",
     "model": "alpha", "answer": "Red", "correct": 1.0, "input_tokens": 20, "output_tokens": 1,
     "confidence": -0.5},
]


def standin(tmp: Path, data: list[Path], extra_args: Iterable[str] = ()) -> Service:
    port = free_port()
    args = [str(BIN / "frugal"), "stand-in", "--port", str(port)]
    for path in data:
        args += ["--data", str(path)]
    return Service("standin", args + list(extra_args), port, tmp).start()


def model_entry(name: str, upstream: str, standin_url: str, transport: str = "litellm", **extra: Any) -> dict:
    entry = {"name": name, "backend": f"openai/{upstream}", "api_base": f"{standin_url}/v1",
             "api_key_env": "STANDIN_API_KEY", "transport": transport,
             "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    entry.update(extra)
    return entry


class Gateway(Service):
    """A `frugal serve` process with a config written by the test, and its ledger."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        port = free_port()
        config = dict(config)
        config.setdefault("auth", {"keys": [{"id": "test-key", "key_env": "FRUGAL_TEST_KEY"}]})
        ledger = dict(config.get("ledger") or {})
        ledger.setdefault("url", f"sqlite:///{tmp / f'ledger-{port}.db'}")
        ledger.setdefault("spill_path", str(tmp / f"spill-{port}.jsonl"))
        config["ledger"] = ledger
        self.config = config
        self.config_path = tmp / f"gateway-{port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        full_env = {"FRUGAL_TEST_KEY": API_KEY, "STANDIN_API_KEY": "sk-standin", **(env or {})}
        super().__init__("gateway", [str(BIN / "frugal"), "serve", "--config", str(self.config_path),
                                     "--port", str(port), "--log-level", "info"], port, tmp, full_env,
                         ready_path="/readyz")
        self._engine: Engine | None = None

    @property
    def ledger_url(self) -> str:
        return self.config["ledger"]["url"]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.ledger_url)
        return self._engine

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {API_KEY}"}

    def post(self, path: str, body: Any = None, *, content: bytes | None = None,
             headers: dict[str, str] | None = None, auth: bool = True) -> httpx.Response:
        all_headers = {**(self.headers() if auth else {}), **(headers or {})}
        if content is not None:
            return httpx.post(self.url + path, content=content, headers=all_headers, timeout=60)
        return httpx.post(self.url + path, json=body, headers=all_headers, timeout=60)

    def ledger_row(self, request_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """The ledger row of `request_id`, once the writer has written it."""

        def fetch() -> dict[str, Any] | None:
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(requests_table).where(requests_table.c.id == request_id)
                ).first()
            return dict(row._mapping) if row is not None else None

        return wait_until(fetch, timeout_s, f"ledger row {request_id}")

    def client(self) -> Any:
        """The official openai SDK pointed at this gateway (no SDK retries: tests see every error)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)

    def stop(self) -> int | None:
        if self._engine is not None:
            self._engine.dispose()
        return super().stop()


def find_pg_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


class TempPostgres:
    """A PostgreSQL cluster of the tests' own, in a temporary folder, on a free port."""

    def __init__(self) -> None:
        bindir = find_pg_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (run `make services`)")
        self.bindir = bindir
        # Not under pytest's tmp folder: PostgreSQL refuses to run as root, and its user must reach this.
        self.root = Path(tempfile.mkdtemp(prefix="frugal-test-pg-"))
        self.port = free_port()
        self.datadir = self.root / "pgdata"
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> str:
        if self.user:
            shutil.chown(self.root, self.user)
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust", "-U", "postgres")
        self.resume()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def halt(self) -> None:
        """Stop the server, keeping its data (an outage: `resume` brings it back on the same port)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "pg.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)


class TempRedis:
    """A redis-server of the tests' own on a free port, in memory only (no persistence), so the tests
    never flush or touch a server they did not start."""

    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server binary (run `make services`)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--protected-mode", "no"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}: "
                                     f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(ready, 20.0, "redis-server to answer PING")
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process = None
