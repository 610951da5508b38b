"""Configuration: one YAML file, validated at start-up; secrets only from the environment.

The file's path comes from `--config`, else `FRUGAL_CONFIG`, else the packaged default
(`gateway/default_config.yaml`). Environment variables named in the file (`api_key_env`, `key_env`)
supply the secrets; `FRUGAL_LEDGER_URL` overrides the ledger URL and `REDIS_URL` sets `redis.url` (the
Redis of every role without its own URL: broker, shared state, caches).
See docs/configuration.md.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.backend import CAPABILITIES, Capability
from workers.pricing import TokenPrice


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalServingConfig(_Strict):
    """How a local model serves concurrent requests (docs/local-serving.md)."""

    #: Sequences decoded together in one batch.
    max_batch: int = Field(default=8, ge=1, le=256)
    #: Requests allowed to wait for a place in the batch; more get 503 with Retry-After (a route moves on).
    max_queue: int = Field(default=64, ge=0)
    #: Prompt tokens computed between two decode steps of the running sequences.
    prefill_chunk: int = Field(default=256, ge=2)
    #: Longest prompt + answer a request may use (at most the model's own context).
    max_context: int = Field(default=4096, ge=16)
    #: Memory for the cross-request prefix cache, in MiB (0 turns it off).
    prefix_cache_mib: float = Field(default=256, ge=0)
    prefix_block_tokens: int = Field(default=32, ge=1, le=1024)
    #: Salt the prefix cache with the caller's key id, so that tenants never share keys and values.
    #: None (the default): as the response cache, isolated unless `cache.scope` is "shared".
    isolate_tenants: bool | None = None


class PoolConfig(_Strict):
    """A local model served by a pool of Celery workers (`frugal worker`) instead of in the gateway process
    (docs/distributed.md). The gateway enqueues one task per request on the model's queue and reads the
    answer back from a Redis Stream."""

    #: The Celery queue (default: `frugal.local.NAME`, NAME the model's `local/` name; workers agree).
    queue: str | None = None
    #: Tasks waiting in the queue beyond which the cascade skips the model (escalation reason `capacity`).
    max_queue_depth: int = Field(default=16, ge=0)
    #: Workers' measured wait (enqueue to start, seconds) beyond which the cascade skips the model.
    max_wait_s: float = Field(default=2.0, gt=0)
    #: A task not started within this many seconds is dropped by the worker (its client gave up).
    expires_s: float = Field(default=30.0, gt=0)
    #: Seconds to hand a task to the broker; then the call fails (escalation reason `error`).
    enqueue_timeout_s: float = Field(default=1.0, gt=0)
    #: Seconds without a sign of life from the worker running a request before the gateway gives up on it.
    worker_timeout_s: float = Field(default=3.0, gt=0)
    #: Seconds between two looks at the queue's depth and the workers' wait (shared by all requests).
    probe_interval_s: float = Field(default=0.25, gt=0)


class CompressionConfig(_Strict):
    """Prompt compression before a model (docs/compression.md): a route's block applies to the models the
    route calls, else the model's own block."""

    enabled: bool = True
    #: Fraction of the compressible tokens kept (0.5 halves the long context; the question is never touched).
    target_ratio: float = Field(default=0.5, gt=0, le=1)
    #: Compress only before models whose input price is at least this many USD per million tokens.
    min_input_usd_per_mtok: float = Field(default=0.0, ge=0)
    #: Prompts with fewer compressible tokens than this are sent as they are.
    min_prompt_tokens: int = Field(default=500, ge=0)
    #: The last messages of a chat that are never compressed (the last user message never is).
    keep_recent: int = Field(default=2, ge=0)
    #: What is dropped: whole words (readable), single tokens, or whole sentences.
    unit: Literal["word", "token", "sentence"] = "word"
    #: Drop the sentences least relevant to the question (the last user message) first, as LongLLMLingua's
    #: coarse stage does; surprisal then orders units within equally relevant sentences.
    question_aware: bool = False
    #: Put the compressible text's paragraphs in order of relevance to the question, the most relevant last
    #: (LongLLMLingua's document reordering): only for independent documents or notes.
    reorder: bool = False


