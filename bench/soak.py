"""Soak: one gateway under a fixed request rate for a long time, through a worker restart and a Redis restart.

Real processes: the stand-in provider (the upstream), a redis-server of its own on a free port (broker, shared
state and caches; append-only file in the run's folder, as a production broker has), one `frugal worker` serving
a pooled SmolLM2-135M, and one `frugal serve` gateway (Redis for rate limits, cooldowns and the exact cache, a
SQLite ledger in the run's folder). An open-loop generator sends `--rate` requests per second (each at its
scheduled time, whatever the earlier ones are doing) for `--minutes`:

- sampled answers from the stand-in, plain and streamed, over the direct HTTP transport and through litellm;
- greedy requests over a small set of prompts (plain and streamed): answered by the exact cache in Redis;
- a small share (`--pooled-share`) to the `local-first` cascade whose first tier is the pooled local model
  (`--pooled-direct`: to the pooled model itself, which has no retries, so that every failure of the pool
  reaches the client); sampled, 16 tokens, plain and streamed.

Every `--interval` seconds it samples the gateway's RSS (VmRSS) and CPU time, and the CPU time of every process
of the run and of the whole machine (so that a run disturbed by other load says so); each request's latency and
outcome are kept. At 1/3 of the run the worker is restarted (SIGTERM, wait for it to finish its requests and
exit, start a new one), at 1/2 Redis (stopped, down `--redis-down-s`, started again on the same port and folder).

The report: per-minute rows (per interval for runs under 10 minutes), then a summary with the acceptance
figures of issue 23, each marked PASS or MISS: the gateway's RSS after warm-up (the first `--warmup-share` of
the run) flat within 5%, no errors, p99 stable (per interval, outside the restart phases: the highest at most
2x the median). Errors are counted by status and by phase (normal, worker restart, Redis restart: from the
action until the component is back plus `--settle-s`), with what each kind of error said, and the warnings
of the gateway's and workers' logs. `--keep` keeps the run's folder (logs, ledger, Redis data) for a closer look.

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 100] [--pooled-share 0.01] [--record] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, markdown_table  # noqa: E402
from gateway.ledger import requests_table  # noqa: E402
from tests.harness import (  # noqa: E402
    API_KEY,
    TINY_ROWS,
    Gateway,
    PoolWorker,
    Service,
    TempRedis,
    model_entry,
    standin,
    write_dataset,
)

POOLED = "pooled-smol"
#: The route the pooled share is sent to: the pooled model first, the remote model when it cannot answer (as a
#: deployment's local-first cascade does). `--pooled-direct` sends it to the pooled model itself.
LOCAL_FIRST = "local-first"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Acceptance figures of issue 23.
RSS_FLAT_PCT = 5.0
P99_STABLE_RATIO = 2.0


# -- what is sent ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request of the mix."""

    name: str
    model: str
    stream: bool = False
    greedy: bool = False  # temperature 0 over a few prompts: the exact cache answers after the first

    @property
    def pooled(self) -> bool:
        return self.model in (POOLED, LOCAL_FIRST)


#: The remote part of the mix and its shares (scaled to 1 - pooled share); the pooled share is split in two.
REMOTE_MIX: list[tuple[Kind, float]] = [
    (Kind("plain", "remote-http"), 0.35),
    (Kind("stream", "remote-http", stream=True), 0.20),
    (Kind("litellm", "remote-litellm"), 0.10),
    (Kind("cached", "remote-http", greedy=True), 0.20),
    (Kind("cached-stream", "remote-http", stream=True, greedy=True), 0.15),
]
def mix(pooled_share: float, pooled_direct: bool = False) -> list[tuple[Kind, float]]:
    remote = [(kind, share * (1 - pooled_share)) for kind, share in REMOTE_MIX]
    target = POOLED if pooled_direct else LOCAL_FIRST
    pooled = [Kind("pooled", target), Kind("pooled-stream", target, stream=True)]
    return remote + [(kind, pooled_share / len(pooled)) for kind in pooled]


