"""The shape the architecture promises: arrows point one way, serving never imports offline fitting, no
module imports itself back through others, litellm is imported in one place, and importing a module does
no work."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

PACKAGES = ("gateway", "router", "scorer", "workers", "standin")
#: package -> packages it must not import
FORBIDDEN = {
    "workers": {"gateway", "router", "scorer", "standin"},
    "scorer": {"gateway", "router", "workers", "standin"},
    "router": {"gateway", "standin"},
    "standin": {"gateway", "router", "scorer"},
}


#: Offline work (fitting, calibration, evaluation, reports, plots) and the command line: never imported by the
#: serving path (docs/architecture.md).
OFFLINE = ("router/fit", "scorer/fit", "gateway/cache/calibration", "gateway/cli", "gateway/fit")
#: Libraries only offline work may use.
OFFLINE_LIBRARIES = {"sklearn", "skl2onnx", "matplotlib"}


def modules() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def is_offline(path: Path) -> bool:
    return any(path.relative_to(REPO).as_posix().startswith(folder + "/") for folder in OFFLINE)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (inside functions and under TYPE_CHECKING too), and for
    `from package import name` also `package.name` (which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package: str) -> None:
    for path in sorted((REPO / package).rglob("*.py")):
        roots = {name.split(".")[0] for name in imported(path)}
        assert not roots & FORBIDDEN[package], f"{path.relative_to(REPO)} imports {roots & FORBIDDEN[package]}"


def test_serving_never_imports_offline_code() -> None:
    offline = {module_name(p) for p in modules() if is_offline(p)}
    for path in modules():
        if is_offline(path):
            continue
        names = imported(path)
        assert not names & offline, f"{path.relative_to(REPO)} imports offline code: {names & offline}"
        libraries = {n.split(".")[0] for n in names} & OFFLINE_LIBRARIES
        assert not libraries, f"{path.relative_to(REPO)} imports {libraries}"


def test_no_import_cycles() -> None:
    """No module imports itself back through others, not even through a lazy import."""
    known = {module_name(p): p for p in modules()}
    graph = {name: {n for n in imported(path) if n in known and n != name} for name, path in known.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_litellm_is_imported_only_by_its_loader() -> None:
    importers = [p.relative_to(REPO).as_posix() for p in modules()
                 if any(n == "litellm" or n.startswith("litellm.") for n in imported(p))]
    assert importers == ["workers/litellm_loader.py"]


def test_importing_every_module_does_no_work(tmp_path: Path) -> None:
    """No files written, no litellm imported, no network needed, at import time."""
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in modules()]
    names = [n.removesuffix(".__init__") for n in names]
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n    importlib.import_module(name)\n"
              "assert 'litellm' not in sys.modules, 'litellm imported at import time'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []


SERVE_A_CASCADE = """
import json, sys
from pathlib import Path
from starlette.testclient import TestClient
from gateway.app import create_app
from gateway.settings import parse_config
from tests.fakes import FakeBackend

config = parse_config(Path(sys.argv[1]).read_text(), "config.yaml", Path(sys.argv[1]).parent)
backends = {name: FakeBackend(name, answer="B") for name in ("cheap", "mid", "big")}
body = {"model": "frugal/auto", "messages": [{"role": "user", "content": "Question 1: pick A, B, C or D."}]}
with TestClient(create_app(config, backends=backends)) as client:
    headers = {"authorization": "Bearer sk-layout"}
    answered = client.post("/v1/chat/completions", json=body, headers=headers)
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "skl2onnx", "matplotlib")
                or m.startswith(("router.fit", "scorer.fit", "gateway.cache.calibration", "gateway.cli")))
print(json.dumps({"status": [answered.status_code, streamed.status_code],
                  "tiers": answered.headers.get("x-frugal-tiers"), "loaded": loaded}))
"""


def test_serving_a_cascade_loads_no_training_library(tmp_path: Path) -> None:
    """The gateway, started with a fitted cascade route and answering through it (in full and streamed), has
    loaded neither scikit-learn nor matplotlib, nor any offline module."""
    from router.fit.fitting import FitOptions, fit_cascade
    from scorer.fit.dataset import load_grid
    from scorer.fit.train import TrainConfig
    from tests.cascade_data import synthetic_file

    data = synthetic_file(tmp_path / "synthetic.jsonl.gz", 80)
    fit_cascade(load_grid(data), tmp_path / "cascade.yaml", FitOptions(folds=2, scorer=TrainConfig()))
    (tmp_path / "config.yaml").write_text(
        "models: [{name: cheap, backend: openai/cheap}, {name: mid, backend: openai/mid}, "
        "{name: big, backend: openai/big}]\n"
        "routes: [{name: frugal/auto, kind: cascade, cascade: cascade.yaml}]\n"
        "auth: {keys: [{id: layout, key_env: LAYOUT_KEY}]}\n"
        f"ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}', spill_path: '{tmp_path / 'spill.jsonl'}'}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAYOUT_KEY": "sk-layout"}
    done = subprocess.run([sys.executable, "-c", SERVE_A_CASCADE, str(tmp_path / "config.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == [200, 200] and report["tiers"]  # the cascade answered
    assert report["loaded"] == []