class CompressorConfig(_Strict):
    """The local scoring model that compression uses (built from SmolLM2 on first use, then shared)."""

    #: Decoder layers of SmolLM2-135M kept in the early-exit scoring model (of 30).
    layers: int = Field(default=1, ge=1, le=30)
    #: Output rows the log-probabilities are normalized over (the most frequent tokens).
    head_vocab: int = Field(default=4096, ge=256)
    #: The matmuls as DynamicQuantizeMatMul (int8 weights and activations, ~2x faster), or MatMulNBits with a
    #: float head (closer to the float model's surprisal).
    dynamic_int8: bool = True
    #: Tokens scored in one pass; longer texts are scored window by window.
    window: int = Field(default=512, ge=16, le=8192)
    threads: int | None = Field(default=None, gt=0)


class ModelConfig(_Strict):
    """A concrete model that clients can name, and how to reach it."""

    name: str = Field(min_length=1)
    #: litellm model string: "openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest", "hosted_vllm/x" …
    backend: str = Field(min_length=1)
    #: "http": direct OpenAI-compatible HTTP (fast path); "litellm": through litellm; "auto": http for
    #: openai-compatible providers with an api_base, litellm for everything else.
    transport: Literal["auto", "http", "litellm"] = "auto"
    api_base: str | None = None
    api_base_env: str | None = None
    api_key_env: str | None = None
    input_cost_per_token: float = Field(default=0.0, ge=0)
    output_cost_per_token: float = Field(default=0.0, ge=0)
    context_length: int | None = Field(default=None, gt=0)
    #: Seconds for a whole answer (or, streaming, for each chunk).
    timeout_s: float = Field(default=60.0, gt=0)
    #: Retries on this model for retryable failures (timeouts, 429, 5xx, connection errors).
    max_retries: int = Field(default=2, ge=0, le=10)
    # Local models (backend "local/NAME"): built on first use into $FRUGAL_MODELS_DIR unless model_dir is given.
    quant: Literal["int4", "int8", "fp16", "fp32"] | None = None
    compute: Literal["fp32", "int8"] | None = None
    threads: int | None = Field(default=None, gt=0)
    model_dir: str | None = None
    serving: LocalServingConfig = Field(default_factory=LocalServingConfig)
    #: Serve this local model from Celery workers (`frugal worker`) instead of in process.
    pool: PoolConfig | None = None
    #: Compress prompts before this model (unless the route calling it has a policy of its own).
    compression: CompressionConfig | None = None
    #: What the model takes beyond text: tools (tool definitions, calls and results), images, audio, files.
    #: Default: all of them for remote models (the provider decides; one that cannot answers 400), none for
    #: local models. Routes skip a model for a request that needs what it does not declare.
    capabilities: list[Capability] | None = None

    @property
    def is_local(self) -> bool:
        return self.backend.startswith("local/")

    @model_validator(mode="after")
    def _local_capabilities(self) -> ModelConfig:
        if self.is_local and self.capabilities:
            raise ValueError("local models take text only for now: tools, images, audio and files go to remote "
                             "models (remove capabilities)")
        if self.pool is not None and not self.is_local:
            raise ValueError("pool is for local models (backend local/NAME): remote models are called directly")
        return self

    @property
    def queue(self) -> str:
        """The Celery queue of a pooled local model."""
        if self.pool is not None and self.pool.queue:
            return self.pool.queue
        return "frugal." + self.backend.replace("/", ".")

    @property
    def capability_set(self) -> frozenset[str]:
        if self.capabilities is not None:
            return frozenset(self.capabilities)
        return frozenset() if self.is_local else frozenset(CAPABILITIES)

    @property
    def price(self) -> TokenPrice:
        return TokenPrice(self.input_cost_per_token, self.output_cost_per_token)

    def resolved_api_base(self) -> str | None:
        if self.api_base_env and os.environ.get(self.api_base_env):
            return os.environ[self.api_base_env]
        return self.api_base

    def resolved_api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class TierConfig(_Strict):
    """One tier of a cascade: a model, and the score at or above which its answer is accepted."""

    model: str = Field(min_length=1)
    #: The score at or above which the tier's answer is accepted. Needed for a tier the route's scorer
    #: judges; a tier with a judge takes the judge's own threshold by default; the last tier has none.
    threshold: float | None = Field(default=None, ge=0, le=1)
    #: A local tier's judge (`frugal judge build`): a folder (relative to the config file), "none", or
    #: unset for the judge packaged with the local model, when there is one.
    judge: str | None = None