def body(kind: Kind, index: int, prompts: int) -> bytes:
    if kind.pooled:  # sampled, so that every one reaches the worker
        request: dict[str, Any] = {"messages": [{"role": "user", "content": f"Count from {index % 7} to twenty."}],
                                   "max_tokens": 16, "temperature": 0.7}
    elif kind.greedy:
        k = index % prompts
        request = {"messages": [{"role": "user", "content": f"Soak question {k}: what is {k} plus {k}?"}],
                   "max_tokens": 64, "temperature": 0}
    else:  # no temperature: sampled, the cache lets it through
        request = {"messages": [{"role": "user", "content": f"Soak request {index}: what is {index % 997} times 3?"}],
                   "max_tokens": 64}
    request["model"] = kind.model
    if kind.stream:
        request.update(stream=True, stream_options={"include_usage": True})
    return orjson.dumps(request)


# -- what came back ------------------------------------------------------------------------------------------
@dataclass
class Log:
    """Every request, in the order they were sent: start (seconds into the run), latency, kind, outcome."""

    kinds: list[Kind]
    start: array = field(default_factory=lambda: array("d"))
    latency: array = field(default_factory=lambda: array("d"))
    kind: array = field(default_factory=lambda: array("B"))
    done: array = field(default_factory=lambda: array("B"))  # 0 in flight, 1 ok, 2 failed
    hit: array = field(default_factory=lambda: array("B"))
    errors: dict[int, str] = field(default_factory=dict)  # request index -> error key
    messages: dict[str, Counter[str]] = field(default_factory=dict)  # error key -> its messages (numbers blanked)
    lag: array = field(default_factory=lambda: array("d"))  # how late each request left (the generator's lag)

    def begin(self, start: float, kind: int, lag: float) -> int:
        self.start.append(start)
        self.latency.append(0.0)
        self.kind.append(kind)
        self.done.append(0)
        self.hit.append(0)
        self.lag.append(lag)
        return len(self.start) - 1

    def finish(self, index: int, latency: float, hit: bool, error: str | None, message: str = "") -> None:
        self.latency[index] = latency
        self.hit[index] = hit
        self.done[index] = 2 if error else 1
        if error:
            key = f"{'pooled' if self.kinds[self.kind[index]].pooled else 'remote'}: {error}"
            self.errors[index] = key
            self.messages.setdefault(key, Counter())[blank(message[:300])] += 1

    def window(self, a: float, b: float) -> range:
        return range(bisect.bisect_left(self.start, a), bisect.bisect_left(self.start, b))


def blank(text: str) -> str:
    """`text` with its ids and numbers replaced by N, so that messages differing only in them count together."""
    return re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "N", text)


def _error_body(raw: bytes) -> tuple[str, str]:
    """(code or type, message) of an OpenAI-style error body."""
    try:
        error = orjson.loads(raw)["error"]
        return str(error.get("code") or error.get("type") or "?"), str(error.get("message") or "")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?", raw[:300].decode(errors="replace")


async def send(session: aiohttp.ClientSession, url: str, payload: bytes, stream: bool
               ) -> tuple[bool, str | None, str]:
    """One request: (answered from the cache, error key or None, error message)."""
    try:
        async with session.post(url, data=payload) as reply:
            if reply.status != 200:
                code, message = _error_body(await reply.read())
                return False, f"HTTP {reply.status} {code}", message
            hit = reply.headers.get("x-frugal-cache") == "hit"
            if not stream:
                await reply.read()
                return hit, None, ""
            finished = False
            async for line in reply.content:
                if line.startswith(b'data: {"error"'):
                    code, message = _error_body(line[6:])
                    return hit, f"stream error {code}", message
                finished = finished or line.startswith(b"data: [DONE]")
            return hit, None if finished else "stream cut (no [DONE])", ""
    except TimeoutError:
        return False, "client timeout", f"no complete answer within the client's timeout ({url})"
    except aiohttp.ClientError as exc:
        return False, type(exc).__name__, str(exc)


