"""Tenants kept apart (issue 23), with real gateway processes: one key's cached answers (exact and semantic, in
process and in Redis) and cached prefix keys and values never serve another key; the admin API refuses every
key but the admin key; no secret is ever logged, counted, stored or echoed; chat templates shipped inside
model files render in a sandbox."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
import redis
from sqlalchemy import MetaData, select

from gateway.backends import isolates_tenants
from gateway.settings import LocalServingConfig
from tests.harness import Gateway, Service, model_entry, wait_until
from tests.test_budgets import ADMIN, ADMIN_KEY, create_key, replicas
from tests.test_cache import ask, metric, upstream_calls
from tests.test_openapi import api_routes
from tests.test_semantic_cache_gateway import PARAPHRASE
from tests.test_semantic_cache_gateway import config as semantic_config
from tests.test_semantic_cache_gateway import models_env as models_env  # noqa: F401 (a fixture, used by name)
from workers.backend import GenerationRequest
from workers.local.gguf_tokenizer import ChatTemplate
from workers.pool.protocol import request_from_dict, request_to_dict

# Three config keys: A asks first; B and C must never be served what A's asking cached.
KEYS = {"keys": [{"id": "tenant-a", "key_env": "FRUGAL_TEST_KEY"}, {"id": "tenant-b", "key_env": "TENANT_B_KEY"},
                 {"id": "tenant-c", "key_env": "TENANT_C_KEY"}]}
KEY_ENV = {"TENANT_B_KEY": "sk-tenant-b", "TENANT_C_KEY": "sk-tenant-c"}
A: dict[str, str] = {}  # the harness's own key (Gateway.headers)
B = {"authorization": "Bearer sk-tenant-b"}
C = {"authorization": "Bearer sk-tenant-c"}


# --- 1. response caches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_tenant_never_gets_another_tenants_exact_or_semantic_entry(
        make_gateway: Callable[..., Gateway], standin_server: Service, models_env: dict[str, str],  # noqa: F811
        request: pytest.FixtureRequest, store: str) -> None:
    upstream = f"alpha-{secrets.token_hex(4)}"
    config = {**semantic_config(standin_server, upstream), "auth": KEYS}  # cache.scope: key, the default
    env = {**models_env, **KEY_ENV}
    if store == "redis":  # two replicas sharing one Redis: A's entries reach the other replica, not B's or C's
        redis_url = request.getfixturevalue("redis_url")
        env["REDIS_URL"] = redis_url
        one, two = make_gateway(config, env), make_gateway(config, env)
    else:
        one = two = make_gateway(config, env)
    paraphrase = [{"role": "user", "content": PARAPHRASE}]

    assert ask(one, A).headers["x-frugal-cache"] == "miss"
    assert ask(two, A).headers["x-frugal-cache"] == "hit"  # the test sees a hit when there is one …
    semantic = ask(two, A, messages=paraphrase)
    assert semantic.headers["x-frugal-cache"] == "semantic-hit"  # … and a semantic one
    assert upstream_calls(standin_server, upstream) == 1

    exact_b = ask(two, B)  # A's exact entry is in reach …
    assert exact_b.status_code == 200 and exact_b.headers["x-frugal-cache"] == "miss"  # … yet B misses
    semantic_c = ask(one, C, messages=paraphrase)  # C has no entry of its own: only A's could serve it
    assert semantic_c.status_code == 200 and semantic_c.headers["x-frugal-cache"] == "miss"
    assert "x-frugal-cache-similarity" not in semantic_c.headers
    assert upstream_calls(standin_server, upstream) == 3
    for response in (exact_b, semantic_c):
        row = one.ledger_row(response.headers["x-request-id"]) if response is semantic_c else \
            two.ledger_row(response.headers["x-request-id"])
        assert row["cache"] == "miss" and "similarity" not in (row["trace"].get("cache") or {})
    # B's own answer is cached for B: a miss above was isolation, not a cache that stopped working
    assert ask(one, B).headers["x-frugal-cache"] == "hit"
    if store == "redis":
        stored = redis.Redis.from_url(env["REDIS_URL"]).keys()
        assert any(k.startswith(b"frugal:cache:") for k in stored) and any(k.startswith(b"frugal:sem:") for k in stored)


# --- 2. the local model's prefix cache ---------------------------------------------------------------------

LOCAL = "local/smollm2-135m-instruct"
LONG_SYSTEM = " ".join(f"Rule {i}: answer briefly, politely and in plain English, citing no sources."
                       for i in range(12))


def test_isolation_of_cached_prefixes_follows_the_cache_scope_unless_set() -> None:
    assert isolates_tenants(LocalServingConfig()) is True  # default: cache.scope key → isolated
    assert isolates_tenants(LocalServingConfig(), "key") is True
    assert isolates_tenants(LocalServingConfig(), "shared") is False
    assert isolates_tenants(LocalServingConfig(isolate_tenants=True), "shared") is True
    assert isolates_tenants(LocalServingConfig(isolate_tenants=False), "key") is False
    # the pooled path: the tenant travels with the task to the worker, whose engine salts with it
    sent = GenerationRequest("chat", [{"role": "user", "content": "hi"}], tenant="tenant-a")
    assert request_from_dict(request_to_dict(sent)).tenant == "tenant-a"


SHARED = "local/shared-prefixes"  # the same model with `isolate_tenants: false`


def cached_tokens(gw: Gateway, model: str) -> float:
    return metric(gw, "frugal_local_cached_tokens_total", model=model)


def reused(gw: Gateway, model: str, headers: dict[str, str]) -> float:
    """Prompt tokens of one request (the long prompt) served from `model`'s prefix cache."""
    before = cached_tokens(gw, model)
    response = gw.post("/v1/chat/completions", {
        "model": model, "temperature": 0, "max_tokens": 2,
        "messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hello?"}]},
        headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 96  # three full blocks at least
    return cached_tokens(gw, model) - before


