from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from router.fit.fitting import FitOptions, fit_cascade
from scorer.fit.dataset import Grid, load_grid
from scorer.fit.train import TrainConfig
from tests.cascade_data import synthetic_file
from tests.harness import TINY_ROWS, Gateway, Service, TempPostgres, TempRedis, standin, write_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl.gz", TINY_ROWS)


@pytest.fixture(scope="session")
def standin_server(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[Service]:
    """The stand-in provider, answering from a small data file in the data pack's schema."""
    service = standin(tmp_path_factory.mktemp("standin"), [tiny_data])
    yield service
    service.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None) -> Gateway:
        gateway = Gateway(tmp_path, config, env)
        gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable PostgreSQL server's URL: $FRUGAL_TEST_POSTGRES_URL, the local one on 5432, or one
    the tests start themselves (initdb + pg_ctl on a free port; always with FRUGAL_TEST_POSTGRES=own)."""
    candidates = [os.environ.get("FRUGAL_TEST_POSTGRES_URL"), "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"]
    if os.environ.get("FRUGAL_TEST_POSTGRES") == "own":  # force the self-started server (to test that path)
        candidates = []
    for url in filter(None, candidates):
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            continue
        finally:
            engine.dispose()
        yield url
        return
    server = TempPostgres()
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A database of this test's own on the server (dropped afterwards); nothing else is touched."""
    name = f"frugal_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = postgres_server.rpartition("/")
    yield f"{base}/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server this test session started itself (on a free port, no persistence)."""
    server = TempRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A Redis database for one test: the session's own server, emptied after the test (it is ours)."""
    import redis

    yield redis_server
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def smollm2_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M built at int8 (the default local model), once per session, outside the repository."""
    from workers.local.catalog import build  # noqa: PLC0415

    explicit = os.environ.get("FRUGAL_TEST_MODELS_DIR")
    root = Path(explicit) if explicit else tmp_path_factory.getbasetemp() / "models"
    root.mkdir(parents=True, exist_ok=True)
    return build("smollm2-135m-instruct", "int8", root=root)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Grid, Path]:
    """A synthetic three-model data file (tests/cascade_data.py), its grid, and a cascade fitted on it."""
    folder = tmp_path_factory.mktemp("cascade")
    data = synthetic_file(folder / "synthetic.jsonl.gz", 160)
    cascade = folder / "cascade.yaml"
    fit_cascade(load_grid(data), cascade, FitOptions(folds=3, scorer=TrainConfig(learner="logistic")))
    return data, load_grid(data), cascade


@pytest.fixture(scope="session")
def synthetic_standin(tmp_path_factory: pytest.TempPathFactory,
                      synthetic: tuple[Path, Grid, Path]) -> Iterator[Service]:
    """The stand-in provider answering the synthetic file's recorded answers."""
    service = standin(tmp_path_factory.mktemp("standin-cascade"), [synthetic[0]])
    yield service
    service.stop()