# -- the processes ------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, every process)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / CLOCK_TICKS  # less idle and iowait


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PersistentRedis(TempRedis):
    """The harness's redis-server with an append-only file in `folder`: a restart on the same port and folder
    keeps the queues, the shared state and the cache, as a production broker does."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        data = folder / "redis-data"
        data.mkdir(exist_ok=True)
        self.args += ["--dir", str(data), "--appendonly", "yes"]  # later options override the harness's


@dataclass
class Processes:
    """The stand-in, Redis, the worker and the gateway; CPU seconds by role, counted per process id."""

    tmp: Path
    upstream: Service
    redis: TempRedis
    gateway: Gateway
    worker: PoolWorker
    cpu: dict[tuple[str, int], float] = field(default_factory=dict)
    busy_at_start: float = field(default_factory=machine_busy_seconds)
    busy: float = 0.0  # the machine's busy CPU seconds since start, at the last reading
    started: float = field(default_factory=time.monotonic)
    read_at: float = 0.0
    load_averages: list[float] = field(default_factory=list)
    #: CPU seconds of the processes already running when the run starts (a process started later: 0).
    baseline: dict[tuple[str, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.read_cpu()
        self.baseline = dict(self.cpu)

    def pids(self) -> Iterator[tuple[str, int]]:
        for role, service in (("stand-in", self.upstream), ("gateway", self.gateway), ("worker", self.worker),
                              ("redis", self.redis)):
            if service.process is not None:
                yield role, service.process.pid
        yield "load generator (this process)", os.getpid()

    def read_cpu(self) -> None:
        for role, pid in self.pids():
            seconds = cpu_seconds(pid)
            if seconds is not None:
                self.cpu[role, pid] = seconds
        self.busy = machine_busy_seconds() - self.busy_at_start
        self.read_at = time.monotonic()
        self.load_averages.append(float(Path("/proc/loadavg").read_text().split()[0]))

    def cpu_by_role(self) -> dict[str, float]:
        """CPU use by role since the start, in % of one core, and that of every other process of the machine."""
        totals: Counter[str] = Counter()
        for (role, pid), seconds in self.cpu.items():
            totals[role] += seconds - self.baseline.get((role, pid), 0.0)
        totals["everything else on the machine"] = max(0.0, self.busy - sum(totals.values()))
        elapsed = self.read_at - self.started
        return {role: 100 * seconds / elapsed for role, seconds in totals.items()}

    def restart_worker(self) -> tuple[float, str]:
        """SIGTERM (Celery's warm shutdown: running requests finish), then a new worker: (seconds until it is
        ready, what happened)."""
        self.read_cpu()
        started = time.monotonic()
        self.worker.stop()
        exited = time.monotonic() - started
        self.worker = PoolWorker(self.tmp, self.gateway.config_path, POOLED, self.worker.env)
        self.worker.start(timeout_s=180)
        ready = time.monotonic() - started
        return ready, f"the old one exited after {exited:.1f} s, the new one ready after {ready:.1f} s"

    def restart_redis(self, down_s: float) -> tuple[float, str]:
        """Stop redis-server, wait `down_s`, start it on the same port and folder: (seconds until it answers,
        what happened)."""
        self.read_cpu()
        started = time.monotonic()
        self.redis.stop()
        time.sleep(down_s)
        self.redis.start()
        back = time.monotonic() - started
        return back, f"answering again after {back:.1f} s"

    def stop(self) -> None:
        for service in (self.gateway, self.worker, self.upstream):
            service.stop()
        self.redis.stop()


def start_processes(tmp: Path, args: argparse.Namespace) -> Processes:
    from workers.local.catalog import build  # noqa: PLC0415 (seconds to import; built once, then reused)

    model_dir = build("smollm2-135m-instruct", "int8")
    data = write_dataset(tmp / "tiny.jsonl.gz", TINY_ROWS)
    upstream = standin(tmp, [data], ["--latency-ms", str(args.upstream_latency_ms),
                                     "--chunk-latency-ms", str(args.chunk_latency_ms)])
    redis = PersistentRedis(tmp)
    redis.start()
    env = {"REDIS_URL": redis.url, "FRUGAL_TEST_KEY": API_KEY}
    config = {
        "models": [
            model_entry("remote-http", "alpha", upstream.url, transport="http"),
            model_entry("remote-litellm", "beta", upstream.url, transport="litellm"),
            {"name": POOLED, "backend": "local/smollm2-135m-instruct", "model_dir": str(model_dir), "threads": 1,
             "pool": {},
             # No retries: every failure of the pool reaches the client (the router's retries would hide them).
             "max_retries": 0},
        ],
        "routes": [{"name": LOCAL_FIRST, "kind": "cascade",
                    "tiers": [{"model": POOLED, "judge": "none"}, {"model": "remote-http"}]}],
        # A limit no request reaches: every request still runs the shared rate limit's Lua script in Redis.
        "limits": {"requests_per_minute": 10_000_000},
    }
    gateway = Gateway(tmp, config, env)
    gateway.args[-1] = args.log_level  # the harness's `--log-level info`
    gateway.start()
    worker = PoolWorker(tmp, gateway.config_path, POOLED, {**env, "STANDIN_API_KEY": "sk-standin"})
    worker.start(timeout_s=180)
    return Processes(tmp, upstream, redis, gateway, worker)


# -- the run ------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    t: float
    rss_mib: float
    gateway_cpu_s: float


@dataclass
class Phase:
    name: str
    start: float
    end: float = float("inf")  # the component is back, plus the settle time


@dataclass
class Run:
    log: Log
    samples: list[Sample] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    duration: float = 0.0
    dropped: int = 0  # requests not sent: too many in flight already

    def phase_of(self, t: float) -> str:
        return next((p.name for p in self.phases if p.start <= t < p.end), "normal")


async def drive(args: argparse.Namespace, processes: Processes) -> Run:
    kinds_shares = mix(args.pooled_share, args.pooled_direct)
    kinds = [kind for kind, _ in kinds_shares]
    run = Run(Log(kinds))
    duration = args.minutes * 60
    url = processes.gateway.url + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    chooser = random.Random(args.seed)
    weights = [share for _, share in kinds_shares]
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout_s),
                                    connector=aiohttp.TCPConnector(limit=args.max_in_flight))
    t0 = loop.time()

    def now() -> float:
        return loop.time() - t0

    async def one(index: int, kind: Kind, payload: bytes) -> None:
        started = loop.time()
        hit, error, message = await send(session, url, payload, kind.stream)
        run.log.finish(index, loop.time() - started, hit, error, message)

    async def sampler() -> None:
        gateway_pid = processes.gateway.process.pid if processes.gateway.process else 0
        while True:
            rss, cpu = rss_mib(gateway_pid), cpu_seconds(gateway_pid)
            processes.read_cpu()
            if rss is not None and cpu is not None:
                sample = Sample(now(), rss, cpu)
                previous = run.samples[-1] if run.samples else None
                run.samples.append(sample)
                if previous is not None:
                    share = 100 * (sample.gateway_cpu_s - previous.gateway_cpu_s) / (sample.t - previous.t)
                    sent = len(run.log.start)
                    print(f"[{sample.t:7.1f} s] sent {sent}, failed {len(run.log.errors)}, in flight "
                          f"{len(in_flight)}; gateway RSS {rss:.1f} MiB, CPU {share:.0f}% of a core",
                          file=sys.stderr, flush=True)
            await asyncio.sleep(args.interval)

    async def restart(name: str, at: float, action: Callable[[], tuple[float, str]], what: str) -> None:
        await asyncio.sleep(max(0.0, at - now()))
        phase = Phase(name, now())
        run.phases.append(phase)
        run.events.append((phase.start, f"{name}: {what}"))
        back, outcome = await asyncio.to_thread(action)
        run.events.append((phase.start + back, f"{name}: {outcome}"))
        phase.end = phase.start + back + args.settle_s

    async def restarts() -> None:
        if not args.no_restarts:
            await restart("worker restart", duration / 3, processes.restart_worker, "SIGTERM")
            await restart("Redis restart", duration / 2, partial(processes.restart_redis, args.redis_down_s),
                          "redis-server stopped")

    background = [loop.create_task(sampler()), loop.create_task(restarts())]
    try:
        index = 0
        while (due := index / args.rate) < duration:
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            index += 1
            kind = chooser.choices(range(len(kinds)), weights)[0]
            if len(in_flight) >= args.max_in_flight:
                run.dropped += 1
                continue
            request = run.log.begin(now(), kind, max(0.0, now() - due))
            task = loop.create_task(one(request, kinds[kind], body(kinds[kind], index, args.prompts)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        run.duration = now()
        processes.read_cpu()
        await background[1]  # a restart still under way (only in very short runs)
        if in_flight:
            await asyncio.wait(in_flight, timeout=args.timeout_s + 5)
    finally:
        for task in background:
            task.cancel()
        await session.close()
    return run


# -- the report ---------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"  # NaN: no request of that kind


def spread(values: list[float]) -> str:
    """min / median / max, in ms."""
    if not values:
        return "- / - / -"
    return f"{ms(min(values))} / {ms(statistics.median(values))} / {ms(max(values))}"


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Window:
    """The requests that started in [a, b), and what the gateway looked like then."""

    a: float
    b: float
    sent: int
    errors: Counter[str]
    remote: list[float]
    pooled: list[float]
    hits: int
    greedy: int


def window(run: Run, a: float, b: float) -> Window:
    log = run.log
    remote, pooled, errors = [], [], Counter[str]()
    hits = greedy = 0
    indices = log.window(a, b)
    for i in indices:
        kind = log.kinds[log.kind[i]]
        if log.done[i] == 2:
            errors[log.errors[i]] += 1
        elif log.done[i] == 1:
            (pooled if kind.pooled else remote).append(log.latency[i])
        if kind.greedy:
            greedy += 1
            hits += log.hit[i]
    errors["unfinished at the end"] += sum(1 for i in indices if log.done[i] == 0)
    return Window(a, b, len(indices), +errors, remote, pooled, hits, greedy)


def nearest(run: Run, t: float) -> Sample | None:
    return min(run.samples, key=lambda s: abs(s.t - t), default=None)


def rss_at(run: Run, t: float) -> str:
    sample = nearest(run, t)
    return f"{sample.rss_mib:.1f}" if sample else "-"


def cpu_share(run: Run, a: float, b: float) -> str:
    """The gateway's CPU time from a to b (the samples nearest to them), in % of one core."""
    first, last = nearest(run, a), nearest(run, b)
    if first is None or last is None or last.t <= first.t:
        return "-"
    return f"{100 * (last.gateway_cpu_s - first.gateway_cpu_s) / (last.t - first.t):.0f}"