@pytest.mark.timeout(300)  # the session's first user of the model builds it
def test_a_tenant_never_reuses_another_tenants_cached_prefix(
        make_gateway: Callable[..., Gateway], smollm2_int8: Path) -> None:
    local = {"backend": LOCAL, "model_dir": str(smollm2_int8), "threads": 2}
    gw = make_gateway({"models": [{"name": LOCAL, **local},  # serving.isolate_tenants unset, cache.scope key
                                  {"name": SHARED, **local, "serving": {"isolate_tenants": False}}],
                       "cache": {"exact": {"enabled": False}},  # every request reaches the engine
                       "auth": KEYS}, env=KEY_ENV)
    for model in (LOCAL, SHARED):
        assert reused(gw, model, A) == 0
        assert reused(gw, model, A) > 64  # A's repeat reuses its prefix: the test sees reuse when there is some
    assert reused(gw, SHARED, B) > 64  # explicitly shared: B reuses A's keys and values …
    assert reused(gw, LOCAL, B) == 0  # … by default B computes the whole prompt again
    assert reused(gw, LOCAL, B) > 64  # and then reuses its own


# --- 3. the admin API refuses client keys ------------------------------------------------------------------

#: The dashboard's page and static files are public by design (docs/dashboard.md: "the page itself needs no
#: key"); they carry no data. Every other /admin route must refuse whoever is not the admin.
PUBLIC_ADMIN_PATHS = {"/admin", "/admin/", "/admin/static/{name}"}