class LearningConfig(_Strict):
    """How a cascade route learns from its own traffic (docs/learning.md): shadow audits of accepted answers,
    and the target that retraining and threshold refits must hold."""

    #: Fraction of the answers a lower tier gave and its judge accepted that are also sent to the route's top
    #: tier after the client has its answer; the two answers are compared and the verdict is a label.
    audit_rate: float = Field(default=0.0, ge=0, le=1)
    #: USD per UTC day that audits may spend (the operator's spend, never billed to a client key).
    audit_budget_usd: float = Field(default=1.0, ge=0)
    #: Longest answer an audit asks the top tier for (bounds what one audit can cost).
    audit_max_tokens: int = Field(default=256, ge=1)
    #: Label a rejected tier's answer by comparing it with the higher tier's answer the client got (free:
    #: no model is called), so that retraining sees rejected answers too.
    label_escalations: bool = True
    #: The share of accepted lower-tier answers that may be wrong: what `frugal judge retrain` and `frugal
    #: cascade refit` choose thresholds for, and promote a candidate only if it holds.
    target_false_accept: float = Field(default=0.10, gt=0, lt=1)


class RouteConfig(_Strict):
    """A name clients can use for several models.

    `fallback`: an ordered list; the first model that answers wins. `cascade`: tiers judged per answer;
    either `tiers` (with a `scorer` for the tiers it judges), or `models` (tiers in price order, cheapest
    first, each local one judged by its packaged judge), or `cascade`, a file written by `frugal cascade fit`.
    """

    name: str = Field(min_length=1)
    kind: Literal["fallback", "cascade"] = "fallback"
    models: list[str] = Field(default_factory=list)
    tiers: list[TierConfig] = Field(default_factory=list)
    #: A scorer folder (`frugal scorer train` / `frugal cascade fit`); relative to the config file.
    scorer: str | None = None
    #: A fitted cascade file (`frugal cascade fit --out`); relative to the config file.
    cascade: str | None = None
    #: Set when the file is read (`resolved`): its absolute path, where the what-if API finds the frontier.
    fitted_from: str | None = None
    #: Compress prompts before the models (tiers) of this route; `min_input_usd_per_mtok` picks which.
    compression: CompressionConfig | None = None
    #: Cascade routes: when no tier accepted an answer (every higher tier unusable or failed), return the
    #: best answer marked `x-frugal-accepted: false` ("answer"), or refuse with a 503 ("error").
    on_unaccepted: Literal["answer", "error"] = "answer"
    #: Cascade routes: audits, labels and the target of retraining.
    learning: LearningConfig = LearningConfig()

    @model_validator(mode="after")
    def _shape(self) -> RouteConfig:
        if self.kind == "fallback":
            if not self.models:
                raise ValueError("a fallback route needs models")
            if self.tiers or self.scorer or self.cascade:
                raise ValueError("tiers, scorer and cascade belong to routes of kind cascade")
            return self
        given = [bool(self.models), bool(self.tiers), self.cascade is not None]
        if sum(given) != 1:
            raise ValueError("a cascade route gives exactly one of: models (tiers in price order), tiers, "
                             "or a cascade file")
        models = self.models or [t.model for t in self.tiers]
        if len(set(models)) != len(models):
            raise ValueError("a model can be only one tier of a cascade")
        return self

    def resolved(self, base_dir: Path) -> RouteConfig:
        """This route with a cascade file's tiers and scorer in place of the file, and paths absolute."""
        if self.kind != "cascade":
            return self
        if self.cascade is None:
            tiers = [t.model_copy(update={"judge": str(base_dir / t.judge)}) if t.judge not in (None, "none")
                     else t for t in self.tiers]
            return self.model_copy(update={"scorer": str(base_dir / self.scorer) if self.scorer else None,
                                           "tiers": tiers})
        from router.cascade_file import CascadeFile  # noqa: PLC0415 - read only for cascade routes

        fitted = CascadeFile.read(base_dir / self.cascade)
        tiers = [TierConfig(model=t.model, threshold=t.threshold) for t in fitted.chosen.tiers]
        return self.model_copy(update={"tiers": tiers, "scorer": str(fitted.scorer), "cascade": None,
                                       "fitted_from": str((base_dir / self.cascade).resolve())})

    @property
    def members(self) -> list[str]:
        """The models this route may call."""
        return list(self.models) if self.kind == "fallback" or self.models else [t.model for t in self.tiers]