def condensed(errors: Counter[str]) -> str:
    return ", ".join(f"{key.replace('|', '/')} ×{n}" for key, n in errors.most_common()) or "0"


def log_digest(paths: list[Path], limit: int = 8) -> list[str]:
    """The warnings and errors of the logs, numbers and ids blanked so that repeats count together."""
    counts: Counter[str] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", line):
                text = blank(re.sub(r"^[\d\-:, .]+", "", line))
                counts[f"{path.name.split('-')[0]}: {text[:200]}"] += 1
    return [f"{n}× {line}" for line, n in counts.most_common(limit)]


def timeline(args: argparse.Namespace, run: Run) -> str:
    """One row per minute (per interval in runs under 10 minutes)."""
    row_s = int(args.row_s or (60 if run.duration >= 600 else args.interval))
    rows = []
    for a in range(0, int(run.duration + 0.999), row_s):
        b = min(a + row_s, run.duration)
        w = window(run, a, b)
        events = "; ".join(text for t, text in run.events if a <= t < b)
        hit_pct = f"{100 * w.hits / w.greedy:.0f}" if w.greedy else "-"
        rows.append([f"{a / 60:.0f}" if row_s >= 60 else f"{a}", w.sent, condensed(w.errors),
                     ms(pct(w.remote, 0.5)), ms(pct(w.remote, 0.99)), ms(pct(w.pooled, 0.5)),
                     ms(pct(w.pooled, 0.99)), hit_pct, rss_at(run, b), cpu_share(run, a, b), events])
    return markdown_table([f"t ({'min' if row_s >= 60 else 's'})", "requests", "errors", "p50 ms", "p99 ms",
                           "pooled p50 ms", "pooled p99 ms", "cache hit %", "gateway RSS MiB", "gateway CPU %",
                           "events"], rows)