def admin_operations(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path) of every /admin route the gateway serves, included routers walked."""
    from gateway.app import create_app  # noqa: PLC0415
    from gateway.settings import parse_config  # noqa: PLC0415

    app = create_app(parse_config(f"ledger: {{url: 'sqlite:///{tmp_path / 'routes.db'}'}}"))
    routes = [r for r in api_routes(app.routes) if r.path == "/admin" or r.path.startswith("/admin/")]
    assert {r.path for r in routes if not r.include_in_schema} == PUBLIC_ADMIN_PATHS  # a new hidden one: decide
    return sorted((method, route.path) for route in routes if route.path not in PUBLIC_ADMIN_PATHS
                  for method in route.methods)


def assert_openai_error(response: httpx.Response, status: int, where: Any) -> None:
    assert response.status_code == status, (where, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), where
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), where
    assert "code" in error and "param" in error, where


def test_every_admin_route_refuses_client_keys_and_anonymous_calls(
        make_gateway: Callable[..., Gateway], tmp_path: Path, standin_server: Service) -> None:
    operations = admin_operations(tmp_path)
    assert len(operations) >= 20 and ("DELETE", "/admin/budgets/{budget_id}") in operations
    [gw] = replicas(make_gateway, tmp_path, standin_server.url, count=1)
    virtual = create_key(gw, name="client")
    callers: list[tuple[str, dict[str, str], int]] = [
        ("no key", {}, 401),
        ("bearer without a key", {"authorization": "Bearer"}, 401),
        ("config key", gw.headers(), 403),
        ("virtual key", {"authorization": f"Bearer {virtual['key']}"}, 403),
        ("virtual key as x-api-key", {"x-api-key": virtual["key"]}, 403),
        ("unknown key", {"authorization": f"Bearer sk-frugal-{secrets.token_urlsafe(24)}"}, 403),
        ("admin key, another scheme", {"authorization": f"Basic {ADMIN_KEY}"}, 401),
    ]
    body = {"name": "intruder", "owner_type": "key", "owner_id": "test-key", "period": "day", "limit_usd": 0,
            "route": "alpha", "version": "config"}
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        for method, path in operations:
            url = path.replace("{", "").replace("}", "")  # path parameters: their own names as values
            for who, headers, status in callers:
                response = client.request(method, url, headers=headers,
                                          json=body if method in ("POST", "PUT", "PATCH") else None)
                assert_openai_error(response, status, (who, method, path))
            # the same routes answer the admin key (the paths above reach real handlers)
            assert client.request(method, url, headers=ADMIN, json={}).status_code not in (401, 403)
    # nothing the refused calls asked for happened: one key, one audited change (its creation)
    keys = httpx.get(gw.url + "/admin/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in keys] == [virtual["id"]] and keys[0]["revoked_at"] is None, keys
    audit = httpx.get(gw.url + "/admin/audit", headers=ADMIN).json()["data"]
    assert [e["action"] for e in audit] == ["key.create"], audit


# --- 4. secrets never leak -----------------------------------------------------------------------------------

def leaks(places: dict[str, str | bytes], secret_values: dict[str, str]) -> list[str]:
    """Where a secret, or its part after the 14 characters a key list shows, is found."""
    found = []
    for what, secret in secret_values.items():
        assert len(secret) >= 14 + 16, what  # the hidden part alone is unguessable: a hit is a leak
        for needle in (secret, secret[14:]):
            for place, text in places.items():
                if (needle.encode() if isinstance(text, bytes) else needle) in text:
                    found.append(f"{what} ({'whole' if needle == secret else 'hidden part'}) in {place}")
    return found


def shown(response: httpx.Response) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text}"


def every_row(gw: Gateway) -> dict[str, str]:
    """Every row of every table of the gateway's database (ledger, traces, keys, budgets, audit …), read by SQL."""
    metadata = MetaData()
    metadata.reflect(gw.engine)
    assert {"frugal_requests", "frugal_admin_audit"} <= set(metadata.tables), sorted(metadata.tables)
    with gw.engine.connect() as connection:
        return {f"table {name}": repr([tuple(row) for row in connection.execute(select(table))])
                for name, table in metadata.tables.items()}


