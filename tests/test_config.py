"""Configuration: validated at start-up with errors that say where; secrets only from the environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_config, parse_config
from tests.harness import BIN


def test_the_packaged_default_is_valid() -> None:
    config = load_config()
    assert config.server.port == 8080 and config.ledger.url.startswith("sqlite:")
    assert [r.name for r in config.routes] == ["frugal/auto"]
    auto = config.routes[0]
    assert auto.kind == "cascade" and auto.on_unaccepted == "answer"
    assert auto.models[0] == "local/smollm2-135m-instruct" and len(auto.models) == 4
    assert config.ledger.store_content is False


def test_a_cascade_of_models_is_put_in_price_order() -> None:
    from gateway.routes import price_order

    config = parse_config("models: [{name: dear, backend: openai/d, input_cost_per_token: 1.0e-5}, "
                          "{name: cheap, backend: openai/c, input_cost_per_token: 1.0e-7}, "
                          "{name: free, backend: local/smollm2-135m-instruct}]\n"
                          "routes: [{name: r, kind: cascade, models: [dear, cheap, free]}]")
    assert [t.model for t in price_order(config.routes[0].models, config)] == ["free", "cheap", "dear"]


@pytest.mark.parametrize(("text", "where"), [
    ("models: [{name: a, backend: openai/x, bogus: 1}]", "models.0.bogus"),
    ("models: [{name: a, backend: openai/x, input_cost_per_token: -1}]", "models.0.input_cost_per_token"),
    ("models: [{name: a, backend: openai/x, transport: carrier-pigeon}]", "models.0.transport"),
    ("models: [{name: a, backend: openai/x}]\nroutes: [{name: r, models: [b]}]", "unknown models: b"),
    ("models: [{name: a, backend: x}, {name: a, backend: y}]", "repeated: a"),
    ("auth: {keys: [{id: k, key_env: A, sha256: \"" + "a" * 64 + "\"}]}", "exactly one of key_env or sha256"),
    ("auth: {keys: [{id: k, sha256: not-a-digest}]}", "auth.keys.0.sha256"),
    ("limits: {max_body_bytes: 0}", "limits.max_body_bytes"),
    ("- just\n- a list", "top level must be a mapping"),
    ("models: [unclosed", "not valid YAML"),
])
def test_invalid_configs_say_where(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "test.yaml")
    assert where in str(error.value) and "test.yaml" in str(error.value)


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config("""
models: [{name: a, backend: openai/x, api_key_env: MY_PROVIDER_KEY, api_base_env: MY_BASE}]
auth: {keys: [{id: k, key_env: MY_CLIENT_KEY}]}
""")
    model = config.models[0]
    monkeypatch.delenv("MY_PROVIDER_KEY", raising=False)
    assert model.resolved_api_key() is None
    monkeypatch.setenv("MY_PROVIDER_KEY", "sk-provider")
    monkeypatch.setenv("MY_BASE", "http://127.0.0.1:1/v1")
    assert model.resolved_api_key() == "sk-provider"
    assert model.resolved_api_base() == "http://127.0.0.1:1/v1"
    monkeypatch.setenv("MY_CLIENT_KEY", "sk-client")
    import hashlib

    assert config.auth.keys[0].digest() == hashlib.sha256(b"sk-client").hexdigest()


def test_ledger_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRUGAL_LEDGER_URL", "postgresql+psycopg://u@h/db")
    assert parse_config("{}").ledger.url == "postgresql+psycopg://u@h/db"


def test_config_path_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 9999}")
    monkeypatch.setenv("FRUGAL_CONFIG", str(path))
    assert load_config().server.port == 9999
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_serve_refuses_a_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: [{name: r, models: [ghost]}]")
    done = subprocess.run([str(BIN / "frugal"), "serve", "--config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "unknown models: ghost" in done.stderr and "Traceback" not in done.stderr


def test_the_example_configs_are_valid() -> None:
    from tests.harness import REPO

    for path in sorted((REPO / "examples").glob("*.yaml")):
        assert parse_config(path.read_text(), str(path)).models


def test_log_lines_are_formatted_once(tmp_path: Path) -> None:
    script = ("import logging\nfrom gateway.cli.common import configure_logging\nconfigure_logging('info')\n"
              "logging.getLogger('frugal.test').info('hello %s', 'there')\n")
    done = subprocess.run([str(BIN.parent / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if "hello" in line]
    assert len(lines) == 1 and lines[0].endswith("INFO frugal.test hello there"), done.stderr