@dataclass
class Rss:
    """The gateway's RSS after warm-up."""

    low: float
    high: float
    last: float
    range_pct: float  # (max - min) / min
    drift_pct: float  # first → last
    trend_mib_per_h: float

    @property
    def flat(self) -> bool:
        return self.range_pct <= RSS_FLAT_PCT


def rss_after(run: Run, warm: float) -> Rss:
    after = [s for s in run.samples if s.t >= warm] or run.samples[-1:]
    values = [s.rss_mib for s in after]
    low, high = min(values), max(values)
    return Rss(low, high, values[-1], 100 * (high - low) / low, 100 * (values[-1] - values[0]) / values[0],
               slope_per_hour([(s.t, s.rss_mib) for s in after]))


def p99_per_interval(args: argparse.Namespace, run: Run, warm: float) -> tuple[list[float], list[float]]:
    """p99 of the remote requests per interval after warm-up: (intervals wholly in the normal phase, all)."""
    calm, every = [], []
    t = warm
    while t + args.interval <= run.duration + 1e-9:
        w = window(run, t, t + args.interval)
        if w.remote:
            every.append(pct(w.remote, 0.99))
            if run.phase_of(t) == "normal" and run.phase_of(t + args.interval - 1e-6) == "normal":
                calm.append(every[-1])
        t += args.interval
    return calm, every