def test_no_secret_is_logged_counted_stored_or_echoed(tmp_path: Path, standin_server: Service) -> None:
    keys = {name: f"sk-{name}-{secrets.token_urlsafe(24)}" for name in ("config", "admin", "upstream")}
    config = {"models": [model_entry("alpha", "alpha", standin_server.url, "http")],
              "auth": {"keys": [{"id": "config-key", "key_env": "ISOLATION_KEY"}]}}
    gw = Gateway(tmp_path, config, {"ISOLATION_KEY": keys["config"], "FRUGAL_ADMIN_KEY": keys["admin"],
                                    "STANDIN_API_KEY": keys["upstream"]})
    gw.args[gw.args.index("--log-level") + 1] = "debug"
    admin = {"authorization": f"Bearer {keys['admin']}"}
    canary = f"canary-{secrets.token_hex(8)}"  # not a secret: shows that the places scanned hold what was sent
    received: dict[str, httpx.Response] = {}
    gw.start()
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            def create(**body: Any) -> dict[str, Any]:
                made = client.post("/admin/keys", headers=admin, json={"name": "leak-test", **body})
                assert made.status_code == 201, made.text
                assert leaks({"creation": shown(made)}, {"key": made.json()["key"]})  # the scanner finds secrets
                return made.json()

            def call(label: str, secret: str | None, body: Any = None, *, content: bytes | None = None,
                     header: str = "authorization", path: str = "/v1/chat/completions") -> httpx.Response:
                headers = {} if secret is None else \
                    {header: f"Bearer {secret}" if header == "authorization" else secret}
                if content is not None:
                    headers["content-type"] = "application/json"
                response = client.post(path, headers=headers, content=content,
                                       json=None if content is not None else body)
                received[label] = response
                return response

            chat = {"model": "alpha", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 20, "user": canary}
            virtual, revoked, limited = create(), create(), create(requests_per_minute=1)
            keys |= {"virtual": virtual["key"], "revoked": revoked["key"], "limited": limited["key"]}
            wrong = {"wrong-virtual": f"sk-frugal-{secrets.token_urlsafe(24)}",
                     "wrong-same-prefix": virtual["key"][:14] + secrets.token_urlsafe(24),
                     "wrong-config": keys["config"][:-1] + ("A" if keys["config"][-1] != "A" else "B")}
            keys |= wrong

            assert call("config", keys["config"], chat).status_code == 200
            assert call("virtual", virtual["key"], chat).status_code == 200
            assert call("x-api-key", virtual["key"], chat, header="x-api-key").status_code == 200
            streamed = call("stream", virtual["key"], {**chat, "stream": True,
                                                      "stream_options": {"include_usage": True}})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            for name, secret in wrong.items():
                assert call(name, secret, chat).status_code == 401
                assert call(f"{name} as x-api-key", secret, chat, header="x-api-key").status_code == 401
            assert call("revoked, before", revoked["key"], chat).status_code == 200
            assert client.post(f"/admin/keys/{revoked['id']}/revoke", headers=admin).status_code == 200
            wait_until(lambda: call("revoked", revoked["key"], chat).status_code == 401, 5.0, "the revocation")
            assert call("limited, first", limited["key"], chat).status_code == 200
            assert call("limited", limited["key"], chat).status_code == 429
            assert call("invalid json", virtual["key"], content=b'{"model": "alpha", "messages": [').status_code == 400
            assert call("unknown model", keys["config"], {**chat, "model": "gpt-nope"}).status_code == 404
            assert call("no messages", virtual["key"], {"model": "alpha"}).status_code == 400
            assert call("bad max_tokens", virtual["key"], {**chat, "max_tokens": -1}).status_code == 400
            assert call("bad feedback", virtual["key"], {"request_id": "nope", "label": "good"},
                        path="/v1/feedback").status_code in (400, 404)
            assert call("admin as a client", keys["admin"], chat).status_code == 401
            assert call("client as admin", virtual["key"], {"name": "x"}, path="/admin/keys").status_code == 403
            assert call("wrong admin", wrong["wrong-virtual"], {"name": "x"}, path="/admin/keys").status_code == 403

            answered = [r.headers["x-request-id"] for r in received.values() if r.status_code == 200]
            for request_id in answered:
                gw.ledger_row(request_id)
            places: dict[str, str | bytes] = {f"response {label}": shown(r) for label, r in received.items()}
            admin_reads = ["/admin/keys", "/admin/teams", "/admin/budgets", "/admin/audit", "/admin/traces",
                           "/admin/analytics/overview", "/admin/routes",
                           *(f"/admin/keys/{made['id']}" for made in (virtual, revoked, limited)),
                           *(f"/admin/traces/{request_id}" for request_id in answered)]
            for path in admin_reads:
                read = client.get(path, headers=admin)
                assert read.status_code == 200, (path, read.text)
                places[f"GET {path}"] = shown(read)
            places["GET /metrics"] = client.get("/metrics").text
    finally:
        gw.stop()  # the log's listener thread and the ledger's writer flush on exit
    places.update(every_row(gw))
    log = gw.log_path.read_text()  # `--log-level debug`: everything the gateway would ever log
    assert all(request_id in log for request_id in answered)  # what was scanned holds the requests …
    assert canary in places["table frugal_requests"]  # … and what they sent
    assert f'"id":"{answered[0]}"' in places["GET /admin/traces"]
    places["log"] = log
    for file in tmp_path.rglob("*"):  # the database and its WAL, the spill file, the log: as bytes
        if file.is_file():
            places[f"file {file.name}"] = file.read_bytes()
    assert not leaks(places, keys)