class KeyConfig(_Strict):
    """A client API key. The secret is never in the file: either an env var holds it, or the file holds
    its SHA-256 (`printf %s "$KEY" | sha256sum`)."""

    id: str = Field(min_length=1)
    key_env: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: Requests per minute for this key (overrides limits.requests_per_minute).
    requests_per_minute: int | None = Field(default=None, gt=0)
    #: Tokens (prompt and answer) per minute for this key (overrides limits.tokens_per_minute).
    tokens_per_minute: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> KeyConfig:
        if (self.key_env is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key_env or sha256")
        return self

    def digest(self) -> str | None:
        """SHA-256 of the key, or None when its env var is unset."""
        if self.sha256:
            return self.sha256
        secret = os.environ.get(self.key_env or "")
        return hashlib.sha256(secret.encode()).hexdigest() if secret else None


class AuthConfig(_Strict):
    #: false only for a gateway that nobody but its host can reach.
    required: bool = True
    keys: list[KeyConfig] = Field(default_factory=list)
    #: Seconds a virtual key (created through the admin API) and its budgets are cached by each replica: a
    #: key revoked or changed anywhere is refused everywhere within this (at most 1 s).
    cache_s: float = Field(default=0.5, ge=0, le=1.0)


class BudgetsConfig(_Strict):
    """How budgets (per key and team, created through the admin API) are enforced (docs/keys-and-budgets.md)."""

    #: Where spend and reservations are counted: "auto" (Redis when redis.state_url/redis.url is set, else
    #: the ledger's SQL database), "redis" or "sql".
    store: Literal["auto", "redis", "sql"] = "auto"
    #: Seconds a reservation lasts unless its replica renews it (it does, every third of this, while the
    #: request runs): what a replica that dies mid-request holds is released this long after.
    lease_s: float = Field(default=30.0, ge=1)
    #: Output tokens reserved for a request that sets no max_tokens, on a model of unknown context length.
    default_max_tokens: int = Field(default=4096, gt=0)


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: Default per-key request rate; None = unlimited.
    requests_per_minute: int | None = Field(default=None, gt=0)
    #: Default per-key token rate (prompt and answer tokens); None = unlimited. A request is admitted while the
    #: key has tokens left this minute; what it used is taken once it is answered.
    tokens_per_minute: int | None = Field(default=None, gt=0)
    #: Seconds a client has to send a request's headers (from the first byte, or from connecting); then 408.
    header_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds a client has to send a request's body once its headers arrived; then 408.
    body_timeout_s: float = Field(default=60.0, gt=0)
    #: Open connections at most; one more is answered 503 and closed.
    max_connections: int = Field(default=2048, ge=1)


class RetryConfig(_Strict):
    backoff_base_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=4.0, ge=0)


class CooldownConfig(_Strict):
    #: Failures within `window_s` that put a model in cooldown.
    failures: int = Field(default=3, ge=1)
    window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=30.0, ge=0)


class LedgerConfig(_Strict):
    #: SQLAlchemy URL. SQLite by default; postgresql+psycopg://user@host/db for PostgreSQL.
    url: str = "sqlite:///frugal-ledger.db"
    #: Store prompts and answers in the ledger (off by default: they may be personal data).
    store_content: bool = False
    #: Where records go if the database stays unreachable at shutdown (JSON lines), replayed at the next start.
    spill_path: str = "frugal-ledger-spill.jsonl"
    #: The write-ahead journal (docs/reliability.md): each row is appended here before the response it records
    #: sends its last byte, and replayed at the next start if the process died before writing it to the
    #: database. Default: `frugal-ledger-journal` beside `spill_path`. "off" disables it (a killed process then
    #: loses the rows it had not written yet).
    journal_dir: str | None = None
    #: fsync every append: rows survive a power loss too, at the cost of a disk flush per request.
    journal_fsync: bool = False
    #: A journal file is closed (and deleted once its rows are in the database) at this size.
    journal_segment_mib: float = Field(default=4.0, gt=0)

    def journal_path(self) -> Path | None:
        if self.journal_dir == "off":
            return None
        return Path(self.journal_dir) if self.journal_dir else Path(self.spill_path).parent / "frugal-ledger-journal"


