"""The gateway as a user installs it: a wheel built from the repository carries every runtime data file, and
installed into a fresh virtual environment outside the repository it serves a request with the semantic
cache on (whose verifier and threshold are data files read at start-up)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import yaml

from tests.harness import REPO, Service, free_port, model_entry

PACKAGES = ("gateway", "router", "scorer", "workers", "standin")


def source_files() -> list[str]:
    """The packages' files: in a checkout, what git tracks or would (not ignored), else what is on disk."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if listed:
        return [name for name in listed if (REPO / name).is_file()]
    return [p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]


def build_wheel(tmp: Path) -> Path:
    """The wheel of the working tree, built from a copy of its files (nothing written into the repository)."""
    source = tmp / "source"
    for name in ("pyproject.toml", "README.md", *source_files()):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    return next((tmp / "dist").glob("frugal-*.whl"))


def test_the_wheel_carries_every_runtime_data_file_and_serves_from_a_fresh_environment(tmp_path: Path,
                                                                                     standin_server: Service) -> None:
    wheel = build_wheel(tmp_path)
    inside = set(zipfile.ZipFile(wheel).namelist())
    data_files = [name for name in source_files() if not name.endswith(".py")]
    assert "gateway/cache/verifier.json" in data_files
    assert {"scorer/judges/smollm2-135m-instruct/judge.json", "scorer/judges/smollm2-135m-instruct/judge.onnx"} <= \
        set(data_files)
    assert [name for name in data_files if name not in inside] == []

    # A fresh environment outside the repository: the wheel installed alone; its dependencies are found in
    # this environment's site-packages (a path entry, so that the repository's editable install is not).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "frugal-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    where = subprocess.run([str(python), "-c", "import gateway; print(gateway.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)
    judged = subprocess.run([str(python), "-c", "from scorer.judge import LocalJudge, packaged_judge; "
                             "print(LocalJudge(packaged_judge('local/smollm2-135m-instruct')).folder)"],
                            cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(judged).is_relative_to(site)  # the default local model's judge comes with the wheel

    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "models": [model_entry("m", "alpha", standin_server.url, transport="http")],
        "auth": {"keys": [{"id": "test", "key_env": "WHEEL_TEST_KEY"}]},
        "cache": {"semantic": {"enabled": True}},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}", "spill_path": str(tmp_path / "spill.jsonl")},
    }))
    gateway = Service("wheel-gateway", [str(venv / "bin" / "frugal"), "serve", "--config", str(config),
                                        "--port", str(port)], port, tmp_path,
                      {"WHEEL_TEST_KEY": "sk-wheel", "STANDIN_API_KEY": "sk-standin", "PYTHONPATH": ""},
                      ready_path="/readyz")
    gateway.start(timeout_s=120)
    try:
        body = {"model": "m", "temperature": 0, "messages": [{"role": "user",
                                                              "content": "What is the capital of France?"}]}
        reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                           headers={"authorization": "Bearer sk-wheel"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "Paris."
        assert reply.headers["x-frugal-cache"] == "miss"  # the semantic layer was consulted
    finally:
        gateway.stop()