def errors_by_phase(run: Run) -> tuple[str, dict[str, dict[str, int]]]:
    """A table of the errors, by kind (rows) and phase (columns), with the requests sent in each phase."""
    log = run.log
    phases = ["normal", *(p.name for p in run.phases)]
    counts: dict[str, Counter[str]] = {}
    for i, key in log.errors.items():
        counts.setdefault(key, Counter())[run.phase_of(log.start[i])] += 1
    for i, done in enumerate(log.done):
        if done == 0:
            counts.setdefault("unfinished at the end", Counter())[run.phase_of(log.start[i])] += 1
    sent = Counter(run.phase_of(t) for t in log.start)
    rows = [[key.replace("|", "/"), *(by[name] for name in phases), sum(by.values())] for key, by in counts.items()]
    rows.append(["requests sent", *(sent[name] for name in phases), len(log.start)])
    table = markdown_table(["errors", *phases, "total"], rows)
    return table, {key: dict(by) for key, by in counts.items()} | {"sent": dict(sent)}


def report(args: argparse.Namespace, run: Run, processes: Processes, ledger_rows: int
           ) -> tuple[dict[str, Any], str, str]:
    log, duration = run.log, run.duration
    warm = args.warmup_share * duration
    rss = rss_after(run, warm)
    calm_p99, every_p99 = p99_per_interval(args, run, warm)
    p99_ok = bool(calm_p99) and max(calm_p99) <= P99_STABLE_RATIO * statistics.median(calm_p99)
    sent = len(log.start)
    failed = len(log.errors) + sum(1 for d in log.done if d == 0) + run.dropped
    error_table, by_phase = errors_by_phase(run)
    pooled = [log.latency[i] for i in log.window(warm, duration)
              if log.kinds[log.kind[i]].pooled and log.done[i] == 1 and run.phase_of(log.start[i]) == "normal"]
    lag = sorted(log.lag)
    cpu = processes.cpu_by_role()
    summary_rows = [
        ["requests sent", f"{sent} in {duration:.0f} s ({sent / duration:.1f}/s; asked {args.rate:g}/s)"
         + (f"; {run.dropped} not sent (too many in flight)" if run.dropped else ""), ""],
        ["the generator's lag behind its schedule, p99 / max", f"{ms(pct(lag, 0.99))} / "
         f"{ms(lag[-1] if lag else float('nan'))} ms", ""],
        ["errors (by kind and phase below)", f"{failed} of {sent}", verdict(failed == 0)],
        [f"gateway RSS after warm-up ({warm:.0f} s): min / max / last",
         f"{rss.low:.1f} / {rss.high:.1f} / {rss.last:.1f} MiB: range {rss.range_pct:.1f}%, first→last "
         f"{rss.drift_pct:+.1f}%, trend {rss.trend_mib_per_h:+.1f} MiB/h", verdict(rss.flat)],
        ["p99 per interval after warm-up, normal phase: min / median / max",
         f"{spread(calm_p99)} ms ({len(calm_p99)} intervals of {args.interval:g} s)", verdict(p99_ok)],
        ["p99 per interval after warm-up, every phase: min / median / max", f"{spread(every_p99)} ms", ""],
        ["pooled model after warm-up, normal phase: p50 / p99", f"{ms(pct(pooled, 0.5))} / {ms(pct(pooled, 0.99))} "
         f"ms ({len(pooled)} answers)", ""],
        ["ledger rows", f"{ledger_rows} for {sent} requests sent", ""],
        ["CPU, % of one core (run average)", ", ".join(
            f"{role} {share:.0f}%" for role, share in sorted(cpu.items(), key=lambda x: -x[1]))
         + f" ({os.cpu_count()} cores); load average max {max(processes.load_averages, default=0):.1f}", ""],
    ]
    table = "\n\n".join([timeline(args, run), markdown_table(["summary", "value", "issue 23"], summary_rows),
                          error_table])

    notes = [f"Mix: {', '.join(f'{k.name} {100 * s:.1f}%' for k, s in mix(args.pooled_share))}; stand-in latency "
             f"{args.upstream_latency_ms:g} ms, {args.chunk_latency_ms:g} ms per streamed chunk. p50/p99: requests to "
             f"the stand-in's routes and cache hits; the pooled model's apart. Acceptance: RSS range after warm-up "
             f"≤ {RSS_FLAT_PCT:g}%, no errors, highest interval p99 ≤ {P99_STABLE_RATIO:g}× the median "
             f"(outside the restart phases, which last until the component is back plus {args.settle_s:g} s)."]
    if run.events:
        notes.append("Events: " + "; ".join(f"{t:.1f} s {text}" for t, text in run.events) + ". Phases: " + "; ".join(
            f"{p.name} {p.start:.0f}–{min(p.end, duration):.0f} s" for p in run.phases) + ".")
    if log.messages:
        notes.append("What the errors said (numbers blanked):\n" + "\n".join(
            f"- `{key}` ×{n}: {message or '(no message)'}" for key, messages in log.messages.items()
            for message, n in messages.most_common(3)))
    digest = log_digest([processes.gateway.log_path, *sorted(processes.tmp.glob("worker-*.log"))])
    if digest:
        notes.append("Warnings and errors in the logs:\n" + "\n".join(f"- {line}" for line in digest))
    result = {
        "duration_s": duration, "rate": args.rate, "sent": sent, "failed": failed, "dropped": run.dropped,
        "errors_by_phase": by_phase, "error_messages": {k: dict(v) for k, v in log.messages.items()},
        "events": run.events, "rss_mib": asdict(rss),
        "p99_ms": {"normal": [p * 1000 for p in calm_p99], "every": [p * 1000 for p in every_p99]},
        "cpu_share_pct": cpu,
        "samples": [(s.t, s.rss_mib, s.gateway_cpu_s) for s in run.samples],
        "ledger_rows": ledger_rows,
        "verdicts": {"rss_flat": rss.flat, "no_errors": failed == 0, "p99_stable": p99_ok},
    }
    return result, table, "\n\n".join(notes)