class ExactCacheConfig(_Strict):
    """The exact cache: the same request (conversation and every parameter that changes the answer)."""

    enabled: bool = True
    ttl_s: float = Field(default=3600.0, gt=0)
    #: In-process store bounds (with Redis, Redis's own maxmemory policy bounds it).
    max_entries: int = Field(default=10_000, ge=1)
    max_mib: float = Field(default=256.0, gt=0)
    #: Cache only deterministic requests (temperature 0 or a fixed seed): a sampled answer is one draw.
    only_deterministic: bool = True


class SemanticCacheConfig(_Strict):
    """The semantic cache: a paraphrase of a cached question, in the same context, gets the cached answer."""

    enabled: bool = False
    #: Cosine similarity a candidate needs; None = the verifier's lookup floor (0.93) when `verifier` is on,
    #: else the calibrated cosine-only default (docs/semantic-cache.md).
    threshold: float | None = Field(default=None, gt=0, le=1)
    #: Judge each candidate with the learned verifier (more hits and fewer wrong answers than cosine alone,
    #: measured in docs/semantic-cache.md); false = cosine alone.
    verifier: bool = True
    #: The verifier's probability a hit needs; None = its calibrated default.
    verifier_threshold: float | None = Field(default=None, gt=0, lt=1)
    ttl_s: float = Field(default=3600.0, gt=0)
    max_entries: int = Field(default=100_000, ge=1)


class CacheConfig(_Strict):
    """Response caches (docs/caching.md). In process by default; shared through Redis when `redis_url`
    (or the REDIS_URL environment variable) is set."""

    #: Whose answers may serve whom: "key" (each API key has its own cache) or "shared" (all keys).
    scope: Literal["key", "shared"] = "key"
    exact: ExactCacheConfig = ExactCacheConfig()
    semantic: SemanticCacheConfig = SemanticCacheConfig()
    redis_url: str | None = None
    #: Namespace of the keys in Redis (several gateways, one Redis).
    redis_prefix: str = "frugal:"


class RedisConfig(_Strict):
    """Redis for the distributed mode (docs/distributed.md), by role. `url` (or $REDIS_URL) serves every role
    whose own URL is unset; production splits them: the broker on a server with `noeviction` (a queued
    request must never be evicted), the caches on one with an LRU policy (`cache.redis_url`)."""

    url: str | None = None
    #: Celery's broker: the queues of pooled local models.
    broker_url: str | None = None
    #: Shared state: rate limits, cooldowns, the token streams of pooled models.
    state_url: str | None = None
    #: Seconds any one call to the state Redis may take (then the mechanism's failure policy applies).
    timeout_s: float = Field(default=0.25, gt=0)
    #: When the state Redis fails: "open" admits the request (and counts frugal_state_errors_total),
    #: "closed" refuses it with 503.
    rate_limits: Literal["open", "closed"] = "open"
    #: Seconds between two reads of the models in cooldown on other replicas.
    cooldown_sync_s: float = Field(default=0.25, gt=0)

    @property
    def broker(self) -> str | None:
        return self.broker_url or self.url

    @property
    def state(self) -> str | None:
        return self.state_url or self.url


