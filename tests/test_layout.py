"""The shape the architecture promises: arrows point one way, litellm is imported in one place, and
importing a module does no work."""

from __future__ import annotations

import ast
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


def modules() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package: str) -> None:
    for path in sorted((REPO / package).rglob("*.py")):
        roots = {name.split(".")[0] for name in imported(path)}
        assert not roots & FORBIDDEN[package], f"{path.relative_to(REPO)} imports {roots & FORBIDDEN[package]}"


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