def ledger_count(gateway: Gateway) -> int:
    with gateway.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(requests_table)).scalar() or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second, all kinds together")
    parser.add_argument("--pooled-share", type=float, default=0.01, help="share of the requests to the pooled model "
                        "(through the local-first cascade: the remote model answers what the pool cannot)")
    parser.add_argument("--pooled-direct", action="store_true", help="send the pooled share to the pooled model "
                        "itself, so that every failure of the pool reaches the client")
    parser.add_argument("--prompts", type=int, default=50, help="distinct greedy prompts (the exact cache's keys)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (and p99 intervals)")
    parser.add_argument("--row-s", type=float, default=0.0, help="seconds per table row (default: 60, or the "
                        "interval for runs under 10 minutes)")
    parser.add_argument("--warmup-share", type=float, default=0.1, help="share of the run before RSS is judged")
    parser.add_argument("--settle-s", type=float, default=15.0, help="seconds a restart phase lasts after the "
                        "component is back")
    parser.add_argument("--redis-down-s", type=float, default=2.0, help="seconds Redis stays stopped")
    parser.add_argument("--no-restarts", action="store_true", help="no worker or Redis restart (a baseline)")
    parser.add_argument("--upstream-latency-ms", type=float, default=50.0, help="the stand-in's, before answering")
    parser.add_argument("--chunk-latency-ms", type=float, default=2.0, help="the stand-in's, per streamed chunk")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="the client's, per request")
    parser.add_argument("--max-in-flight", type=int, default=1000, help="requests in flight beyond which the "
                        "generator counts a request as not sent")
    parser.add_argument("--log-level", default="info", help="the gateway's (info, its default, logs every request)")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, ledger, Redis data)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the result to docs/BENCHMARKS.md")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="frugal-soak-"))
    print(f"soak: {args.minutes:g} min at {args.rate:g} req/s; logs in {tmp}", file=sys.stderr)
    processes = start_processes(tmp, args)
    try:
        run = asyncio.run(drive(args, processes))
    finally:
        processes.stop()
    result, table, notes = report(args, run, processes, ledger_count(processes.gateway))
    emit(args, "Soak: one gateway at a fixed rate, through a worker and a Redis restart", "bench/soak.py", result,
         table, notes)
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