# --- 5. chat templates render in a sandbox ------------------------------------------------------------------
# A hostile template stops the build (tests/local/test_architectures.py::
# test_a_hostile_or_broken_chat_template_stops_the_build: `''.__class__.__mro__…`, `…__init__.__globals__`);
# below: the classic payloads through the globals Jinja ships, and an escape the build's one-message check
# does not trigger.

OS_ESCAPE = "cycler.__init__.__globals__.os.popen('id').read()"
ONE_TURN = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("template", [
    f"{{{{ {OS_ESCAPE} }}}}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{{ namespace.__init__.__globals__.sys.modules.os.system('id') }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('id') }}",
    "{% for m in messages %}{{ m.__class__.__mro__[1].__subclasses__() }}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__ }}",
])
def test_a_chat_template_reaching_for_python_internals_is_refused(template: str) -> None:
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate(template).render(ONE_TURN)


def test_internals_a_template_only_names_render_as_nothing() -> None:
    # Jinja's sandbox makes an unsafe attribute an undefined value: printed, it is empty; used, SecurityError.
    for template in ("{{ raise_exception.__globals__ }}", "{{ strftime_now.__globals__ }}", "{{ range.__self__ }}",
                     "{{ ''|attr('__class__') }}", "{{ '{0.__class__}'.format('') }}"):
        assert ChatTemplate(template).render(ONE_TURN) == "", template


def test_the_build_refuses_the_os_escape_and_requests_cannot_trigger_a_hidden_one(tmp_path: Path) -> None:
    from tests.local.test_architectures import QT, write_gguf  # noqa: PLC0415 (gguf, numpy: only here)
    from workers.local.catalog import build, load_checked_tokenizer  # noqa: PLC0415
    from workers.local.gguf_model import UnsupportedModel  # noqa: PLC0415

    hostile = write_gguf(tmp_path / "hostile.gguf", "llama", QT.F32, chat_template=f"{{{{ {OS_ESCAPE} }}}}")
    with pytest.raises(UnsupportedModel, match="Python internals"):
        build(str(hostile), "int8", root=tmp_path / "models")
    assert not list((tmp_path / "models").glob("*/frugal_model.json"))  # nothing built

    # an escape only a second turn reaches passes the build's one-message check, and still cannot run
    hidden = ("{% for m in messages %}{% if loop.index > 1 %}{{ " + OS_ESCAPE + " }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    bundle = load_checked_tokenizer(write_gguf(tmp_path / "hidden.gguf", "llama", QT.F32, chat_template=hidden))
    assert bundle.chat_template.render(ONE_TURN) == "Hello"
    with pytest.raises(jinja2.exceptions.SecurityError):
        bundle.chat_template.render([*ONE_TURN, {"role": "assistant", "content": "Hi"}])