class ArtifactsConfig(_Strict):
    """Where retrained judges and refitted thresholds are kept, versioned per route (docs/learning.md)."""

    #: A folder (relative to the working folder of the gateway); each route's versions live under it.
    dir: str = "frugal-artifacts"
    #: Seconds between two looks at each route's current version (a promotion or a rollback by another
    #: process is picked up within this); 0 turns the watch off (swaps then go through the admin API only).
    watch_interval_s: float = Field(default=5.0, ge=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class FrugalConfig(_Strict):
    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    cooldown: CooldownConfig = CooldownConfig()
    ledger: LedgerConfig = LedgerConfig()
    cache: CacheConfig = CacheConfig()
    compressor: CompressorConfig = CompressorConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    redis: RedisConfig = RedisConfig()
    budgets: BudgetsConfig = BudgetsConfig()

    def model(self, name: str) -> ModelConfig:
        """The configured model named `name` (`KeyError` when there is none)."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def route(self, name: str) -> RouteConfig:
        """The configured route named `name` (`KeyError` when there is none)."""
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)

    @model_validator(mode="after")
    def _consistent(self) -> FrugalConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        for route in self.routes:
            if route.name in names:
                raise ValueError(f"route {route.name!r} has the same name as a model")
            missing = [m for m in route.members if m not in names]
            if missing:
                raise ValueError(f"route {route.name!r} names unknown models: {', '.join(missing)}")
        route_names = [r.name for r in self.routes]
        if len(set(route_names)) != len(route_names):
            raise ValueError("route names must be unique")
        pooled = [m.name for m in self.models if m.pool is not None]
        if pooled and not self.redis.broker:
            raise ValueError(f"pooled models ({', '.join(pooled)}) need a broker: set redis.url, redis.broker_url "
                             f"or $REDIS_URL")
        if pooled and not self.redis.state:
            raise ValueError(f"pooled models ({', '.join(pooled)}) need redis.state_url (or redis.url) for their "
                             f"token streams")
        if self.budgets.store == "redis" and not self.redis.state:
            raise ValueError("budgets.store is redis: set redis.url or redis.state_url (or $REDIS_URL)")
        key_ids = [k.id for k in self.auth.keys]
        if len(set(key_ids)) != len(key_ids):
            raise ValueError("key ids must be unique")
        return self


class EnvSettings(BaseSettings):
    """Process-level settings from the environment (FRUGAL_*)."""

    model_config = SettingsConfigDict(env_prefix="FRUGAL_", extra="ignore")

    config: str | None = None
    ledger_url: str | None = None


def parse_config(text: str, origin: str = "<config>", base_dir: Path | None = None) -> FrugalConfig:
    """Validate a YAML document; `ConfigError` names the offending field. Relative paths in it (scorers,
    cascade files) are relative to `base_dir` (the config file's folder; default: the working folder)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping")
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:  # before validation: pooled models are checked against the redis URLs
        section = raw.get("redis")
        raw = {**raw, "redis": {**(section if isinstance(section, dict) else {}), "url": redis_url}}
    try:
        config = FrugalConfig.model_validate(_with_fitted_cascades(raw, base_dir or Path.cwd(), origin))
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(top level)"
            lines.append(f"  {where}: {error['msg']}")
        raise ConfigError(f"{origin}: invalid configuration:\n" + "\n".join(lines)) from exc
    env = EnvSettings()
    if env.ledger_url:
        config = config.model_copy(
            update={"ledger": config.ledger.model_copy(update={"url": env.ledger_url})}
        )
    if config.redis.url and not config.cache.redis_url:  # the cache role defaults to the common URL
        config = config.model_copy(
            update={"cache": config.cache.model_copy(update={"redis_url": config.redis.url})}
        )
    return config


def _with_fitted_cascades(raw: dict, base_dir: Path, origin: str) -> dict:
    """The raw config with every cascade route's file read in (so validation sees its models)."""
    from router.cascade_file import CascadeFileError  # noqa: PLC0415

    routes = raw.get("routes")
    if not isinstance(routes, list):
        return raw
    resolved = []
    for index, route in enumerate(routes):
        if isinstance(route, dict) and route.get("kind") == "cascade":
            try:
                route = RouteConfig.model_validate(route).resolved(base_dir).model_dump(exclude_none=True)
            except ValidationError:
                pass  # reported with the whole config's errors
            except CascadeFileError as exc:
                raise ConfigError(f"{origin}: invalid configuration:\n  routes.{index}.cascade: {exc}") from exc
        resolved.append(route)
    return {**raw, "routes": resolved}


def default_config_text() -> str:
    return resources.files("gateway").joinpath("default_config.yaml").read_text()


def load_config(path: str | Path | None = None) -> FrugalConfig:
    """Load `path`, else $FRUGAL_CONFIG, else the packaged default."""
    chosen = path or EnvSettings().config
    if chosen is None:
        return parse_config(default_config_text(), "default_config.yaml")
    file = Path(chosen)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
    return parse_config(text, str(file), file.resolve().parent)
